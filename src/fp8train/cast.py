"""Bit-exact casts onto a format's grid.

Contract (stated once, tested against ``ml_dtypes`` and torch's float8 dtypes):

* The input (fp32, bf16 or fp16) is widened to fp32, which is exact for all three.
* ``rounding="nearest"``: round to nearest, ties to even (on the code's last bit), with
  subnormals. ``rounding="stochastic"``: round up with probability equal to the
  distance from the lower grid point in units of the local step, so E[cast(x)] == x
  for every x inside the range (up to the 2^-24 resolution of the uniform draw).
* Overflow is decided *after* rounding: a value overflows when it rounds past ``max``.
  ``saturate=True``: finite overflow and +-inf become +-max. ``saturate=False``: the
  hardware policy -- E5M2 gives +-inf, E4M3 (no inf) gives NaN; formats with neither
  inf nor NaN (E2M1, INT8) only allow ``saturate=True``.
* NaN stays NaN in formats that have one. Formats without a NaN code (E2M1, INT8)
  reject NaN input with ``ValueError`` rather than invent a value (ml_dtypes 0.6 maps
  NaN to -0.0 in E2M1; we refuse).
* E8M0 (unsigned, no zero): positive values below 2^-127 round to 2^-127 as in
  ml_dtypes; zero becomes 2^-127 when saturating and NaN otherwise; negative values
  are NaN (no sign bit).  torch's own E8M0 cast drops the sign instead -- we do not.
* ``-0`` stays ``-0`` in formats with a negative zero; fnuz formats return ``+0``.

We do not rely on torch's overflow behaviour where it changed across releases (E4M3):
where we use torch's native float8 conversion for speed, the overflow policy is applied
first. E5M2 without saturation is the IEEE rule (overflow to inf), which torch follows
and the bit-exactness tests pin down.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fp8train._bits import exp2i, floor_log2
from fp8train.formats import E2M1, E4M3, E5M2, INT8, Format, by_name

Rounding = Literal["nearest", "stochastic"]

__all__ = [
    "cast",
    "cast_finite",
    "e2m1_codes",
    "e2m1_values",
    "overflow_threshold",
    "pack_e2m1",
    "round_to_grid",
    "unpack_e2m1",
]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def overflow_threshold(fmt: Format) -> float:
    """Smallest magnitude that rounds (to nearest even) past ``fmt.max``.

    Values strictly above it overflow; the value itself overflows only when ``max`` has
    an odd last mantissa bit (E5M2: 61440 -> inf; E4M3: 464 -> 448).
    """
    # The step *above* max: max's own binade quantum. (Not max minus its predecessor,
    # which is the binade below when max has a zero mantissa, as in E8M0.)
    step = (
        1.0 if fmt.is_integer else math.ldexp(1.0, math.frexp(fmt.max)[1] - 1 - fmt.mantissa_bits)
    )
    return fmt.max + step / 2


def _check_args(x: torch.Tensor, fmt: Format, saturate: bool, rounding: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cast expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"cast supports float32, bfloat16 and float16 inputs, got {x.dtype} "
            f"(shape {tuple(x.shape)}); convert with .float() first"
        )
    if not isinstance(saturate, bool):
        # A truthy string ("False") would saturate and None would not: take no guesses.
        raise TypeError(
            f"saturate must be a bool, got {saturate!r} ({type(saturate).__name__}); pass "
            "saturate=True (overflow becomes +-max) or saturate=False (inf/NaN)"
        )
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if not saturate and not (fmt.has_inf or fmt.has_nan):
        raise ValueError(
            f"{fmt.name} has neither inf nor NaN, so overflow can only saturate; pass saturate=True"
        )


def round_to_grid(
    x: torch.Tensor,
    fmt: Format | str,
    *,
    saturate: bool = True,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference cast: float32 tensor holding exactly the values ``cast`` would encode.

    Integer-exponent arithmetic in fp32 (scaling by exact powers of two, then round),
    so it works for every format, including those torch has no dtype for.
    """
    fmt = by_name(fmt)
    _check_args(x, fmt, saturate, rounding)
    if not fmt.has_nan and bool(torch.isnan(x).any()):
        raise ValueError(
            f"{fmt.name} has no NaN code; input of shape {tuple(x.shape)} contains NaN"
        )
    return _grid_values(x, fmt, saturate, rounding, generator)


