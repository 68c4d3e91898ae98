"""Where an FP8 step's extra time comes from: a fixed cost per layer step, or work that
grows with the tokens; and what a short op costs on this machine after Python ran.

    python benchmarks/fixed_cost.py [--steps 40] [--warmup 8]

Part 1, tokens: the lab's reference GPT (train_step.py's shape) at batch 1 and batch 16
(128 and 2048 tokens), every precision's steps interleaved in one process, median of
``--steps`` after ``--warmup``. A line through the two points splits each FP8 recipe's
extra time over the baseline (bf16 on fp32 GEMMs where bf16 GEMMs have no hardware,
else bf16; see train_step.py) into a part that does not depend on the tokens (Python,
kernel calls, OpenMP fork/join: paid per FP8 layer step) and a part that grows with
them (the passes over the tensors). The fixed part is also given per FP8 layer step.

Part 2, the machine: one op timed back to back (the way a microbenchmark times it) and
after a Python busy-wait of 0.5 and 2 ms (the way a training step calls it: layers'
Python runs between the ops): an eager in-place add over 1 MiB, on one thread and on
all, and one compiled FP8 kernel call (the rowwise backward of the GPT's fc2 layer,
2048 tokens). If the op slows down after Python ran, the kernels' time in a step is
larger than in a tight loop for a reason that has nothing to do with FP8, and a step
with more separate kernel calls pays it more often.

Part 3, the pieces: at 8 tokens (batch 1, seq 8), where the fixed cost is most of an
FP8 layer step, the step is timed with the FP8 autograd function's forward and backward,
its ``scaled_mm`` calls and its compiled kernel calls each wrapped in a timer: the rest
of forward + backward is the function's own Python and eager ops.

Results: benchmarks/results/fixed_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common
from train_step import BATCH, SHAPE, with_fp32_gemms

import fp8train
from fp8train._kernels import Kernels
from fp8train.lab.gpt import GPT
from fp8train.matmul import bf16_gemm_is_native
from fp8train.recipes import Recipe

RECIPES = ("tensorwise", "rowwise", "blockwise", "mxfp8")
BATCHES = (1, BATCH)  # 128 and 2048 tokens at seq 128


def make_step(model: nn.Module, idx: torch.Tensor, autocast: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, SHAPE["vocab"]), idx[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


def step_times(precisions: list[str], baseline: str, steps: int, warmup: int) -> dict[str, Any]:
    """Median step per precision and batch, and the split of each recipe's extra time."""
    torch.manual_seed(0)
    base = GPT(**SHAPE)
    models, fp8_layers = {}, {}
    for p in precisions:
        model = copy.deepcopy(base)
        if p == "bf16-fp32gemm":
            with_fp32_gemms(model)
        elif p not in ("bf16", "fp32"):
            fp8train.convert(model, p, kernels="compiled")
        models[p] = model
        fp8_layers[p] = sum(isinstance(m, fp8train.Fp8Linear) for m in model.modules())
    out: dict[str, Any] = {"tokens": {}, "median_step_ms": {}}
    for batch in BATCHES:
        idx = torch.randint(0, SHAPE["vocab"], (batch, SHAPE["seq"] + 1))
        fns = [make_step(models[p], idx, p != "fp32") for p in precisions]
        timings = _common.time_interleaved(fns, warmup=warmup, repeats=steps)
        tokens = batch * SHAPE["seq"]
        out["tokens"][batch] = tokens
        out["median_step_ms"][batch] = {
            p: t["median_s"] * 1e3 for p, t in zip(precisions, timings, strict=False)
        }
    (b0, b1) = BATCHES
    t0, t1 = out["tokens"][b0], out["tokens"][b1]
    split = {}
    for p in precisions:
        if p not in RECIPES:
            continue
        extra = {
            b: out["median_step_ms"][b][p] - out["median_step_ms"][b][baseline] for b in BATCHES
        }
        per_token = (extra[b1] - extra[b0]) / (t1 - t0)
        fixed = extra[b0] - per_token * t0
        split[p] = {
            "extra_ms": {str(b): extra[b] for b in BATCHES},
            "fixed_ms_per_step": fixed,
            "fixed_ms_per_fp8_layer_step": fixed / fp8_layers[p],
            "fp8_layers": fp8_layers[p],
            f"growing_ms_at_{t1}_tokens": per_token * t1,
            f"fixed_share_of_extra_at_{t1}_tokens": fixed / extra[b1] if extra[b1] else None,
        }
    out["baseline"] = baseline
    out["split"] = split
    return out


