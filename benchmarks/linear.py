"""One Linear layer's forward + backward: emulated FP8 against bf16 and torch._scaled_mm.

    python benchmarks/linear.py [--tokens 2048] [--repeats 5]

Shapes: square 1024, 2048, 4096 and a 4x MLP (d -> 4d). For each: bf16 autocast
``nn.Linear`` and fp32 ``nn.Linear``; the FP8 linear (tensorwise recipe) with eager and
compiled kernels; and the bare forward GEMM on the same quantised operands: bf16 and
fp32 ``torch.mm`` and fp8train's emulation (which multiplies in bf16 where bf16 GEMMs
have hardware and in fp32 where they do not, fp8train.matmul.gemm_dtype); and
``torch._scaled_mm`` on CPU, tensorwise and rowwise (the scales it takes), timed once on
a few rows against the emulation on the same rows (it can be orders of magnitude
slower, see below). The four layers run interleaved
(A B C D A B C D ...), and so do the three GEMMs, so that a change in machine load hits
all of them alike (run one after another, drifting load made the FP8 layer look much
slower than an interleaved run did). Ratios are given to bf16 and
to fp32: on a CPU without bf16 GEMM hardware a bf16 layer is 3x (AVX-512 without bf16
instructions) to tens of times (AVX2) slower than fp32, and fp32 is the baseline that
means something there.
Results: benchmarks/results/linear.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common

import fp8train
import fp8train.matmul

SHAPES = {
    "1024": (1024, 1024),
    "2048": (2048, 2048),
    "4096": (4096, 4096),
    "mlp-1024x4": (1024, 4096),
}


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, bf16: bool = True) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    y.backward(dy.to(y.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--scaled-mm-tokens",
        type=int,
        default=16,
        help="rows of the one torch._scaled_mm timing (it can be very slow)",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    results = {}
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(args.tokens, k, requires_grad=True)
        dy = torch.randn(args.tokens, n, dtype=torch.bfloat16)
        base = nn.Linear(k, n)
        layers = {
            "bf16 nn.Linear": base,
            "fp32 nn.Linear": base,
            "fp8 tensorwise eager": fp8train.convert(nn.Sequential(nn.Linear(k, n)), "tensorwise"),
            "fp8 tensorwise compiled": fp8train.convert(
                nn.Sequential(nn.Linear(k, n)), "tensorwise", kernels="compiled"
            ),
        }
        timings = _common.time_interleaved(
            [
                functools.partial(fwd_bwd, layer, x, dy, not label.startswith("fp32"))
                for label, layer in layers.items()
            ],
            warmup=2,
            repeats=args.repeats,
        )
        entry = {label: t["median_s"] for label, t in zip(layers, timings, strict=False)}
        # The bare forward GEMM on the same quantised operands.
        spec = fp8train.ScaleSpec(power_of_two=True)
        qx = fp8train.quantize(x.detach(), spec)
        qw = fp8train.quantize(base.weight.detach(), spec)
        a16, b16 = qx.dequantize(torch.bfloat16), qw.t().dequantize(torch.bfloat16)
        a32, b32 = a16.float(), b16.float()
        gemms = {
            "gemm bf16 torch.mm": lambda a16=a16, b16=b16: torch.mm(a16, b16),
            "gemm fp32 torch.mm": lambda a32=a32, b32=b32: torch.mm(a32, b32),
            "gemm fp8 emulated": lambda qx=qx, qw=qw: fp8train.scaled_mm(
                qx, qw.t(), backend="emulate"
            ),
        }
        timings = _common.time_interleaved(list(gemms.values()), warmup=2, repeats=args.repeats)
        entry.update({label: t["median_s"] for label, t in zip(gemms, timings, strict=False)})
        # CPU torch._scaled_mm can be three orders of magnitude slower than a bf16 GEMM
        # (oneDNN's FP8 path on some CPUs: the results files say where), so it is
        # timed once, on the first --scaled-mm-tokens rows, against the emulation on the
        # same rows.
        # Both granularities CPU torch._scaled_mm takes (block and MX scales it does not,
        # so those recipes have only the emulation to run on).
        few = args.scaled_mm_tokens
        few_times = {}
        for gran, gspec in (
            ("tensorwise", spec),
            ("rowwise", fp8train.ScaleSpec(granularity="row", power_of_two=True)),
        ):
            qa = fp8train.quantize(x.detach()[:few], gspec)
            qb = fp8train.quantize(base.weight.detach(), gspec).t()  # (K, N), a scale per column
            for route, backend in (("emulated", "emulate"), ("torch._scaled_mm", "scaled_mm")):
                label = route if gran == "tensorwise" else f"{route} {gran}"
                few_times[label] = _common.time_median(
                    functools.partial(fp8train.scaled_mm, qa, qb, backend=backend),
                    warmup=0,
                    repeats=1,
                )["median_s"]
        results[name] = {
            "in_features": k,
            "out_features": n,
            "tokens": args.tokens,
            "median_s": entry,
            "emulated_gemm_dtype": str(fp8train.matmul.gemm_dtype(torch.bfloat16, True, "cpu")),
            "ratio_to_bf16": {
                lbl: v / entry["bf16 nn.Linear"]
                for lbl, v in entry.items()
                if not lbl.startswith("gemm")
            },
            "ratio_to_fp32": {
                lbl: v / entry["fp32 nn.Linear"]
                for lbl, v in entry.items()
                if not lbl.startswith("gemm")
            },
            "gemm_ratio_to_bf16_mm": {
                lbl: v / entry["gemm bf16 torch.mm"]
                for lbl, v in entry.items()
                if lbl.startswith("gemm")
            },
            "gemm_ratio_to_fp32_mm": {
                lbl: v / entry["gemm fp32 torch.mm"]
                for lbl, v in entry.items()
                if lbl.startswith("gemm")
            },
            "scaled_mm_on_few_tokens": {
                "tokens": few,
                "seconds_once": few_times,
                "scaled_mm_vs_emulated": few_times["torch._scaled_mm"] / few_times["emulated"],
                "scaled_mm_vs_emulated_rowwise": few_times["torch._scaled_mm rowwise"]
                / few_times["emulated rowwise"],
            },
        }
        for suffix in ("", " rowwise"):
            t_mm = few_times["torch._scaled_mm" + suffix]
            rows.append(
                (
                    name,
                    f"gemm torch._scaled_mm{suffix} ({few} tokens, once)",
                    f"{t_mm * 1e3:.2f}",
                    f"{t_mm / few_times['emulated' + suffix]:.1f}x emulated",
                    "",
                )
            )
        for label, v in entry.items():
            gemm = label.startswith("gemm")
            to16 = entry["gemm bf16 torch.mm" if gemm else "bf16 nn.Linear"]
            to32 = entry["gemm fp32 torch.mm" if gemm else "fp32 nn.Linear"]
            rows.append((name, label, f"{v * 1e3:.2f}", f"{v / to16:.2f}", f"{v / to32:.2f}"))
    print(_common.format_table(["shape", "what", "median ms", "vs bf16", "vs fp32"], rows))
    if not args.no_write:
        path = _common.write_results("linear", {"config": vars(args), "results": results})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