def _grid_values(
    x: torch.Tensor,
    fmt: Format,
    saturate: bool,
    rounding: Rounding,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`round_to_grid` without its checks. A NaN input gives NaN whatever the
    format (for :func:`cast_finite`, whose callers discard such results unseen)."""
    x32 = x.float()
    mag = x32.abs()
    if fmt.is_integer:
        # A uniform grid: the step is 1 everywhere, no exponent to find.
        quantum = torch.ones_like(mag)
    else:
        # floor(log2 |x|), clamped to the smallest normal binade so that subnormals share
        # its quantum (the step between neighbouring values).
        quantum_exp = floor_log2(mag).clamp(fmt.min_exponent, 127) - fmt.mantissa_bits
        quantum = exp2i(quantum_exp)
    significand = mag / quantum  # exact: division by a power of two
    if rounding == "nearest":
        rounded = torch.round(significand)  # ties to even integer == even last code bit
    else:
        low = torch.floor(significand)
        frac = significand - low  # exact in fp32
        u = torch.rand(mag.shape, generator=generator, device=mag.device)
        rounded = low + (u < frac).to(low.dtype)
    q = rounded * quantum

    over = q > fmt.max  # also true for +inf input; NaN compares false
    if saturate:
        q = torch.where(over, torch.full_like(q, fmt.max), q)
    else:
        q = torch.where(over, torch.full_like(q, torch.inf if fmt.has_inf else torch.nan), q)

    if fmt.special == "e8m0":
        tiny = torch.full_like(q, fmt.min_subnormal)
        q = torch.where((q == 0) & (mag > 0), tiny, q)  # no zero code: underflow to min
        zero_to = fmt.min_subnormal if saturate else torch.nan
        q = torch.where(mag == 0, torch.full_like(q, zero_to), q)
        q = torch.where(x32 < 0, torch.full_like(q, torch.nan), q)  # no sign bit
        return torch.where(torch.isnan(x32), x32, q)
    q = torch.where(torch.isnan(x32), x32, q)
    if fmt.has_negative_zero:
        return torch.copysign(q, x32)
    signed = torch.copysign(q, x32)
    return torch.where(signed == 0, torch.zeros_like(signed), signed)  # no -0 code


def _to_storage(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Exact values (fp32) -> the format's torch dtype; the conversion is exact."""
    return q if fmt.torch_dtype is None else q.to(fmt.torch_dtype)


def cast(
    x: torch.Tensor,
    fmt: Format | str,
    *,
    saturate: bool = True,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cast ``x`` onto ``fmt``; see the module docstring for the full contract.

    Returns a tensor of ``fmt.torch_dtype`` with ``x``'s shape, or float32 holding
    exact grid values when torch has no dtype for ``fmt`` (E2M1). Not differentiable.
    """
    fmt = by_name(fmt)
    _check_args(x, fmt, saturate, rounding)
    if not fmt.has_nan and bool(torch.isnan(x).any()):
        raise ValueError(
            f"{fmt.name} has no NaN code; input of shape {tuple(x.shape)} contains NaN"
        )
    return cast_finite(x, fmt, saturate=saturate, rounding=rounding, generator=generator)


def cast_finite(
    x: torch.Tensor,
    fmt: Format,
    *,
    saturate: bool = True,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`cast` without argument checks, for the scaling pipeline, whose inputs are
    known to be finite (their amax was checked). Same results as :func:`cast`.

    Nearest rounding onto E4M3/E5M2/INT8 uses native torch ops (the tests prove them
    equal to the reference); everything else takes :func:`round_to_grid`.
    """
    if rounding == "nearest":
        if fmt in (E4M3, E5M2):
            return _cast_native(x, fmt, saturate)
        if fmt is INT8:
            # torch.round is round-half-to-even; clamping first saturates +-inf too.
            return x.clamp(-fmt.max, fmt.max).round().to(torch.int8)
    return _to_storage(_grid_values(x, fmt, saturate, rounding, generator), fmt)


def _cast_native(x: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    """torch's own RNE conversion with our overflow policy applied first.

    torch's conversion rounds like ours (the tests prove it, code by code) but its
    overflow handling is version-dependent, so we decide overflow ourselves.
    """
    assert fmt.torch_dtype is not None
    if saturate:
        # clamp passes NaN through; +-inf become +-max.
        return x.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype)
    if fmt.has_inf:
        # E5M2: torch rounds finite overflow to inf and keeps inf, as IEEE does.
        return x.to(fmt.torch_dtype)
    # E4M3 has no inf: everything that rounds past max (and +-inf) is NaN.
    too_big = x.abs() > overflow_threshold(fmt)
    return torch.where(too_big, torch.full_like(x, torch.nan), x).to(fmt.torch_dtype)


# ----------------------------------------------------------------- packed E2M1 bytes
#
# Two E2M1 codes per byte, as torch.float4_e2m1fn_x2 and the CUDA FP4 GEMMs lay them
# out: along the last dimension, element 2i in the low nibble (bits 3..0) and element
# 2i + 1 in the high nibble (bits 7..4). A code is sign (bit 3), exponent (bits 2..1),
# mantissa (bit 0). An odd last dimension is padded with one +0 code (0x0) in the high
# nibble of the last byte; unpacking takes the number of columns and drops it.

# |value| of the 3-bit magnitude codes 0..7, from the format's own decoder.
_E2M1_MAGNITUDES = tuple(E2M1.decode(c) for c in range(8))
# The magnitude code of each 2|value| in 0..13 (8: not on the grid).
_E2M1_CODE_OF_TWICE = torch.full((14,), 8, dtype=torch.int64)
for _code, _mag in enumerate(_E2M1_MAGNITUDES):
    _E2M1_CODE_OF_TWICE[int(_mag * 2)] = _code


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of fp32 ``values`` that lie on E2M1's grid (what
    :func:`cast` returns for E2M1); ``-0.0`` gets code 0x8. ValueError if a value is
    off the grid (a missing cast, not something to round silently)."""
    v = values.float()
    mag = v.abs()
    # 2|v| of the grid values is 0, 1, 2, 3, 4, 6, 8, 12: an integer that indexes a
    # table of the magnitude codes (13 marks "not a grid value").
    twice = (mag * 2).clamp(max=13).to(torch.int64)
    index = _E2M1_CODE_OF_TWICE.to(values.device)[twice]
    on_grid = (index < 8) & (twice.to(torch.float32) == mag * 2)
    if not bool(on_grid.all()):
        bad = v[~on_grid][:4].tolist()
        raise ValueError(
            f"e2m1_codes takes values on E2M1's grid (cast them with fp8train.cast(x, "
            f"'e2m1') first); got {int((~on_grid).sum())} values off it, e.g. {bad}"
        )
    sign = torch.signbit(v).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (any integer tensor holding 0..15), ``-0.0`` for 0x8."""
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int32)
    mag = mags[c & 0x7]
    return torch.where((c & 0x8) != 0, -mag, mag)


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 grid values ``(..., K)`` -> packed bytes ``(..., ceil(K / 2))``, uint8, in
    the layout above (``.view(torch.float4_e2m1fn_x2)`` reads the same bytes)."""
    if values.dim() == 0:
        values = values.reshape(1)
    codes = e2m1_codes(values)
    if codes.shape[-1] % 2:  # explicit pad: a +0 code in the high nibble
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Packed bytes ``(..., ceil(cols / 2))`` (uint8 or torch.float4_e2m1fn_x2) -> fp32
    values ``(..., cols)``; the inverse of :func:`pack_e2m1`."""
    if packed.dtype != torch.uint8:
        if str(packed.dtype) != "torch.float4_e2m1fn_x2":
            raise TypeError(
                f"unpack_e2m1 takes uint8 or float4_e2m1fn_x2 bytes, got {packed.dtype}"
            )
        packed = packed.view(torch.uint8)
    if packed.shape[-1] != (cols + 1) // 2:
        raise ValueError(
            f"unpack_e2m1: {cols} columns pack into {(cols + 1) // 2} bytes per row, got "
            f"{packed.shape[-1]} (shape {tuple(packed.shape)})"
        )
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return e2m1_values(codes[..., :cols])
