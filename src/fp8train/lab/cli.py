"""``fp8train compare`` and ``fp8train train``: the lab from the command line.

Also reachable as ``python -m fp8train`` (and so ``torchrun -m fp8train``). Errors in
the request print one line, ``fp8train: error: ...``, and exit with status 2; an
interruption prints how to resume and exits with 130. Only argparse and the config
are imported before the arguments are checked, so bad arguments fail fast.

``--dist ddp|fsdp2`` runs data-parallel under ``torchrun``: every rank runs this same
command, joins the process group from torchrun's environment, trains its rows of each
batch, and only rank 0 prints and writes files. A rank that loses its peers prints one
line and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

from fp8train.lab import plan as plan_cli
from fp8train.lab.config import (
    FP4_RECIPES,
    PRECISIONS,
    RUN_SET_FIELDS,
    TASKS,
    LabConfig,
    LabError,
    from_dict,
    parse_precisions,
    resolve,
)

__all__ = ["build_parser", "main"]

PROG = "fp8train"
RUNS_DIR = Path("runs")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help layout, but a line breaks only between words: argparse's default
    splits a word longer than the column (a comma-separated list of precisions) and at
    hyphens (``--no-fp8-all-gather``, ``+fp8act``); a name cut in two cannot be copied.
    A word longer than the whole column overflows it instead."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()  # as argparse does
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line without the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(2)


# Options shared by both commands, each setting the LabConfig field of the same name
# (--d-model -> d_model). None means "not given": the preset's value stands.
_SHARED: list[tuple[str, dict[str, Any]]] = [
    (
        "--data",
        {
            "metavar": "PATH",
            "help": "text file or folder to train on (default: this "
            "Python's standard-library .py sources)",
        },
    ),
    ("--steps", {"type": int, "metavar": "N", "help": "optimiser steps per run"}),
    ("--d-model", {"type": int, "metavar": "N", "help": "model width (digits: hidden width)"}),
    ("--layers", {"type": int, "metavar": "N", "help": "transformer blocks"}),
    ("--heads", {"type": int, "metavar": "N", "help": "attention heads"}),
    ("--batch", {"type": int, "metavar": "N", "help": "sequences (digits: images) per batch"}),
    ("--seq", {"type": int, "metavar": "N", "help": "context length in bytes"}),
    ("--lr", {"type": float, "metavar": "LR", "help": "peak learning rate (warmup, cosine)"}),
    ("--grad-clip", {"type": float, "metavar": "X", "help": "clip the gradient norm to X"}),
    (
        "--micro-batches",
        {
            "type": int,
            "metavar": "N",
            "help": "split each batch into N micro-batches (gradient accumulation); one "
            "process with N computes what N ranks of --dist compute",
        },
    ),
    ("--seed", {"type": int, "metavar": "S", "help": "first seed"}),
    (
        "--seeds",
        {"type": int, "metavar": "N", "help": "seeds per precision, paired across precisions"},
    ),
    ("--eval-every", {"type": int, "metavar": "N", "help": "validate every N steps"}),
    (
        "--kernels",
        {
            "choices": ["eager", "compiled"],
            "help": (
                "FP8 quantisation kernels: compiled (default, torch.compile) or eager; same bits"
            ),
        },
    ),
    (
        "--monitor-every",
        {
            "type": int,
            "metavar": "N",
            "help": "FP8 health monitor: observe every N-th step (default 25; 0 turns it off)",
        },
    ),
    (
        "--dist",
        {
            "choices": ["ddp", "fsdp2"],
            "help": "data-parallel over the ranks of torchrun (launch with: torchrun "
            "--nproc-per-node N -m fp8train ...); --batch is the global batch",
        },
    ),
    (
        "--fp8-all-gather",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "--dist fsdp2: all-gather weights in FP8 (default: for every recipe that "
            "supports it, same results; --fp8-all-gather makes it required)",
        },
    ),
    (
        "--grad-comm",
        {
            "choices": ["fp32", "bf16", "fp8"],
            "help": "--dist ddp: average gradients over the ranks in fp32 (default), bf16 "
            "(torch's bf16_compress_hook) or FP8 (fp8train's fp8_compress_hook, E4M3)",
        },
    ),
    (
        "--stress",
        {
            "metavar": "SPEC",
            "help": "inject a fault into every precision alike: outlier:<layer>:<every>:"
            "<factor> sets one element of that Linear's input to factor x its amax every "
            "<every> steps (e.g. outlier:blocks.1.mlp.proj:40:1e6)",
        },
    ),
    (
        "--guard",
        {
            "metavar": "POLICY",
            "help": "policy of <precision>+guard runs (fp8train.Guard): warn, skip, "
            "demote[:<ladder>] or rollback[:<ladder>] (default demote:rowwise,high)",
        },
    ),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


# Raw text (kept as written), so every line fits 80 columns.
_EXAMPLES = """examples:
  fp8train compare                  every precision, about 10 minutes
  fp8train compare --precisions bf16,tensorwise,int8 --seeds 3
  fp8train compare --task digits    the classifier on scikit-learn's digits
  fp8train train --precision rowwise --steps 100 --data notes.txt
  fp8train compare --resume --out runs/20260101-120000
  torchrun --nproc-per-node 2 -m fp8train train --dist fsdp2 \\
      --precision tensorwise
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        epilog=_EXAMPLES,
        description="FP8 training lab: train a small model under fp32, bf16 and each FP8\n"
        "recipe with identical seeds and data, and report the differences.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    compare = commands.add_parser(
        "compare",
        help="train every precision and write results.json, loss_curves.png, report.md",
        formatter_class=_HelpFormatter,
    )
    compare.add_argument(
        "--precisions",
        metavar="LIST",
        help=f"comma-separated, from {', '.join(PRECISIONS)} (default: all), or the FP4 "
        f"recipes {', '.join(FP4_RECIPES)}; "
        "<recipe>+fp8act adds FP8 storage of the LayerNorm, GELU and attention inputs; "
        "<precision>+guard trains under fp8train.Guard (--guard)",
    )
    train = commands.add_parser(
        "train", help="train one precision, same outputs as compare", formatter_class=_HelpFormatter
    )
    train.add_argument(
        "--precision",
        metavar="P",
        help=f"one of {', '.join(PRECISIONS + FP4_RECIPES)}, or <recipe>+fp8act (default: bf16)",
    )
    for sub in (compare, train):
        sub.add_argument("--task", choices=TASKS, help="gpt (default) or digits")
        sub.add_argument(
            "--preset",
            metavar="NAME",
            help="default (about 10 minutes for all precisions) or tiny (seconds)",
        )
        for flag, kwargs in _SHARED:
            sub.add_argument(flag, **kwargs)
        sub.add_argument("--out", metavar="DIR", help="output folder (default: runs/<timestamp>)")
        sub.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out (default: the newest under runs/) "
            "from its checkpoints, exactly",
        )
        sub.add_argument(
            "--stop-at",
            type=int,
            metavar="STEP",
            help="stop every run after STEP steps, checkpointed, to --resume later",
        )
        sub.add_argument(
            "--only-seeds",
            metavar="S[,S...]",
            help="train only these of the run's seeds (several processes or machines can "
            "share one --out, each with its own seeds); --resume without it then writes "
            "the report",
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
    formats = commands.add_parser(
        "formats",
        help="print every number format's limits; --plot DIR draws why FP8 trains",
        formatter_class=_HelpFormatter,
    )
    formats.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNGs: representable values, rounding error vs magnitude, and real "
        "tensors against each format's range",
    )
    plan_cli.add_parser(commands, _HelpFormatter)
    plan_cli.add_compare_option(compare)
    commands.add_parser(
        "recipes",
        help="print every recipe's three GEMMs (formats and scaling of each operand)",
        formatter_class=_HelpFormatter,
    )
    return parser


