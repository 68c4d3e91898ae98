"""Helpers for testing numerics: SQNR, bitwise equality and format probe sets.

Plain functions that raise ``AssertionError`` or return tensors; nothing here imports
pytest, so benchmarks and notebooks can use them too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fp8train.cast import overflow_threshold
from fp8train.formats import Format, by_name

__all__ = [
    "all_codes",
    "assert_bitwise_equal",
    "assert_nested_bitwise_equal",
    "grid_probes",
    "max_relative_error",
    "random_over_binades",
    "sqnr",
    "value_grid",
]

# Integer dtype with the same width as each float dtype, to compare bit patterns.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# How many mismatches an assertion message lists.
_SHOWN = 8


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``x`` against ``ref``, in dB.

    ``10 * log10(sum(ref**2) / sum((ref - x)**2))`` computed in float64 (so float8 and
    bf16 inputs lose nothing). Returns ``+inf`` when ``x`` equals ``ref`` exactly.
    Raises ``ValueError`` when the shapes differ.
    """
    if ref.shape != x.shape:
        raise ValueError(f"sqnr needs equal shapes, got {tuple(ref.shape)} and {tuple(x.shape)}")
    ref64 = ref.detach().to(torch.float64)
    x64 = x.detach().to(torch.float64)
    noise = float(((ref64 - x64) ** 2).sum())
    if noise == 0.0:
        return math.inf
    signal = float((ref64**2).sum())
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_relative_error(ref: torch.Tensor, x: torch.Tensor) -> float:
    """The largest ``|x - ref| / |ref|`` over the elements whose ``|ref|`` is at least
    the median ``|ref|``, in float64.

    Why the median: a GEMM output that sums to near zero has an unbounded relative
    error whatever the arithmetic (it measures the cancellation, not the sum's
    precision), so the plain maximum is set by the one output nearest zero. Over the
    larger half of the outputs the maximum is finite and stable from seed to seed, and
    it still takes the worst of them. This is how fp8train reads "maximum relative
    error" in DeepSeek-V3's accumulator figure (the paper does not define it).
    """
    if ref.shape != x.shape:
        raise ValueError(
            f"max_relative_error needs equal shapes, got {tuple(ref.shape)} and {tuple(x.shape)}"
        )
    ref64 = ref.detach().to(torch.float64).flatten()
    x64 = x.detach().to(torch.float64).flatten()
    large = ref64.abs() >= ref64.abs().median()
    return float(((x64 - ref64).abs()[large] / ref64.abs()[large]).max())


