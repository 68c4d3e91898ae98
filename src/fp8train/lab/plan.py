"""``fp8train plan``: the planner on the command line, and its section of a lab report.

``fp8train plan --model llama3-8b --gpu h100 --recipe tensorwise --tokens 8192
--world-size 8 --fsdp`` prints one row per distinct Linear (layers that differ only in
their block index are folded into one row, ``x32``) and writes ``plan.png`` (one bar per
layer: predicted speed-up coloured by numerics risk; the whole-step estimate beside
it) and ``plan.md`` into ``--out``. ``--model lab-gpt`` plans the lab's GPT with real
weights, so the time outside the GEMMs comes from a profile of its step on this CPU and
``--calibrate N`` can train it N steps to measure its numerics. The other models are
built on the meta device from their published dimensions
(:mod:`fp8train.planner.archs`).

Only argparse is imported at module level (the lab CLI checks arguments before it
imports torch); the planner is imported when a plan runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fp8train.checkpoint import atomic_write_bytes
from fp8train.lab.config import LabConfig, LabError

if TYPE_CHECKING:
    from fp8train.planner import ModelPlan

__all__ = ["add_compare_option", "add_parser", "plan_markdown", "plan_table", "plot_plan", "run"]

LAB_GPT = "lab-gpt"
_RISK_COLOURS = {"low": "#2ca02c", "medium": "#ff7f0e", "high": "#d62728", "unknown": "#9e9e9e"}


def add_parser(commands: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Register ``plan`` on the lab CLI's sub-command parsers."""
    plan = commands.add_parser(
        "plan",
        help="predict FP8's speed-up per layer on a GPU (table, plan.png, plan.md)",
        formatter_class=formatter_class,
    )
    plan.add_argument(
        "--model",
        default=LAB_GPT,
        metavar="NAME",
        help="lab-gpt (default; real weights: CPU profile and --calibrate), llama3-8b, "
        "llama3-70b, llama3.2-1b, mistral-7b, qwen2.5-7b or qwen2.5-0.5b (published "
        "dimensions, nothing downloaded)",
    )
    plan.add_argument("--gpu", default="h100-sxm", metavar="NAME", help="default h100-sxm")
    plan.add_argument("--recipe", default="tensorwise", metavar="R", help="default tensorwise")
    plan.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help="tokens per GPU per step (default: the lab GPT's batch x seq; 8192 otherwise)",
    )
    plan.add_argument("--world-size", type=int, default=1, metavar="N", help="data-parallel ranks")
    plan.add_argument("--fsdp", action="store_true", help="FSDP2 sharding (FP8 all-gather)")
    plan.add_argument(
        "--bf16-step-ms",
        type=float,
        metavar="MS",
        help="a measured bf16 step on the GPU; the time outside the GEMMs is derived from it",
    )
    plan.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="lab-gpt only: train N CPU steps under the recipe and judge each layer's numerics",
    )
    plan.add_argument("--preset", default="default", metavar="NAME", help="lab-gpt's preset")
    plan.add_argument("--out", metavar="DIR", help="where plan.png and plan.md go (default: runs/)")


def add_compare_option(compare: argparse.ArgumentParser) -> None:
    """``fp8train compare --plan-gpu GPU``: add the plan of the lab model to report.md."""
    compare.add_argument(
        "--plan-gpu",
        metavar="GPU",
        help="also plan the lab model on GPU (e.g. h100-sxm) and add it to report.md",
    )


