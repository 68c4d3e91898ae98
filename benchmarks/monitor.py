"""Cost of ``fp8train.monitor.Monitor`` on the lab GPT's training step (tensorwise).

The lab's default GPT (d_model 128, 4 layers, 4 heads, context 128, batch 16; 17 FP8
linears) trains under CPU bf16 autocast with the ``tensorwise`` recipe, dynamic loss
scaling, gradient clipping and AdamW, as ``fp8train.lab.train`` does. One timed step is
batch sampling through ``zero_grad`` plus ``monitor.step(...)`` when a monitor is
attached (``loss.item()`` in every variant). Four variants, interleaved round by round
in a rotating order so that drift in machine load hits them alike:

* ``base``     -- no monitor attached;
* ``off``      -- a monitor attached, on a step outside its interval (no observer);
* ``observed`` -- a monitor observing the step (every operand of every layer);
* ``shadow``   -- the optional BF16 shadow check alone (``shadow_every``).

The cost at an interval ``N`` is what one observed step and ``N - 1`` off steps add
to ``N`` plain steps, from the medians::

    overhead(N) = ((observed - base) + (N - 1) * (off - base)) / (N * base)

Run: ``python benchmarks/monitor.py`` (writes ``benchmarks/results/monitor.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_results

import fp8train
from fp8train.lab.config import LabConfig
from fp8train.lab.data import load_corpus, sample_windows
from fp8train.lab.gpt import GPT
from fp8train.lab.train import make_optimizer
from fp8train.monitor import DEFAULT_EVERY, HealthWarning, Monitor

VARIANTS = ("base", "off", "observed", "shadow")
INTERVALS = (1, 5, 10, 25, 50, 100)
BUDGET = 0.05  # the limit: at most 5% of step time at the default interval


def setup(cfg: LabConfig) -> dict[str, Any]:
    torch.manual_seed(0)
    corpus = load_corpus(None, corpus_mb=1.0, val_fraction=cfg.val_fraction, seq=cfg.seq)
    model = fp8train.convert(
        GPT(seq=cfg.seq, d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads), "tensorwise"
    )
    model.train()
    return {
        "corpus": corpus,
        "model": model,
        "optimizer": make_optimizer(model, cfg),
        "scaler": fp8train.LossScaler(mode="dynamic"),
        "gen": torch.Generator().manual_seed(0),
        "layers": sum(1 for _ in fp8train.nn.fp8_layers(model)),
    }


def model_info(cfg: LabConfig, s: dict[str, Any]) -> dict[str, Any]:
    """What a results file says about the model :func:`setup` built."""
    return {
        "task": "lab GPT",
        "recipe": "tensorwise",
        "d_model": cfg.d_model,
        "layers": cfg.layers,
        "heads": cfg.heads,
        "seq": cfg.seq,
        "batch": cfg.batch,
        "fp8_linears": s["layers"],
        "autocast": "bf16",
    }


def _step(s: dict[str, Any], cfg: LabConfig, monitor: Monitor | None) -> float:
    """One lab training step; returns its wall time."""
    model, opt, scaler = s["model"], s["optimizer"], s["scaler"]
    t0 = time.perf_counter()
    x, y = sample_windows(s["corpus"].train, cfg.batch, cfg.seq, s["gen"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())  # (b*t, vocab)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    loss_value = loss.item()
    if monitor is not None:
        monitor.step(
            loss_value,
            grad_norm=grad_norm,
            loss_scale=scaler.get_scale(),
            skipped=scaler.last_step_skipped,
        )
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=30, help="timed steps per variant (one per round)"
    )
    parser.add_argument("--warmup", type=int, default=4, help="untimed rounds first")
    args = parser.parse_args(argv)

    cfg = LabConfig()
    s = setup(cfg)
    monitors: dict[str, Monitor | None] = {
        "base": None,
        # every=1: each step is observed. start=1 with a huge interval: never observed.
        "observed": Monitor(s["model"], every=1),
        "off": Monitor(s["model"], every=10**9, start=1),
        "shadow": Monitor(s["model"], every=10**9, start=1, shadow_every=1),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    # A warning on an off-interval step makes the next step observed; such a step is not
    # an "off" (or "shadow") sample, so it is left out and counted.
    excluded = {v: 0 for v in VARIANTS}
    warnings.simplefilter("ignore", HealthWarning)  # the monitors keep them; we only time
    for r in range(args.warmup + args.rounds):
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:  # rotate the order every round
            mon = monitors[variant]
            if mon is not None:
                mon.attach()
            forced = variant in ("off", "shadow") and mon is not None and mon.observing
            dt = _step(s, cfg, mon)
            if mon is not None:
                mon.detach()
            if r >= args.warmup:
                if forced:
                    excluded[variant] += 1
                else:
                    times[variant].append(dt)
    for mon in monitors.values():
        if mon is not None:
            mon.close()

    med = {v: statistics.median(t) for v, t in times.items()}
    base = med["base"]

    def overhead(n: int) -> float:
        return ((med["observed"] - base) + (n - 1) * (med["off"] - base)) / (n * base)

    per_interval = {n: overhead(n) for n in INTERVALS}
    default = overhead(DEFAULT_EVERY)
    payload = {
        "benchmark": "monitor",
        "model": model_info(cfg, s),
        "rounds": args.rounds,
        "excluded_forced_observations": excluded,
        "warnings_seen": {v: len(m.warnings) for v, m in monitors.items() if m is not None},
        "warmup_rounds": args.warmup,
        "median_step_s": med,
        "min_step_s": {v: min(t) for v, t in times.items()},
        "times_s": times,
        "observed_step_ratio": med["observed"] / base,
        "off_step_ratio": med["off"] / base,
        "shadow_step_ratio": med["shadow"] / base,
        "overhead_at_interval": {str(n): o for n, o in per_interval.items()},
        "default_every": DEFAULT_EVERY,
        "overhead_at_default": default,
        "budget": BUDGET,
        "within_budget": default <= BUDGET,
        "formula": "((observed - base) + (N - 1) * (off - base)) / (N * base), medians",
    }
    path = write_results("monitor", payload)
    rows = [[v, med[v] * 1e3, min(times[v]) * 1e3, med[v] / base] for v in VARIANTS]
    print(format_table(["variant", "median ms", "min ms", "x base"], rows))
    print()
    print(format_table(["every", "overhead %"], [[n, 100 * o] for n, o in per_interval.items()]))
    print(
        f"\ndefault every={DEFAULT_EVERY}: {100 * default:.2f}% of step time "
        f"(budget {100 * BUDGET:.0f}%: {'ok' if default <= BUDGET else 'EXCEEDED'})"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
