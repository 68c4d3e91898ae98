"""Maximum relative error of the tensor-core accumulator model against K, with and
without promotion to fp32 (docs/accumulator.md).

    python docs/accumulator.py [--out docs/accumulator_error.png] [--seeds 3]

Operands: DeepSeek-V3's "two random matrices", here standard normal values quantised to
E4M3 with one power-of-two scale per tensor, 256 x K times K x 256. Reference: the exact
product of the quantised operands (float64), so every error below is the accumulation's
alone. Error: ``fp8train.testing.max_relative_error`` (the largest relative error over
the larger half of the outputs), the worst over the seeds. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fp8train import E4M3, ScaleSpec, quantize, scaled_mm
from fp8train.accumulator import TensorCoreAccumulator
from fp8train.testing import max_relative_error

KS = (256, 512, 1024, 2048, 4096, 8192, 16384)
SIZE = 256  # rows of a and columns of b
ACCUMULATIONS = {
    "tensor core, no promotion": TensorCoreAccumulator(promote_every=None),
    "tensor core, promoted every 128 (N_C)": TensorCoreAccumulator(),
    "fp32 (the emulation's default)": "fp32",
}


def errors(k: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    spec = ScaleSpec(fmt=E4M3, power_of_two=True)
    a = quantize(torch.randn(SIZE, k, generator=g), spec)
    b = quantize(torch.randn(k, SIZE, generator=g), spec)
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64)
    return {
        name: max_relative_error(ref, scaled_mm(a, b, out_dtype=torch.float32, accumulation=acc))  # type: ignore[arg-type]
        for name, acc in ACCUMULATIONS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "accumulator_error.png")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    table: dict[str, list[float]] = {name: [] for name in ACCUMULATIONS}
    for k in KS:
        worst = {name: 0.0 for name in ACCUMULATIONS}
        for seed in range(args.seeds):
            for name, err in errors(k, seed).items():
                worst[name] = max(worst[name], err)
        for name, err in worst.items():
            table[name].append(err)
    print("| K | " + " | ".join(ACCUMULATIONS) + " |")
    print("|---|" + "---|" * len(ACCUMULATIONS))
    for i, k in enumerate(KS):
        print(f"| {k} | " + " | ".join(f"{100 * table[n][i]:.3g}%" for n in ACCUMULATIONS) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, errs), marker in zip(table.items(), "osv", strict=True):
        ax.loglog(KS, [100 * e for e in errs], marker=marker, label=name)
    ax.axhline(2.0, color="grey", linestyle=":", linewidth=1)
    ax.annotate("DeepSeek-V3: nearly 2% at K = 4096", (KS[0], 2.2), fontsize=8, color="grey")
    ax.axvline(4096, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (contraction length)")
    ax.set_ylabel("max relative error, %")
    ax.set_title(
        f"FP8 GEMM accumulation: 14-bit tensor-core model vs fp32\n"
        f"E4M3 standard normal operands, {SIZE} x K x {SIZE}, worst of {args.seeds} seeds",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
