"""Train-step time and saved-for-backward bytes of the lab's reference GPT, per precision.

    python benchmarks/train_step.py [--steps 30] [--warmup 5] [--kernels compiled]

Every precision gets its own model (same initial weights) and optimizer; steps run
interleaved (A B C ... A B C ...) in one process so that machine noise hits all of them
alike; the median step after warm-up is reported with its ratio to bf16 autocast.
Saved bytes: tensors saved for backward in one step, each storage counted once, the
model's parameters excluded (fp8train.lab.train.SavedTensorBytes). ``<recipe>+fp8act``
also stores the other saved activations in FP8 (fp8train.Fp8SavedActivations).

Breakdown: each precision's steps are also profiled (torch.profiler, self CPU time per
op over a few steps) and the time is sorted into GEMMs, attention, the fused FP8
kernels, compiled-call dispatch (dynamo's guards and wrappers; near zero since the
kernels are called without torch.compile, their remaining wrappers count as the FP8
autograd function's Python), the FP8 autograd function's Python, and everything else,
so the gap to bf16 has a measured cause.
``bf16-fp32gemm``: bf16 autocast with every Linear's GEMMs multiplied in fp32 on the
bf16-rounded operands (one bf16 rounding of the result: a bf16 GEMM's arithmetic up to
summation order). Where bf16 GEMMs have no hardware (AVX2-only CPUs, and AVX-512 ones
without bf16 instructions, fp8train.matmul.bf16_gemm_is_native) this is the bf16
step as it would run if its GEMMs were as fast as the ones the FP8 emulation runs
there (fp32), with everything else (attention, GELU, LayerNorm) in bf16 as in every
FP8 run: the baseline that isolates FP8's own cost on such a CPU, and the one the
step-time verdict reads there. It is a benchmark baseline only (not a lab precision).
``--compile-model`` wraps every precision's model, bf16's too, in ``torch.compile``
(each FP8 layer stays a graph break: see fp8train/autograd.py), to show what compiling
the rest of the model (LayerNorm, attention, GELU) does to the ratio; a
``bf16-uncompiled`` row is added to compare with the plain run.
``--untimed bf16`` counts bf16's saved bytes (one step) without timing its steps: at
d512 on a CPU without bf16 GEMMs a bf16 step takes over a minute.
Results: benchmarks/results/train_step.json (``-d<width>`` for another d_model,
``-compile-model`` with that flag).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common

import fp8train
from fp8train.lab.gpt import GPT
from fp8train.lab.train import SavedTensorBytes
from fp8train.matmul import bf16_gemm_is_native
from fp8train.nn import _set_submodule

# The lab's default preset (fp8train.lab.config.LabConfig).
SHAPE = {"vocab": 256, "seq": 128, "d_model": 128, "layers": 4, "heads": 4}
BATCH = 16


# Profiler op names -> breakdown category (first match wins; the rest is "other").
CATEGORIES = [
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")),
    ("attention", ("scaled_dot_product",)),
    ("fp8 kernels (compiled)", ("CompiledFxGraph",)),
    (
        "compiled-call dispatch",
        ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher"),
    ),
    ("fp8 autograd python", ("_Fp8Linear",)),
]


class Bf16LinearFp32Gemm(nn.Module):
    """An ``nn.Linear`` whose GEMMs, under bf16 autocast, take the bf16-rounded input,
    weight and bias in fp32 and round the result to bf16 once (autograd's backward of
    the casts rounds dx and dW to bf16 the same way): a bf16 layer on fp32 GEMMs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return nn.functional.linear(x, self.weight, self.bias)
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            y = nn.functional.linear(
                x.to(bf16).float(),
                self.weight.to(bf16).float(),
                None if self.bias is None else self.bias.to(bf16).float(),
            )
        return y.to(bf16)