def fp32_sum_gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for fp32 (u = 2**-24): an fp32 sum of n + 1
    terms, added in any order, is within gamma_n * sum|terms| of the exact sum."""
    u = 2.0**-24
    return n * u / (1 - n * u)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` as an integer tensor of the same width."""
    if t.dtype.is_floating_point:
        return t.view(_BITS_VIEW[t.element_size()])
    return t


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Assert that ``a`` and ``b`` have the same dtype, shape and bit patterns.

    Floats (float8 formats, bf16, fp16, fp32, fp64) are compared through an integer
    view of the same width, so ``-0`` differs from ``+0``. NaN is the one exception:
    two NaNs count as equal whatever their payload or sign bits, because torch and
    ml_dtypes pick different NaN codes (E5M2: 0x7F versus 0x7E) and that choice is
    not part of any contract; a NaN opposite a number is a mismatch. Integer tensors
    compare their values. The message lists the shape, the number of mismatches and
    the first few indices with both values and bit patterns.
    """
    label = f"{what}: " if what else ""
    if a.dtype != b.dtype:
        raise AssertionError(f"{label}dtype {a.dtype} != {b.dtype}")
    if a.shape != b.shape:
        raise AssertionError(f"{label}shape {tuple(a.shape)} != {tuple(b.shape)}")
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    differ = _bits(a) != _bits(b)
    if a.dtype.is_floating_point:
        a_nan, b_nan = torch.isnan(a.to(torch.float64)), torch.isnan(b.to(torch.float64))
        differ = (differ & ~(a_nan & b_nan)) | (a_nan != b_nan)
    n_bad = int(differ.sum())
    if n_bad == 0:
        return
    bad = differ.nonzero()[:_SHOWN]
    a_bits, b_bits = _bits(a), _bits(b)
    mask = (1 << (8 * a.element_size())) - 1  # print bits unsigned
    lines = []
    for idx in bad.tolist():
        i = tuple(idx)
        av, bv = a[i].to(torch.float64).item(), b[i].to(torch.float64).item()
        ab, bb = int(a_bits[i]) & mask, int(b_bits[i]) & mask
        lines.append(f"  at {list(i)}: {av!r} (0x{ab:x}) != {bv!r} (0x{bb:x})")
    raise AssertionError(
        f"{label}{n_bad} of {a.numel()} elements differ (shape {tuple(a.shape)}, "
        f"dtype {a.dtype}); first {len(lines)}:\n" + "\n".join(lines)
    )


def assert_nested_bitwise_equal(got: Any, expected: Any, what: str = "") -> None:
    """:func:`assert_bitwise_equal` through nested dicts (same keys), tuples and lists
    (same lengths); any other leaf must compare equal with ``==``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), what
        for key in expected:
            assert_nested_bitwise_equal(got[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(got, type(expected)) and len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            assert_nested_bitwise_equal(g, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), what
        assert_bitwise_equal(got, expected, what)
    else:
        assert got == expected, f"{what}: {got!r} != {expected!r}"


def all_codes(fmt: Format | str) -> torch.Tensor:
    """Every code of ``fmt`` (0 .. 2**bits - 1, in order) as a tensor of its torch dtype.

    Built as a uint8 ramp viewed as the format's dtype, so each element holds exactly
    that code. Raises ``ValueError`` for formats without a one-byte torch dtype.
    """
    fmt = by_name(fmt)
    dtype = fmt.torch_dtype
    if dtype is None or torch.empty((), dtype=dtype).element_size() * 8 != fmt.bits:
        raise ValueError(
            f"{fmt.name} has no torch dtype of {fmt.bits} bits (torch_dtype={dtype}); "
            "use fmt.decode(code) for its codes instead"
        )
    ramp = torch.arange(2**fmt.bits, dtype=torch.int32).to(torch.uint8)
    return ramp.view(dtype)


def value_grid(fmt: Format | str) -> torch.Tensor:
    """``fmt.values`` (every finite value, ascending, one zero) as a float64 tensor."""
    return torch.tensor(by_name(fmt).values, dtype=torch.float64)


def grid_probes(fmt: Format | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inputs that exercise every rounding decision of ``fmt``, as a 1-D tensor.

    Contains, with both signs: every finite value, every midpoint between neighbouring
    values and the ``dtype`` value one ulp either side of each midpoint (via
    ``torch.nextafter`` in ``dtype``), ``+-0``, the values one ulp past ``max``, the
    overflow threshold of :func:`fp8train.cast.overflow_threshold` and one ulp either
    side of it. Default ``dtype`` is float32; with bf16 or fp16 the probes are built
    in that dtype (so the ulp neighbours really are neighbours there) and values the
    dtype cannot hold (non-finite after conversion) are left out. Duplicates are
    removed by bit pattern, so ``-0`` and ``+0`` both stay. No inf and no NaN.
    """
    fmt = by_name(fmt)
    grid = value_grid(fmt)
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float64 for every format here
    threshold = overflow_threshold(fmt)
    anchors = torch.cat(
        [
            grid.to(dtype),
            torch.tensor([fmt.max, threshold], dtype=torch.float64).to(dtype),
        ]
    )
    centres = torch.cat([mids.to(dtype), torch.tensor([threshold], dtype=torch.float64).to(dtype)])
    up = torch.full_like(centres, math.inf)
    ulp_out = torch.cat(
        [
            torch.nextafter(centres, up),
            torch.nextafter(centres, -up),
            torch.nextafter(anchors[-2:], torch.full_like(anchors[-2:], math.inf)),  # past max
        ]
    )
    probes = torch.cat([anchors, centres, ulp_out, torch.zeros(1, dtype=dtype)])
    probes = torch.cat([probes, -probes])
    probes = probes[torch.isfinite(probes)]
    unique_bits: torch.Tensor = torch.unique(_bits(probes))  # by bits: keeps -0 and +0
    return unique_bits.view(dtype)


def random_over_binades(
    fmt: Format | str, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` float32 values, log-uniform in magnitude, random sign, covering all of ``fmt``.

    Magnitudes run from 2**-2 times the smallest subnormal to 2**2 times ``max``
    (clipped to float32's finite range, including float32 subnormals), so every
    subnormal and normal binade of ``fmt`` and both underflow and overflow are hit.
    Deterministic for a given ``generator`` state.
    """
    fmt = by_name(fmt)
    lo = max(math.log2(fmt.min_subnormal) - 2.0, -149.0)  # -149: float32 smallest subnormal
    hi = min(math.log2(fmt.max) + 2.0, 127.99)  # 127.99: stay below float32 max (~2**128)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    mag = torch.exp2(lo + u * (hi - lo))
    sign = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
    return (mag * sign).to(torch.float32)
