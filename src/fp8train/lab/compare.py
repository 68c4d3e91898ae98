"""Run every precision over every seed, pair them, and judge the gaps honestly.

Runs are paired: for one seed, every precision starts from the same weights and sees
the same batches, so the per-seed gap ``100 * (loss_p - loss_bf16) / loss_bf16`` holds
no seed-to-seed noise from initialisation or data order, only what the arithmetic
changes (and how chaotic training amplifies it). Over ``seeds`` such gaps we report
the mean and its standard error. A verdict words the gap as strongly as its size in
noise units allows (``fp8train.lab.verdicts``): standard errors with several seeds;
with one seed there is no standard error, and the fp32-vs-bf16 gap of that seed is the
noise floor instead.

With ``config.dist`` every rank runs ``run_all`` (under torchrun, in a process group the
CLI has joined); every rank trains, and only the main rank writes files and shows
progress.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fp8train import distributed as fd
from fp8train.checkpoint import atomic_write_bytes
from fp8train.lab import train as lab_train
from fp8train.lab.config import LabConfig, LabError, from_dict, trains_alike
from fp8train.lab.data import load_corpus, load_digits
from fp8train.lab.verdicts import CLAIM_SE, verdict
from fp8train.matmul import bf16_gemm_is_native

__all__ = ["CLAIM_SE", "SCHEMA_VERSION", "run_all", "summarize", "verdict", "versions"]

# Bumped when results.json changes shape.
SCHEMA_VERSION = 1


def versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fp8train": lab_train._fp8train_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Whether bf16 GEMMs have hardware here: without it bf16 steps are slow and the
        # FP8 emulation multiplies in fp32 (fp8train.matmul.gemm_dtype).
        "bf16_gemm_native": bf16_gemm_is_native("cpu"),
    }


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: a diverged number is written as null."""
    return x if x is not None and math.isfinite(x) else None


def _load_task(config: LabConfig) -> tuple[lab_train.Task, dict[str, Any]]:
    if config.task == "digits":
        if config.data is not None:
            raise LabError(
                "--data applies to the gpt task; --task digits uses scikit-learn's digits"
            )
        digits = load_digits(test_fraction=config.val_fraction)
        return lab_train.digits_task(config, digits), digits.describe()
    corpus = load_corpus(
        config.data, corpus_mb=config.corpus_mb, val_fraction=config.val_fraction, seq=config.seq
    )
    return lab_train.gpt_task(config, corpus), corpus.describe()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


# Created with O_EXCL by the run that starts in a folder, before it writes anything there:
# of two runs started into one --out, exactly one creates it (the file system decides),
# and the other stops. A resumed run continues the folder that holds it.
CLAIM_NAME = ".fp8train-run"