def with_fp32_gemms(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` swapped for :class:`Bf16LinearFp32Gemm`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            _set_submodule(model, name, Bf16LinearFp32Gemm(module))
    return model


def breakdown(step, steps: int = 3) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Self CPU milliseconds per step, by category (sums to the profiled step)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    out = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for evt in prof.key_averages():
        cat = next((name for name, keys in CATEGORIES if any(k in evt.key for k in keys)), "other")
        out[cat] += evt.self_cpu_time_total / 1e3 / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kernels", choices=["eager", "compiled"], default="compiled")
    parser.add_argument(
        "--precisions",
        default=",".join(
            [
                "bf16",
                "fp32",
                *([] if bf16_gemm_is_native("cpu") else ["bf16-fp32gemm"]),
                *fp8train.RECIPE_NAMES,
                *(r + "+fp8act" for r in ("tensorwise", "rowwise", "blockwise", "mxfp8")),
            ]
        ),
    )
    parser.add_argument("--d-model", type=int, default=SHAPE["d_model"])
    parser.add_argument(
        "--compile-model",
        action="store_true",
        help="run every model (bf16 too) under torch.compile",
    )
    parser.add_argument(
        "--untimed",
        default="",
        help="precisions (comma-separated, among --precisions) whose saved "
        "bytes are counted (one step) but whose step is not timed: bf16 "
        "at d512 on a CPU without bf16 GEMMs, where a step takes minutes",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    untimed = [p for p in args.untimed.split(",") if p]
    if unknown := [p for p in untimed if p not in precisions]:
        parser.error(f"--untimed {','.join(unknown)}: not among --precisions")
    if args.compile_model and "bf16-uncompiled" not in precisions:
        precisions.append("bf16-uncompiled")
    shape = {**SHAPE, "d_model": args.d_model}

    torch.manual_seed(0)
    base = GPT(**shape)
    idx = torch.randint(0, 256, (BATCH, shape["seq"] + 1))
    runs = {}
    storage = {}
    for p in precisions:
        model = copy.deepcopy(base)
        recipe = p.removesuffix("+fp8act")
        if recipe == "bf16-fp32gemm":
            with_fp32_gemms(model)
        elif recipe not in ("bf16", "fp32", "bf16-uncompiled"):
            fp8train.convert(model, recipe, kernels=args.kernels)
        if p.endswith("+fp8act"):
            storage[p] = fp8train.Fp8SavedActivations(recipe, kernels=args.kernels)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        compiled = args.compile_model and p != "bf16-uncompiled"
        runs[p] = (torch.compile(model) if compiled else model, opt, model)

    def step(p: str, counter: SavedTensorBytes | None = None) -> float:
        model, opt, _ = runs[p]
        store = storage.get(p)
        if store is not None:
            store.observer = counter.pack if counter is not None else None
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p != "fp32"):
            hooks = (
                torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)
                if counter is not None
                else contextlib.nullcontext()
            )
            with hooks, store if store is not None else contextlib.nullcontext():
                logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    saved = {}
    for p in precisions:
        counter = SavedTensorBytes(runs[p][2].parameters())
        step(p, counter)  # also the first warm-up step (compiles the kernels)
        saved[p] = counter.total
    timed = [p for p in precisions if p not in untimed]
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for i in range(args.warmup + args.steps):
        for p in timed:
            dt = step(p)
            if i >= args.warmup:
                times[p].append(dt)

    profiles = {p: breakdown(lambda p=p: step(p)) for p in timed}
    ref = "bf16" if "bf16" in precisions else precisions[0]  # saved bytes' reference
    # The speed target's baseline: bf16, as issue 6 states it, where bf16 GEMMs have
    # hardware. Where they do not, a bf16 step is 3x (AVX-512 without bf16 instructions)
    # to tens of times (AVX2) slower than fp32 and every FP8 ratio to it is met
    # trivially, so the verdict reads the
    # target against bf16 on fp32 GEMMs (bf16-fp32gemm, the module docstring), else
    # fp32; every ratio is kept.
    speed_ref = ref if ref in timed else timed[0]
    if not bf16_gemm_is_native("cpu"):
        speed_ref = next((b for b in ("bf16-fp32gemm", "fp32") if b in timed), speed_ref)
    bases = [b for b in dict.fromkeys([ref, "fp32", speed_ref]) if b in timed]
    med = {p: statistics.median(times[p]) for p in timed}
    results = {}
    rows = []
    for p in precisions:
        r: dict = {"median_step_s": med.get(p)}  # type: ignore[type-arg]  # None: untimed
        if p in med:
            r.update({f"step_time_vs_{b}": med[p] / med[b] for b in bases})
        r.update(saved_activation_bytes=saved[p], saved_bytes_vs_bf16=saved[p] / saved[ref])
        if p in med:
            r["profiled_ms_per_step"] = profiles[p]
            r.update(
                {
                    f"extra_ms_vs_{b}_by_category": {
                        k: profiles[p][k] - profiles[b][k] for k in profiles[p]
                    }
                    for b in bases
                }
            )
        r["times_s"] = times[p]
        results[p] = r
        steps = (
            (f"{med[p] * 1e3:.1f}", *(f"{med[p] / med[b]:.2f}" for b in bases))
            if p in med
            else ("untimed", *("-" for _ in bases))
        )
        rows.append((p, *steps, saved[p], f"{saved[p] / saved[ref]:.2f}"))
    targets = {
        "step_time_vs_bf16_max": 1.15,
        "saved_bytes_vs_bf16_max": 0.6,
        "recipes_with_speed_target": ["tensorwise", "rowwise", "blockwise", "mxfp8"],
    }
    print(
        _common.format_table(
            [
                "precision",
                "median step ms",
                *(f"vs {b}" for b in bases),
                "saved bytes",
                "saved vs bf16",
            ],
            rows,
        )
    )
    cats = list(profiles[speed_ref])
    print("\nprofiled self CPU ms per step, by category")
    print(
        _common.format_table(
            ["precision", *cats], [(p, *(f"{profiles[p][c]:.1f}" for c in cats)) for p in timed]
        )
    )
    verdict = target_verdict(targets, results, speed_ref, ref)
    print("\n" + "\n".join(verdict["lines"]))
    if not args.no_write:
        # The default preset keeps the plain name; other widths get their own file.
        name = "train_step" if shape == SHAPE else f"train_step-d{shape['d_model']}"
        name += "-compile-model" if args.compile_model else ""
        path = _common.write_results(
            name,
            {
                "config": {
                    "model": shape,
                    "batch": BATCH,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "kernels": args.kernels,
                    "compile_model": args.compile_model,
                    "untimed": untimed,
                    "threads": torch.get_num_threads(),
                },
                "targets": targets,
                "speed_target_baseline": speed_ref,
                "verdict": verdict,
                "results": results,
            },
        )
        print(f"wrote {path}")


def target_verdict(
    targets: dict,
    results: dict,
    speed_ref: str,  # type: ignore[type-arg]
    bytes_ref: str,
) -> dict:  # type: ignore[type-arg]
    """Each target met or missed, by how much, and the measured extra time per category
    (the cause) for every recipe that misses the step-time target. Step times are read
    against ``speed_ref``, saved bytes against ``bytes_ref``."""
    limit = targets["step_time_vs_bf16_max"]
    speed = {}
    lines = []
    if speed_ref != bytes_ref:
        lines.append(
            f"bf16 GEMMs have no hardware on this CPU: the step-time target is read "
            f"against {speed_ref}, whose GEMMs run in fp32 as the FP8 emulation's do"
        )
    for p in targets["recipes_with_speed_target"]:
        if p not in results or results[p]["median_step_s"] is None:  # absent or untimed
            continue
        r = results[p]
        ratio = r[f"step_time_vs_{speed_ref}"]
        extra = {
            k: round(v, 1)
            for k, v in sorted(
                r[f"extra_ms_vs_{speed_ref}_by_category"].items(), key=lambda kv: -kv[1]
            )
        }
        speed[p] = {
            "baseline": speed_ref,
            "step_time_vs_baseline": ratio,
            "met": ratio <= limit,
            "over_target_by": max(0.0, ratio - limit),
            "extra_ms_vs_baseline_by_category": extra,
        }
        cause = ", ".join(f"{k} {v:+.1f} ms" for k, v in extra.items() if abs(v) >= 1)
        lines.append(
            f"{p}: step {ratio:.2f}x {speed_ref} (target <= {limit}): "
            + ("met" if ratio <= limit else f"missed by {ratio - limit:.2f}; {cause}")
        )
    ref = bytes_ref
    bytes_limit = targets["saved_bytes_vs_bf16_max"]
    saved = {
        p: r["saved_bytes_vs_bf16"]
        for p, r in results.items()
        if p not in (ref, "fp32", "bf16-fp32gemm")
    }
    meeting = sorted(p for p, v in saved.items() if v <= bytes_limit)
    lines.append(
        f"saved bytes <= {bytes_limit} of {ref}: "
        + (
            f"met by {', '.join(meeting)}"
            if meeting
            else f"missed; best {min(saved.values()):.2f}"
            if saved
            else "not measured"
        )
    )
    return {"speed": speed, "saved_bytes_meeting_target": meeting, "lines": lines}


if __name__ == "__main__":
    main()