def _formats(args: argparse.Namespace) -> int:
    from fp8train.lab.explorer import formats_table, plot_formats

    print(formats_table())
    if args.plot:
        for path in plot_formats(Path(args.plot)):
            print(f"wrote {path}")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields the user set explicitly."""
    values = {_field(flag): getattr(args, _field(flag)) for flag, _ in _SHARED}
    if args.command == "compare" and args.precisions is not None:
        values["precisions"] = parse_precisions(args.precisions)
    if args.command == "train" and args.precision is not None:
        values["precisions"] = parse_precisions(args.precision)
        if len(values["precisions"]) != 1:
            raise LabError(f"train runs one precision; got {args.precision!r} (use compare)")
    return {k: v for k, v in values.items() if v is not None}


def _new_out_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = RUNS_DIR / stamp, 1
    while out.exists():
        n += 1
        out = RUNS_DIR / f"{stamp}-{n}"
    return out


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be one, before any work is done: a path that
    names a regular file (or lies under one). Whether it can be created is known only by
    trying (permission bits say nothing for root, and /proc refuses anyway), which
    ``compare.run_all`` does after the data loads, with the same one-line error."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"lies under the file {parent}"
                raise LabError(f"--out {out}: {what}, not a folder; give a folder path")
            return


def _latest_run() -> Path:
    runs = sorted(RUNS_DIR.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LabError(f"--resume: no run under {RUNS_DIR}/; give --out DIR")
    return runs[-1].parent


def _fresh_config(
    args: argparse.Namespace, overrides: dict[str, Any], default_task: str = "gpt"
) -> LabConfig:
    """Defaults, then the preset, then the options given; ``train`` defaults to bf16."""
    if args.command == "train":
        overrides = {"precisions": ("bf16",), **overrides}
    return resolve(args.task or default_task, args.preset or "default", overrides)


def _config_for_resume(out: Path, args: argparse.Namespace, overrides: dict[str, Any]) -> LabConfig:
    """The saved config; an explicit option that disagrees with it is an error, since a
    changed run would not continue exactly."""
    path = out / "config.json"
    if not path.exists():
        raise LabError(f"--resume: {out} holds no run (no config.json)")
    try:
        saved = json.loads(path.read_text())
        config = from_dict(saved["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise LabError(f"--resume: cannot read {path}: {e}") from e
    if saved.get("command") != args.command:
        raise LabError(
            f"--resume: {out} was made by `{PROG} {saved.get('command')}`, not {args.command}"
        )
    if args.task is not None:
        overrides["task"] = args.task
    if args.preset is not None:  # the whole preset must match, not just the options given
        overrides = asdict(_fresh_config(args, overrides, config.task))
    extended: dict[str, Any] = {}
    for key, value in overrides.items():
        saved_value = getattr(config, key)
        if saved_value == value:
            continue
        # A comparison may grow: more precisions (every saved one kept) or more seeds.
        grows = (key == "precisions" and set(saved_value) <= set(value)) or (
            key == "seeds" and value > saved_value
        )
        if grows:
            extended[key] = value
        else:
            grow = ""
            if key in RUN_SET_FIELDS:
                grow = " (a resume may add precisions or seeds, not drop them)"
            raise LabError(
                f"--resume continues {out} as configured; {key} is {saved_value!r} "
                f"there, not {value!r}{grow} (drop the option or start a new run)"
            )
    if extended:
        config = replace(config, **extended)
        config.validate()
    return config


class _RankFailed(Exception):
    """A collective failed (a peer rank died or stalled): one line, status 1."""


def _require_torchrun(config: LabConfig, command: str) -> None:
    """``--dist`` needs the environment torchrun gives each rank; say how to get it."""
    if config.dist is not None and not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        raise LabError(
            f"--dist {config.dist} runs one process per rank and must be launched by "
            f"torchrun (RANK and WORLD_SIZE are not set), e.g. torchrun --nproc-per-node 2 "
            f"-m {PROG} {command} --dist {config.dist} ..."
        )


def _join_process_group(config: LabConfig, out: Path | None, resume: bool) -> Path:
    """Join torchrun's process group and check the run fits it; return the output folder
    rank 0 chose (a timestamped name could differ by a second between ranks)."""
    import torch.distributed

    from fp8train import distributed as fd

    try:
        info = fd.init_from_env()
    except ValueError as e:
        raise LabError(str(e)) from e
    parts = info.world_size * config.micro_batches
    if config.batch % parts:
        over = ("1 rank" if info.world_size == 1 else f"{info.world_size} ranks") + (
            f" x {config.micro_batches} micro-batches" if config.micro_batches > 1 else ""
        )
        raise LabError(
            f"--batch {config.batch} is the global batch and must split evenly over the "
            f"{over}; use a multiple of {parts}"
        )
    # FSDP2 warns on every forward that the model's output (the logits, a view) would
    # lose its backward hook if modified in place; the lab never modifies it.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    if out is None and info.is_main:
        out = _new_out_dir()
    shared = [None if out is None else str(out)]
    torch.distributed.broadcast_object_list(shared, src=0)
    if resume and str(out) != shared[0]:
        raise LabError(
            f"--resume: rank 0 continues {shared[0]}, rank {info.rank} found {out}; give --out DIR"
        )
    return Path(str(shared[0]))


def _leave_process_group() -> None:
    """Destroy the process group, if this process joined one (after the models are gone:
    a DDP reducer that outlives its group can hang at exit; shutdown warns if one is left)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        from fp8train import distributed as fd

        fd.shutdown()