def claim_out_dir(out: Path) -> None:
    """Make ``out`` (creating it) the folder of this new run, atomically; ``LabError``
    (one line) if another run holds it or has claimed it first."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd_ = os.open(out / CLAIM_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            owner = (out / CLAIM_NAME).read_text().strip()
        except OSError:
            owner = ""
        by = f" (claimed by {owner})" if owner else ""
        raise LabError(
            f"{out} already holds a run{by}; add --resume to continue it, or pick another --out"
        ) from None
    except OSError as e:  # e.g. --out /proc/x, a read-only disk, a file in the way
        why = e.strerror or str(e)
        raise LabError(f"--out {out}: cannot create the output folder: {why}") from e
    with os.fdopen(fd_, "w") as f:
        f.write(f"pid {os.getpid()} on {platform.node()}\n")
    if (out / "config.json").exists():  # a run from before claims were made
        (out / CLAIM_NAME).unlink()
        raise LabError(
            f"{out} already holds a run; add --resume to continue it, or pick another --out"
        )


def _load_range(records: dict[str, list[dict[str, Any]]]) -> list[float] | None:
    """The lowest and highest 1-minute load average any run's training sessions
    recorded (at their starts and ends), or None when none did."""
    loads = [
        x
        for rs in records.values()
        for r in rs
        for session in r["sessions"]
        for x in (session["load_1m_start"], session["load_1m_end"])
        if x is not None
    ]
    return [min(loads), max(loads)] if loads else None


def run_all(
    config: LabConfig,
    out: Path,
    *,
    command: str,
    resume: bool,
    stop_at: int | None = None,
    only_seeds: tuple[int, ...] | None = None,
    quiet: bool = False,
) -> dict[str, Any] | None:
    """Train every (seed, precision) of ``config`` into ``out``, then write
    ``results.json``, ``loss_curves.png`` and ``report.md``. Returns the results, or
    None when ``stop_at`` left runs unfinished (their checkpoints wait for --resume) or
    ``only_seeds`` (a subset of ``config.seed_list``, for processes sharing ``out``)
    trained only some seeds. Distributed (``config.dist``): every rank calls it; the
    main rank writes."""
    from fp8train.lab import report  # matplotlib only when a report is due

    report.require_plotting()
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        raise LabError("the lab needs rich and matplotlib: pip install 'fp8train[lab]'") from None

    config_path = out / "config.json"
    if resume and not config_path.exists():
        raise LabError(f"--resume: {out} holds no run (no config.json)")
    if not resume and config_path.exists():
        raise LabError(
            f"{out} already holds a run; add --resume to continue it, or pick another --out"
        )
    task, data_info = _load_task(config)
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        shapes = task.build_model()
    for precision in config.precisions:  # refuse now, not after some runs have trained
        lab_train.fp8_all_gather_for(config, precision)
        lab_train.require_fp8_layers(shapes, precision)
    if resume:
        saved = json.loads(config_path.read_text())
        if saved["data"]["sha256"] != data_info["sha256"]:
            raise LabError(
                f"the data changed since {out} started (sha256 {saved['data']['sha256'][:12]} "
                f"then, {data_info['sha256'][:12]} now); start a new run"
            )
    distributed = config.dist is not None
    if distributed:
        torch.distributed.barrier()  # every rank has checked config.json before it is written
    main = fd.is_main()
    saved_config = from_dict(saved["config"]) if resume else config
    if saved_config != config:
        # Grown by the resume (more precisions or seeds): later resumes continue this one.
        if not trains_alike(saved_config, config):
            raise LabError(f"--resume: {out} was made with another config")
        if main:
            _write_json(config_path, {**saved, "config": asdict(config)})
    if not resume:
        # The check above is early, not atomic: two runs started together both pass it.
        # The claim decides which one writes here; the other has written nothing.
        problem: str | None = None
        if main:
            try:
                claim_out_dir(out)
                _write_json(
                    config_path, {"command": command, "config": asdict(config), "data": data_info}
                )
            except LabError as e:
                problem = str(e)
            except OSError as e:  # e.g. a disk that fills up
                problem = f"--out {out}: cannot write {config_path.name}: {e.strerror or e}"
        if distributed:  # every rank stops, not only the one that claims
            shared = [problem]
            torch.distributed.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem is not None:
            raise LabError(problem)

    started = time.perf_counter()
    load_start = lab_train.loadavg_1m()
    records: dict[str, list[dict[str, Any]]] = {p: [] for p in config.precisions}
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>6}  val {task.fields[val]:>6}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=quiet or not main) as progress:
        seeds = [s for s in config.seed_list if only_seeds is None or s in only_seeds]
        for seed in seeds:  # seed-major: paired comparisons complete early
            for precision in config.precisions:
                bar = progress.add_task(
                    f"{precision} seed {seed}", total=config.steps, loss="-", val="-"
                )

                def on_step(step: int, loss: float, val: float | None, bar: Any = bar) -> None:
                    progress.update(bar, completed=step, loss=f"{loss:.3f}")
                    if val is not None:
                        progress.update(bar, val=f"{val:.3f}")

                # Distributed: a folder of torch.distributed.checkpoint checkpoints.
                suffix = ".dcp" if distributed else ".pt"
                ckpt = out / "checkpoints" / f"{precision}-seed{seed}{suffix}"
                record = lab_train.train_run(
                    config, task, precision, seed, ckpt, stop_at=stop_at, on_step=on_step
                )
                progress.update(bar, completed=record["steps_done"])
                records[precision].append(record)
    if not all(r["complete"] for rs in records.values() for r in rs):
        return None
    if len(seeds) < len(config.seed_list):  # the other seeds are another process's
        return None

    results = summarize(config, records)
    results.update(
        schema=SCHEMA_VERSION,
        command=command,
        config=asdict(config),
        versions=versions(),
        data=data_info,
        corpus_sha256=data_info["sha256"],
        wall_time_s=time.perf_counter() - started,
        # Step times on a shared machine are only as good as its idleness: the 1-minute
        # load average (runnable processes) before and after, to read them against.
        machine_load={"loadavg_1m_start": load_start, "loadavg_1m_end": lab_train.loadavg_1m()},
        # Runs resumed from another process's checkpoints: their step times were measured
        # there, under the load their sessions recorded (not this process's).
        runs_trained_elsewhere=sum(
            r["steps_this_process"] < r["steps_done"] for rs in records.values() for r in rs
        ),
        training_load_1m=_load_range(records),
        distributed=None
        if not distributed
        else {
            "mode": config.dist,
            "world_size": fd.world_size(),
            "backend": torch.distributed.get_backend(),
            # Precisions whose FSDP2 all-gathers carried FP8 weights (the others: fp32).
            "fp8_all_gather": [p for p, rs in records.items() if rs[0]["fp8_all_gather"]],
            # The dtype DDP's gradient buckets were averaged in (fp32: no hook).
            "grad_comm": config.grad_comm,
        },
    )
    # Key order of the file: context first, runs last.
    order = [
        "schema",
        "command",
        "task",
        "config",
        "versions",
        "data",
        "corpus_sha256",
        "seeds",
        "wall_time_s",
        "machine_load",
        "runs_trained_elsewhere",
        "training_load_1m",
        "distributed",
        "noise_floor",
        "runs",
    ]
    results = {k: results[k] for k in order}
    if main:
        _write_json(out / "results.json", results)
        report.write_report(results, out)
    return results


# ----------------------------------------------------------------------- statistics


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def _gap_pct(x: float, ref: float) -> float:
    return 100.0 * (x - ref) / ref


def summarize(config: LabConfig, records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Aggregate per-seed records into per-precision results with paired gaps to bf16."""
    bf16 = records.get("bf16")
    bf16_step = statistics.median(r["median_step_s"] for r in bf16) if bf16 else None
    runs: dict[str, Any] = {}
    for precision, recs in records.items():
        losses = [r["final_val_loss"] for r in recs]
        diverged = not all(math.isfinite(v) for v in losses)
        gap = gap_se = None
        gaps: list[float] = []
        if bf16 is not None and not diverged:
            gaps = [
                _gap_pct(r["final_val_loss"], b["final_val_loss"])
                for r, b in zip(recs, bf16, strict=False)
            ]
            if all(math.isfinite(g) for g in gaps):
                gap, gap_se = _mean_se(gaps)
        step_s = statistics.median(r["median_step_s"] for r in recs)
        run: dict[str, Any] = {
            "final_val_loss": _finite(statistics.fmean(losses)),
            "val_loss_gap_vs_bf16_pct": _finite(gap),
            "val_loss_gap_vs_bf16_se_pct": _finite(gap_se),
            "median_step_s": _finite(step_s),
            "step_time_vs_bf16": _finite(step_s / bf16_step) if bf16_step else None,
            "saved_activation_bytes": recs[0]["saved_activation_bytes"],
            "memory": recs[0].get("memory"),  # the first seed's ledger (lab.memory)
            "skipped_steps": sum(r["skipped_steps"] for r in recs),
            "loss_scaler": recs[0]["loss_scaler"],
            "converted_linears": recs[0]["converted_linears"],
            "diverged": diverged,
        }
        if config.task == "digits":
            acc = [r["final_metrics"].get("test_accuracy", math.nan) for r in recs]
            run["test_accuracy"] = _finite(statistics.fmean(acc))
            if bf16 is not None:
                d_acc = [
                    100.0 * (a - b["final_metrics"].get("test_accuracy", math.nan))
                    for a, b in zip(acc, bf16, strict=False)
                ]
                mean, se = _mean_se(d_acc)
                run["test_accuracy_gap_vs_bf16_pts"] = _finite(mean)
                run["test_accuracy_gap_vs_bf16_se_pts"] = _finite(se)
        run["curves"] = _mean_curves(recs)
        run["per_seed"] = [
            {
                "seed": r["seed"],
                "final_val_loss": _finite(r["final_val_loss"]),
                "val_loss_gap_vs_bf16_pct": _finite(g) if gaps else None,
                "median_step_s": _finite(r["median_step_s"]),
                "skipped_steps": r["skipped_steps"],
                "final_metrics": {k: _finite(v) for k, v in r["final_metrics"].items()},
                "curves": _clean_curves(r["curves"]),
                # A "+guard" run's policy, actions and demoted layers (lab.train).
                **({"guard": r["guard"]} if "guard" in r else {}),
            }
            for r, g in zip(recs, gaps or [math.nan] * len(recs), strict=False)
        ]
        runs[precision] = run

    floor = None
    if "fp32" in runs and bf16 is not None:
        floor = {
            "fp32_vs_bf16_gap_pct": runs["fp32"]["val_loss_gap_vs_bf16_pct"],
            "fp32_vs_bf16_se_pct": runs["fp32"]["val_loss_gap_vs_bf16_se_pct"],
        }
    for precision, run in runs.items():
        run["verdict"] = verdict(precision, run, floor, config.seeds)
    return {"task": config.task, "seeds": config.seed_list, "noise_floor": floor, "runs": runs}


def _clean_curves(curves: dict[str, list[float]]) -> dict[str, list[float | None]]:
    return {k: [_finite(float(v)) if "loss" in k else v for v in vs] for k, vs in curves.items()}


def _mean_curves(recs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Seed-averaged curves (every seed logs the same steps)."""
    first = recs[0]["curves"]
    out: dict[str, list[Any]] = {"train_step": first["train_step"], "val_step": first["val_step"]}
    for key in ("train_loss", "val_loss"):
        out[key] = [
            _finite(statistics.fmean(vals))
            for vals in zip(*(r["curves"][key] for r in recs), strict=False)
        ]
    return out