@contextlib.contextmanager
def timing_pieces(acc: dict[str, float]) -> Iterator[None]:
    """Wrap the FP8 layer's forward, backward, scaled_mm calls and compiled kernel calls
    in timers adding to ``acc`` (seconds); restored on exit."""
    from fp8train import autograd
    from fp8train._kernels import capture

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    fn_cls = autograd._Fp8Linear
    saved = (
        autograd.scaled_mm,
        fn_cls.__dict__["forward"],
        fn_cls.__dict__["backward"],
        capture._StandaloneCompiled.__call__,
    )
    autograd.scaled_mm = timed("scaled_mm", autograd.scaled_mm)
    fn_cls.forward = staticmethod(timed("forward", saved[1].__func__))
    fn_cls.backward = staticmethod(timed("backward", saved[2].__func__))
    capture._StandaloneCompiled.__call__ = timed("kernel calls", saved[3])
    try:
        yield
    finally:
        autograd.scaled_mm = saved[0]
        fn_cls.forward, fn_cls.backward = saved[1], saved[2]
        capture._StandaloneCompiled.__call__ = saved[3]


def pieces(steps: int, warmup: int) -> dict[str, Any]:
    """Per FP8 layer step at 8 tokens, microseconds: forward + backward, its kernel calls,
    its scaled_mm calls and the rest (the autograd function's own Python and eager ops)."""
    out = {}
    shape = {**SHAPE, "seq": 8}
    for recipe in RECIPES:
        torch.manual_seed(0)
        model = fp8train.convert(GPT(**shape), recipe, kernels="compiled")
        layers = sum(isinstance(m, fp8train.Fp8Linear) for m in model.modules())
        step = make_step(model, torch.randint(0, shape["vocab"], (1, shape["seq"] + 1)), True)
        for _ in range(warmup):
            step()
        acc: dict[str, float] = {}
        with timing_pieces(acc):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            total = time.perf_counter() - t0
        per = {k: v / steps / layers * 1e6 for k, v in acc.items()}
        layer = per["forward"] + per["backward"]
        out[recipe] = {
            "step_ms": total / steps * 1e3,
            "fp8_layers": layers,
            "fp8_layer_step_us": layer,
            "kernel_calls_us": per["kernel calls"],
            "scaled_mm_us": per["scaled_mm"],
            "rest_us": layer - per["kernel calls"] - per["scaled_mm"],
        }
    return out


def busy_wait(seconds: float) -> Callable[[], None]:
    def wait() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass

    return wait