def _lab_gpt(config: LabConfig, tokens: int | None) -> tuple[Any, Any]:
    import torch

    from fp8train.lab.gpt import GPT

    model = GPT(seq=config.seq, d_model=config.d_model, layers=config.layers, heads=config.heads)
    batch = config.batch if tokens is None else max(tokens // config.seq, 1)
    seq = config.seq if tokens is None else min(tokens, config.seq)
    gen = torch.Generator().manual_seed(config.seed)
    return model, torch.randint(0, 256, (batch, seq), generator=gen)


def _first_fp8_recipe(config: LabConfig) -> str:
    from fp8train.recipes import RECIPE_NAMES

    for p in config.precisions:
        base = p.split("+")[0]
        if base in RECIPE_NAMES:
            return base
    return "tensorwise"


def _fold(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def plan_table(plan: ModelPlan) -> str:
    """One line per Linear; layers equal but for their block index share a line."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in plan.rows:
        key = (_fold(r.name), r.m, r.k, r.n, r.recommendation, r.risk, r.suggested_recipe)
        groups.setdefault(key, []).append(r)
    head = (
        f"{'layer':<36} {'n':>4} {'m':>7} {'k':>6} {'n_out':>7} {'bf16 ms':>9} "
        f"{'fp8 ms':>9} {'speedup':>8} {'act MiB':>13} {'risk':>7}  advice"
    )
    lines = [head, "-" * len(head)]
    for (name, m, k, n, rec, risk, finer), rows in groups.items():
        r = rows[0]
        act = f"{_mib(r.saved_act_bf16)}->{_mib(r.saved_act_fp8)}"
        advice = rec if rec != "finer" else f"finer: {finer}"
        lines.append(
            f"{name[-36:]:<36} {'x' + str(len(rows)):>4} {m:>7} {k:>6} {n:>7} "
            f"{r.bf16_ms:>9.3f} {r.fp8_ms:>9.3f} {r.speedup:>7.2f}x {act:>13} {risk:>7}  "
            f"{advice} ({r.reason})"
        )
    return "\n".join(lines) + "\n\n" + _summary(plan)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.1f}"


def _summary(plan: ModelPlan) -> str:
    s, a = plan.step, plan.step_all
    ag = sum(r.ag_bytes_saved for r in plan.rows if r.recommendation == "fp8")
    fsdp = f", FSDP2 over {plan.world_size}" if plan.fsdp else ""
    lines = [
        f"{plan.gpu.label}, {plan.recipe.name}{fsdp}: whole step {s.bf16_ms:.2f} ms bf16 -> "
        f"{s.fp8_ms:.2f} ms with the {len(plan.selected)} recommended layers in FP8 "
        f"({s.speedup:.2f}x); every layer in FP8: {a.fp8_ms:.2f} ms ({a.speedup:.2f}x)",
        f"time outside the Linear GEMMs: {s.non_gemm_ms:.2f} ms ({s.non_gemm_source})",
    ]
    if plan.fsdp:
        lines.append(f"FP8 all-gather saves {ag / 2**20:.1f} MiB received per GPU per step")
    return "\n".join(lines)


def plan_markdown(plan: ModelPlan, picture: str | None = None) -> str:
    """The plan as Markdown: summary, picture, and one table row per distinct layer."""
    parts = [_summary(plan).replace("\n", "  \n")]
    if picture:
        parts.append(f"![plan]({picture})")
    rows = ["| layer | m | k | n | speed-up | risk | advice |", "|---|---|---|---|---|---|---|"]
    seen: set[tuple[Any, ...]] = set()
    for r in plan.rows:
        key = (_fold(r.name), r.m, r.k, r.n, r.recommendation, r.risk)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            f"| `{key[0]}` | {r.m} | {r.k} | {r.n} | {r.speedup:.2f}x | {r.risk} | "
            f"{r.recommendation}: {r.reason} |"
        )
    parts.append("\n".join(rows))
    parts.append("How the planner predicts, and where it is wrong: docs/planner.md.")
    return "\n\n".join(parts) + "\n"


def plot_plan(plan: ModelPlan, path: Path) -> None:
    """One bar per layer (predicted speed-up, coloured by numerics risk, hatched where
    the advice is not FP8 under this recipe); the whole-step estimates beside it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(plan.rows)
    width = min(5 + 0.12 * n, 20)
    fig = Figure(figsize=(width + 3, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[width, 3])
    colours = [_RISK_COLOURS[r.risk] for r in plan.rows]
    bars = left.bar(range(n), [r.speedup for r in plan.rows], color=colours)
    for bar, r in zip(bars, plan.rows, strict=True):
        if r.recommendation != "fp8":
            bar.set_hatch("//")
            bar.set_edgecolor("black")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_ylabel("predicted speed-up over bf16 (fwd+bwd)")
    if n <= 40:
        left.set_xticks(range(n), [r.name for r in plan.rows], rotation=90, fontsize=7)
    else:
        left.set_xticks([])
        left.set_xlabel(f"{n} Linear layers in call order")
    left.set_title(f"{plan.gpu.label}, {plan.recipe.name}: per layer")
    handles = [Patch(color=c, label=f"risk {k}") for k, c in _RISK_COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="not FP8"))
    left.legend(handles=handles, fontsize=7, loc="best")
    labels = ["bf16", "advised", "all"]
    values = [1.0, plan.step.speedup, plan.step_all.speedup]
    right.bar(labels, values, color=["#000000", "#1f77b4", "#9467bd"])
    for i, v in enumerate(values):
        right.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    right.set_title("whole step (bf16 = 1)")
    right.set_ylabel("speed-up over the bf16 step")
    fig.savefig(path, dpi=110)


def _plan(args: argparse.Namespace) -> tuple[ModelPlan, str]:
    import torch

    from fp8train import planner
    from fp8train.lab.config import resolve

    if args.model == LAB_GPT:
        config = resolve("gpt", args.preset, {})
        model, example = _lab_gpt(config, args.tokens)
    elif args.model in planner.ARCHS:
        if args.calibrate:
            raise LabError(f"--calibrate needs real weights: only {LAB_GPT} has them")
        model = planner.build(args.model)
        example = torch.zeros((1, args.tokens or 8192), dtype=torch.long, device="meta")
    else:
        known = ", ".join([LAB_GPT, *planner.ARCHS])
        raise LabError(f"unknown --model {args.model!r}; known: {known}")
    if args.tokens is not None and args.tokens < 1:
        raise LabError(f"--tokens must be >= 1, got {args.tokens}")
    if args.calibrate < 0:
        raise LabError(f"--calibrate must be >= 0, got {args.calibrate}")
    try:
        plan = planner.plan_model(
            model,
            example,
            gpu=args.gpu,
            recipe=args.recipe,
            world_size=args.world_size,
            fsdp=args.fsdp,
            calibrate_steps=args.calibrate,
            bf16_step_ms=args.bf16_step_ms,
        )
    except ValueError as e:
        raise LabError(str(e)) from e
    return plan, args.model


def run(args: argparse.Namespace) -> int:
    """``fp8train plan``: print the table, write plan.png and plan.md."""
    from fp8train.lab.report import require_plotting

    require_plotting()
    plan, model = _plan(args)
    out = Path(args.out) if args.out else Path("runs") / f"plan-{model}-{plan.gpu.name}"
    out.mkdir(parents=True, exist_ok=True)
    print(plan_table(plan))
    plot_plan(plan, out / "plan.png")
    title = f"# Plan: {model} on {plan.gpu.label}, {plan.recipe.name}\n\n"
    atomic_write_bytes(out / "plan.md", (title + plan_markdown(plan, "plan.png")).encode())
    print(f"wrote {out / 'plan.png'}, {out / 'plan.md'}")
    return 0


def append_to_report(out: Path, config: LabConfig, gpu: str, steps: int = 3) -> None:
    """Plan the lab model of ``config`` on ``gpu`` under its first FP8 recipe (calibrated
    ``steps`` CPU steps), draw ``plan.png`` and append a section to ``report.md``."""
    from fp8train.planner import plan_model

    model, example = _lab_gpt(config, None)
    try:
        plan = plan_model(
            model, example, gpu=gpu, recipe=_first_fp8_recipe(config), calibrate_steps=steps
        )
    except ValueError as e:
        raise LabError(f"--plan-gpu: {e}") from e
    plot_plan(plan, out / "plan.png")
    report = out / "report.md"
    text = report.read_text() if report.exists() else ""
    section = f"\n\n## Plan on {plan.gpu.label}\n\n" + plan_markdown(plan, "plan.png")
    atomic_write_bytes(report, (text.rstrip("\n") + section).encode())


def check_gpu(name: str | None) -> None:
    """Fail fast on an unknown ``--plan-gpu``, before a comparison trains for minutes."""
    if name is None:
        return
    from fp8train.planner.gpus import get_gpu

    try:
        get_gpu(name)
    except ValueError as e:
        raise LabError(f"--plan-gpu: {e}") from e
