"""The loss-parity study of issue 33: our FP8 recipes, torchao's, and the ablations of
tensorwise, with paired seeds, at two model sizes.

    python docs/loss_parity/run_study.py run --size d128 --seeds 5 --out runs/loss_parity/d128
    python docs/loss_parity/run_study.py run --size d256 --seeds 1 --precisions tensorwise \\
        --out runs/loss_parity/d256-timing
    python docs/loss_parity/run_study.py table runs/loss_parity/d128 [MORE_FOLDERS ...]
    python docs/loss_parity/run_study.py table --per-seed runs/loss_parity/d128 [...]
    python docs/loss_parity/run_study.py numerics runs/loss_parity/d256 --seed 0

``run`` trains every (seed, precision) through the lab (``fp8train.lab.compare.run_all``,
the code behind ``fp8train compare``) into ``--out``: checkpoints, results.json,
report.md. Run it again with the same arguments to resume an interrupted study (each
run continues from its last checkpoint). ``table`` prints the paired gaps to bf16 as a
markdown table, from results.json, or, while the study is still running, from the
final checkpoints of the runs that finished. Given several folders (studies of the same
size split by seeds or precisions: each run depends only on its precision and seed),
it pools their runs, the first folder's where two hold the same run.

Sizes (``SIZES``): ``d128`` is the lab's default configuration; ``d256`` is the one of
issue 33 (d_model 256, 4 layers, 4 heads, sequence 128 x batch 16, 400 steps, AdamW lr
2e-3 with betas 0.9/0.95 and weight decay 0.1, 20 warm-up steps then cosine to 2e-4,
clip 1.0, 8 MiB of the standard library's source, the output head in high precision).
The lab's schedule warms up linearly to ``lr`` and decays with a cosine to
``lr * min_lr_ratio`` at the last step, and decays every matrix (embeddings included).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Everything the study compares: the references, every FP8 recipe, the peer, and the
# ablations of tensorwise (fp8train.lab.config.ABLATIONS). "tensorwise~hpsave" is left
# out: tensorwise's high-precision save is bitwise its FP8 save
# (tests/test_recipe_ablations.py), so it would repeat the tensorwise runs.
STUDY_PRECISIONS = (
    "bf16",
    "fp32",
    "tensorwise",
    "delayed",
    "rowwise",
    "blockwise",
    "mxfp8",
    "torchao-tensorwise",
    "torchao-rowwise",
    "tensorwise~nopow2",
    "tensorwise~from-bf16",
    "tensorwise~hp-fprop",
    "tensorwise~hp-dgrad",
    "tensorwise~hp-wgrad",
    "tensorwise~e4m3-grads",
)

# LabConfig overrides per size, on top of the gpt task's default preset.
SIZES: dict[str, dict[str, Any]] = {
    "d128": {},
    "d256": {
        "d_model": 256,
        "layers": 4,
        "heads": 4,
        "seq": 128,
        "batch": 16,
        "steps": 400,
        "lr": 2e-3,
        "beta1": 0.9,
        "beta2": 0.95,
        "weight_decay": 0.1,
        "warmup_steps": 20,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        "corpus_mb": 8.0,
        "fp8_head": False,
    },
}


def _run(args: argparse.Namespace) -> int:
    from fp8train.lab import compare
    from fp8train.lab.config import parse_precisions, resolve

    precisions = parse_precisions(args.precisions) if args.precisions else STUDY_PRECISIONS
    overrides = dict(SIZES[args.size], precisions=precisions, seeds=args.seeds, seed=args.seed)
    if args.kernels:
        overrides["kernels"] = args.kernels
    config = resolve("gpt", "default", overrides)
    out = Path(args.out)
    resume = (out / "config.json").exists()
    started = time.perf_counter()
    results = compare.run_all(
        config, out, command=" ".join(sys.argv), resume=resume, quiet=args.quiet
    )
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if results is not None:
        print(table(out))
    return 0


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def _final_losses(out: Path) -> dict[str, dict[int, float]]:
    """precision -> seed -> final validation loss, from results.json if the study is
    done, else from the final checkpoints of the finished runs."""
    results = out / "results.json"
    if results.exists():
        runs = json.loads(results.read_text())["runs"]
        return {
            p: {s["seed"]: s["final_val_loss"] for s in run["per_seed"]} for p, run in runs.items()
        }
    from fp8train.lab.world import read_checkpoint

    losses: dict[str, dict[int, float]] = {}
    for path in sorted((out / "checkpoints").glob("*.pt")):
        state = read_checkpoint(path)
        final = state["history"]["final"]
        if final is not None:
            losses.setdefault(state["precision"], {})[state["seed"]] = final["val_loss"]
    return losses


def _pooled(outs: tuple[Path, ...]) -> dict[str, dict[int, float]]:
    """precision -> seed -> final validation loss over several folders (the first
    folder's where two hold the same run)."""
    losses: dict[str, dict[int, float]] = {}
    for out in outs:
        for precision, by_seed in _final_losses(out).items():
            pooled = losses.setdefault(precision, {})
            for seed, loss in by_seed.items():
                pooled.setdefault(seed, loss)
    return losses


def _order(precisions: Any) -> list[str]:
    """The study's order, then any other precision."""
    order = [p for p in STUDY_PRECISIONS if p in precisions]
    return order + [p for p in precisions if p not in STUDY_PRECISIONS]


def _paired_gaps(by_seed: dict[int, float], base: dict[int, float]) -> dict[int, float]:
    """seed -> gap in percent of ``by_seed`` over ``base``, on the seeds both have."""
    return {s: 100.0 * (v / base[s] - 1.0) for s, v in sorted(by_seed.items()) if s in base}


def table(*outs: Path) -> str:
    """Markdown: per precision, the mean final validation loss and the gap to bf16
    (mean and standard error over the seeds both finished, paired by seed), whether
    that gap is within 2 standard errors of zero (issue 33's criterion; "-" with one
    seed), and for the torchao precisions and tensorwise's ablations the paired gap to
    our tensorwise."""
    losses = _pooled(outs)
    ref = losses.get("bf16", {})
    tw = losses.get("tensorwise", {})
    lines = [
        "| precision | seeds | final val loss | gap vs bf16 | SE | within 2 SE "
        "| gap vs tensorwise | SE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for precision in _order(losses):
        by_seed = losses[precision]
        loss = statistics.fmean(by_seed.values())
        row = [precision, str(len(by_seed)), f"{loss:.4f}"]
        for name, base in (("bf16", ref), ("tensorwise", tw)):
            gaps = list(_paired_gaps(by_seed, base).values()) if precision != name else []
            if gaps:
                mean, se = _mean_se(gaps)
                row += [f"{mean:+.2f}%", "-" if se is None else f"{se:.2f}%"]
                if name == "bf16":
                    row.append("-" if se is None else ("yes" if abs(mean) <= 2 * se else "no"))
            else:
                row += ["", ""] + ([""] if name == "bf16" else [])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_seed(*outs: Path) -> str:
    """Markdown: every precision's gap to bf16 seed by seed, and the standard deviation
    of those gaps (the per-seed noise that sets how many seeds a gap needs)."""
    losses = _pooled(outs)
    ref = losses.get("bf16", {})
    gaps = {p: _paired_gaps(v, ref) for p, v in losses.items() if p != "bf16"}
    seeds = sorted({s for g in gaps.values() for s in g})
    lines = [
        "| precision | " + " | ".join(f"seed {s}" for s in seeds) + " | SD |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for precision in _order(gaps):
        by_seed = gaps[precision]
        if not by_seed:
            continue
        cells = [f"{by_seed[s]:+.2f}%" if s in by_seed else "" for s in seeds]
        sd = statistics.stdev(by_seed.values()) if len(by_seed) > 1 else None
        cells.append("-" if sd is None else f"{sd:.2f}%")
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The monitor's quantities that say how well an operand quantises (lab health logs).
_NUMERICS = ("sqnr_db", "underflow", "clipped")


def numerics(out: Path, seed: int = 0) -> str:
    """Markdown: from the health monitor's logs of ``out`` (monitor/<precision>-seed<seed>
    .jsonl), per precision and operand role, the median over observed steps and layers of
    the quantisation SQNR (dB), the share of nonzero values flushed to zero and the
    share clipped at the format's maximum, with the worst layer's median SQNR."""
    lines = [
        "| precision | operand | SQNR dB (median) | worst layer (median SQNR) "
        "| flushed to zero | clipped |",
        "|---|---|---|---|---|---|",
    ]
    logs = {
        p.name.removesuffix(f"-seed{seed}.jsonl"): p
        for p in (out / "monitor").glob(f"*-seed{seed}.jsonl")
    }
    for precision in _order(logs):
        by_role: dict[str, dict[str, dict[str, list[float]]]] = {}
        for line in logs[precision].read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") != "layer" or record.get("sqnr_db") is None:
                continue
            layer = by_role.setdefault(record["role"], {}).setdefault(
                record["layer"], {k: [] for k in _NUMERICS}
            )
            for key in _NUMERICS:
                if record.get(key) is not None:
                    layer[key].append(float(record[key]))
        for role in sorted(by_role):
            layers = by_role[role]
            pooled = {k: [v for lay in layers.values() for v in lay[k]] for k in _NUMERICS}
            worst = min(layers, key=lambda name: statistics.median(layers[name]["sqnr_db"]))
            worst_db = statistics.median(layers[worst]["sqnr_db"])
            lines.append(
                f"| {precision} | {role} | {statistics.median(pooled['sqnr_db']):.1f} "
                f"| {worst} ({worst_db:.1f}) | {statistics.fmean(pooled['underflow']):.2e} "
                f"| {statistics.fmean(pooled['clipped']):.2e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the study's runs into --out (resumable)")
    run.add_argument("--size", choices=sorted(SIZES), required=True)
    run.add_argument("--seeds", type=int, default=5, help="paired seeds (default 5)")
    run.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    run.add_argument(
        "--precisions", help="comma-separated (default: the study's, STUDY_PRECISIONS)"
    )
    run.add_argument("--kernels", choices=["eager", "compiled"], help="default: the lab's")
    run.add_argument("--out", required=True)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    show = commands.add_parser("table", help="print the paired-gap table of a study folder")
    show.add_argument("out", nargs="+", help="study folders (pooled)")
    show.add_argument("--per-seed", action="store_true", help="every seed's gap to bf16 instead")
    health = commands.add_parser(
        "numerics", help="per precision and operand, the health monitor's quantisation figures"
    )
    health.add_argument("out", help="a study folder")
    health.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "table":
        outs = tuple(map(Path, args.out))
        print(per_seed(*outs) if args.per_seed else table(*outs))
        return 0
    if args.command == "numerics":
        print(numerics(Path(args.out), args.seed))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