def after_python(op: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median microseconds of ``op`` back to back and after 0.5 / 2 ms of Python."""
    out = {}
    befores: dict[str, Callable[[], None]] = {
        "back_to_back": busy_wait(0.0),
        "after_0.5ms_python": busy_wait(5e-4),
        "after_2ms_python": busy_wait(2e-3),
    }
    for label, before in befores.items():
        for _ in range(10):
            before()
            op()
        times = []
        for _ in range(repeats):
            before()
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times) * 1e6
    return out


def gap_penalty(repeats: int) -> dict[str, Any]:
    threads = torch.get_num_threads()
    y = torch.randn(512, 512)  # 1 MiB of fp32
    out: dict[str, Any] = {}
    try:
        torch.set_num_threads(1)
        out["eager add_ 1 MiB, 1 thread"] = after_python(lambda: y.add_(0.0), repeats)
    finally:
        torch.set_num_threads(threads)
    out[f"eager add_ 1 MiB, {threads} threads"] = after_python(lambda: y.add_(0.0), repeats)
    # The rowwise backward of fc2 (512 -> 128) at 2048 tokens, as _Fp8Linear.backward
    # calls its kernels: dy by rows and by columns, the weight and the saved input by
    # columns, one call each.
    r = Recipe.from_name("rowwise")
    dy = torch.randn(2048, 128).bfloat16()
    weight = torch.randn(128, 512)
    x = torch.randn(2048, 512).bfloat16()
    specs = (r.grad_output, r.weight.transposed(), r.grad_output.transposed(), r.input.transposed())
    operands = tuple(zip((dy, weight, dy, x), specs, strict=True))
    kernels = Kernels("compiled")

    def backward_calls() -> None:
        for t, spec in operands:
            kernels.quantize_current(t, spec, torch.float32, False)

    out["compiled rowwise backward calls, fc2 at 2048 tokens"] = after_python(
        backward_calls, repeats
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200, help="part 2's timings per op")
    parser.add_argument("--pieces-steps", type=int, default=100, help="part 3's timed steps")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    baseline = "bf16" if bf16_gemm_is_native("cpu") else "bf16-fp32gemm"
    precisions = [baseline, "fp32", *RECIPES]

    steps = step_times(precisions, baseline, args.steps, args.warmup)
    b0, b1 = BATCHES
    print(
        _common.format_table(
            ["precision", *(f"step ms, {steps['tokens'][b]} tokens" for b in BATCHES)],
            [(p, *(f"{steps['median_step_ms'][b][p]:.1f}" for b in BATCHES)) for p in precisions],
        )
    )
    t1 = steps["tokens"][b1]
    print(f"\nextra over {baseline}, split by a line through the two token counts")
    print(
        _common.format_table(
            [
                "recipe",
                f"extra ms, {steps['tokens'][b0]}",
                f"extra ms, {t1}",
                "fixed ms/step",
                "fixed ms/FP8 layer step",
                f"growing ms at {t1}",
                f"fixed share at {t1}",
            ],
            [
                (
                    p,
                    f"{s['extra_ms'][str(b0)]:.1f}",
                    f"{s['extra_ms'][str(b1)]:.1f}",
                    f"{s['fixed_ms_per_step']:.1f}",
                    f"{s['fixed_ms_per_fp8_layer_step']:.2f}",
                    f"{s[f'growing_ms_at_{t1}_tokens']:.1f}",
                    f"{s[f'fixed_share_of_extra_at_{t1}_tokens']:.2f}",
                )
                for p, s in steps["split"].items()
            ],
        )
    )

    gaps = gap_penalty(args.repeats)
    print("\nmedian us of one op, back to back and after Python ran")
    print(
        _common.format_table(
            ["op", "back to back", "after 0.5 ms", "after 2 ms"],
            [(op, *(f"{v:.0f}" for v in t.values())) for op, t in gaps.items()],
        )
    )
    parts = pieces(args.pieces_steps, args.warmup)
    print("\nat 8 tokens, per FP8 layer step (us): the pieces of forward + backward")
    print(
        _common.format_table(
            ["recipe", "step ms", "layer step", "kernel calls", "scaled_mm", "rest"],
            [
                (
                    p,
                    f"{v['step_ms']:.1f}",
                    f"{v['fp8_layer_step_us']:.0f}",
                    f"{v['kernel_calls_us']:.0f}",
                    f"{v['scaled_mm_us']:.0f}",
                    f"{v['rest_us']:.0f}",
                )
                for p, v in parts.items()
            ],
        )
    )
    if not args.no_write:
        path = _common.write_results(
            "fixed_cost",
            {
                "config": {
                    "model": SHAPE,
                    "batches": list(BATCHES),
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "pieces_steps": args.pieces_steps,
                    "threads": torch.get_num_threads(),
                },
                "steps": steps,
                "op_after_python_us": gaps,
                "pieces_at_8_tokens": parts,
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