def _run(args: argparse.Namespace) -> int:
    if args.command is None:
        raise LabError("choose a command: compare, train, formats or plan (see fp8train --help)")
    if args.command == "formats":
        return _formats(args)
    if args.command == "recipes":
        from fp8train.recipes import describe_all

        print(describe_all())
        return 0
    if args.command == "plan":
        return plan_cli.run(args)
    overrides = _overrides(args)
    if args.stop_at is not None and args.stop_at < 1:
        raise LabError(f"--stop-at must be >= 1, got {args.stop_at}")
    out: Path | None
    if args.resume:
        out = Path(args.out) if args.out else _latest_run()
        config = _config_for_resume(out, args, overrides)
    else:
        config = _fresh_config(args, overrides)
        out = Path(args.out) if args.out else None
        if out is not None:
            check_out_dir(out)
    _require_torchrun(config, args.command)
    plan_cli.check_gpu(getattr(args, "plan_gpu", None))

    from fp8train.lab.compare import run_all  # torch is imported only from here on

    main_rank = True
    errors: Any = contextlib.nullcontext()
    lost_peer: tuple[type[Exception], ...] = ()  # caught below; nothing without --dist
    if config.dist is not None:
        from fp8train import distributed as fd

        out = _join_process_group(config, out, args.resume)
        main_rank, errors = fd.is_main(), fd.collective_errors()
        lost_peer = (fd.RankFailureError,)
    out = out if out is not None else _new_out_dir()

    resume_hint = f"{PROG} {args.command} --resume --out {out}"
    if config.dist is not None:
        resume_hint = f"torchrun --nproc-per-node N -m {resume_hint}"
    try:
        with errors:
            results = run_all(
                config,
                out,
                command=args.command,
                resume=args.resume,
                stop_at=args.stop_at,
                only_seeds=_only_seeds(args.only_seeds, config),
                quiet=args.quiet,
            )
    except KeyboardInterrupt:
        sys.stderr.write(
            f"{PROG}: interrupted; continue from the last checkpoint with: {resume_hint}\n"
        )
        return 130
    except lost_peer as e:
        raise _RankFailed(str(e)) from None
    if not main_rank:
        return 0
    if results is None:
        if args.only_seeds is not None:
            print(f"trained seeds {args.only_seeds}; once every seed has: {resume_hint}")
        else:
            print(f"stopped after step {args.stop_at}; continue with: {resume_hint}")
        return 0
    for precision, run in results["runs"].items():
        loss = run["final_val_loss"]
        shown = "diverged" if loss is None else f"{loss:.4f}"
        print(f"{precision:>10}  val loss {shown}  {run['verdict']}")
    if getattr(args, "plan_gpu", None):
        plan_cli.append_to_report(out, config, args.plan_gpu)
    print(f"wrote {out / 'results.json'}, {out / 'loss_curves.png'}, {out / 'report.md'}")
    return 0


def _only_seeds(text: str | None, config: LabConfig) -> tuple[int, ...] | None:
    """``--only-seeds "1,2"`` -> (1, 2), each one of the run's seeds."""
    if text is None:
        return None
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise LabError(
            f"--only-seeds takes seeds separated by commas, e.g. 1,2; got {text!r}"
        ) from None
    outside = [s for s in seeds if s not in config.seed_list]
    if outside:
        raise LabError(
            f"--only-seeds {text}: {outside} not among the run's seeds {config.seed_list} "
            "(--seed and --seeds set them)"
        )
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except LabError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        code = 2
    except _RankFailed as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        code = 1
    except KeyboardInterrupt:  # before any run started: nothing to resume
        sys.stderr.write(f"{PROG}: interrupted\n")
        code = 130
    # Here, outside the handlers, the error's traceback no longer holds the models.
    _leave_process_group()
    return code
