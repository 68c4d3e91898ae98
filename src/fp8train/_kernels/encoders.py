"""E4M3/E5M2 encoders and decoders written for inductor's code generation.

Each function gives bit for bit what the reference cast (:mod:`fp8train.cast`) gives,
by another route: float arithmetic instead of an FP8 conversion (:func:`fp8_grid_values`),
integer arithmetic on fp32 bit fields (:func:`fp8_grid_bytes`, :func:`fp8_codes`), or
int32 words instead of bytes (:func:`fp8_word_values`). They exist because inductor's
CPU code for the plain conversions is sometimes scalar; which route is faster depends
on the CPU (inductor has no vector code for a bit view), so the fused kernels take the
route as an argument (:class:`fp8train._kernels.routes.ByteRoutes`) and
``benchmarks/cast.py`` measures which wins on the machine it runs on.
tests/test_kernel_encoders.py checks every route against torch's cast, eager and
compiled.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fp8train.cast import cast_finite
from fp8train.formats import E4M3, E5M2, Format

__all__ = [
    "CodeBytes",
    "fp8_codes",
    "fp8_grid_bytes",
    "fp8_grid_values",
    "fp8_payload",
    "fp8_word_values",
]

# How int32 codes become bytes: "direct" (int32 -> uint8) or "via_fp32" (int32 -> fp32
# -> uint8, exact for codes in [0, 255]).
CodeBytes = Literal["direct", "via_fp32"]


# Skipping the clamp (clamp=False in fp8_grid_values and fp8_codes) is exact while |y|
# stays below the overflow threshold (the midpoint between max and the next value at
# max's spacing): round-to-nearest then gives max by itself. A scale computed from the
# tensor's own amax as max / amax (optionally divided by 2**margin or rounded down to a
# power of two) leaves every |x * scale| at most max * (1 + 2**-24)**2 after the two fp32
# roundings: one or two fp32 ulps above max (one, over 2M random amaxes), far inside half
# an FP8 step. MX's shared exponent does not: its floor rule maps amax into
# [2**emax, 2**(emax + 1)), past E4M3's 448, and relies on saturation.


def fp8_grid_values(y: torch.Tensor, fmt: Format, *, clamp: bool = True) -> torch.Tensor:
    """``cast_finite(y, fmt).float()`` for fp32 ``y`` and E4M3/E5M2 with saturation and
    nearest rounding, in plain float arithmetic: the same fp32 values, signed zeros
    included, without a conversion to or from the FP8 dtype.

    Why: on the CPU the vectorised fp32 <-> FP8 conversions (integer bit manipulation
    in ATen's at::vec) cost several multiply passes, and the emulated GEMM only needs the
    values; the FP8 bytes are made only where something stores them.

    How (``p`` = significant bits of ``fmt``, 4 for E4M3, 3 for E5M2):

    * normal range: Veltkamp's split, ``c = y * (2**(24 - p) + 1)``, ``hi = c - (c - y)``
      keeps the top ``p`` bits of ``y`` rounded to nearest. Every step scales exactly
      with ``y``'s binade (no intermediate can be subnormal or overflow once ``y`` is
      clamped to ``fmt.max``), so one binade checked exhaustively covers all of them;
      tests/test_kernel_encoders.py checks every fp32 of several binades against torch's
      cast.
    * subnormal range (``|y| < fmt.min_normal``): ``(|y| + m) - m`` with
      ``m = 1.5 * 2**23 * fmt.min_subnormal``, whose fp32 spacing is the FP8 subnormal
      step, so the addition itself rounds (ties to even: ``m`` is an even multiple).
      The sign is put back with ``copysign`` so that ``-0`` and tiny negatives stay
      negative zero, as the cast keeps them.

    ``clamp=False`` skips the saturation, for callers whose ``|y|`` cannot round past
    ``fmt.max`` (the bound is argued in the comment above): a clamp, with its NaN
    handling, is a sizeable part of the kernel.

    Inductor compiles with ``-fno-unsafe-math-optimizations`` and ``-ffp-contract=off``
    (its defaults), so ``c - (c - y)`` is not simplified or fused; the compiled kernels
    are checked bit for bit against eager ones.
    """
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fp8_grid_values supports e4m3 and e5m2, got {fmt.name}")
    significant = fmt.mantissa_bits + 1
    splitter = float(2 ** (24 - significant) + 1)
    magic = 1.5 * 2.0**23 * fmt.min_subnormal
    if clamp:
        y = y.clamp(-fmt.max, fmt.max)
    c = y * splitter
    normal = c - (c - y)
    subnormal = torch.copysign((y.abs() + magic) - magic, y)
    return torch.where(y.abs() < fmt.min_normal, subnormal, normal)


def _code_bytes(codes: torch.Tensor, code_bytes: CodeBytes) -> torch.Tensor:
    """int32 codes in [0, 255] as uint8, directly or through fp32 (exact for these
    values); the same bytes either way.

    Why a choice: inductor's CPU code converts int32 vectors to uint8 through a generic
    path on some instruction sets (AVX2), where fp32 -> uint8 is vectorised; with
    AVX-512 the direct conversion is the fast one. Off the CPU it is always direct.
    """
    if code_bytes == "via_fp32" and codes.device.type == "cpu":
        return codes.to(torch.float32).to(torch.uint8)
    return codes.to(torch.uint8)


def fp8_grid_bytes(
    values: torch.Tensor, fmt: Format, *, code_bytes: CodeBytes = "direct"
) -> torch.Tensor:
    """The E4M3/E5M2 codes (uint8) of fp32 ``values`` that already lie on ``fmt``'s grid
    (:func:`fp8_grid_values`' output): ``values.to(fmt.torch_dtype).view(torch.uint8)``
    by reading the bit fields, with no rounding left to do. Off-grid, NaN or inf inputs
    give meaningless codes (the callers check amaxes and discard such results).

    Why: torch's fp32 -> FP8 conversion carries the whole rounding logic per element;
    for values known to be on the grid the code is a shift and a subtraction.

    How (``mb`` = mantissa bits, ``bias`` = ``fmt.bias``): a normal value ``1.m * 2**E``
    has fp32 bits ``(E + 127) << 23 | m << (23 - mb)``, so ``bits >> (23 - mb)`` minus
    ``(127 - bias) << mb`` is its code ``(E + bias) << mb | m``. A subnormal one is
    ``m * 2**(1 - bias - mb)``, so ``|v| * 2**(bias - 1 + mb)`` is the integer ``m``,
    its code (exponent field 0). The sign bit (``-0`` included) is fp32's bit 31.
    tests/test_kernel_encoders.py round-trips every finite code of both formats.
    """
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fp8_grid_bytes supports e4m3 and e5m2, got {fmt.name}")
    if values.dtype != torch.float32:  # the bit fields read are fp32's
        raise TypeError(f"fp8_grid_bytes needs float32 values, got {values.dtype}")
    mb = fmt.mantissa_bits
    magnitude = values.abs()
    normal = (magnitude.view(torch.int32) >> (23 - mb)) - ((127 - fmt.bias) << mb)
    subnormal = (magnitude * float(2 ** (fmt.bias - 1 + mb))).to(torch.int32)
    code = torch.where(magnitude < fmt.min_normal, subnormal, normal)
    sign = (values.view(torch.int32) >> 24) & 0x80  # arithmetic shift: bit 31 -> bit 7
    return _code_bytes(code | sign, code_bytes)


def fp8_codes(
    y: torch.Tensor, fmt: Format, *, clamp: bool = True, code_bytes: CodeBytes = "direct"
) -> torch.Tensor:
    """``cast_finite(y, fmt).view(torch.uint8)`` for finite fp32 ``y`` and E4M3/E5M2 with
    saturation and nearest rounding, rounded in integer arithmetic on ``y``'s bits: the
    codes straight from the input, where :func:`fp8_grid_bytes` needs the grid values
    first. For a payload alone (no GEMM operand) this is the shorter route.

    How (``mb`` = mantissa bits, ``s = 23 - mb`` the fp32 bits dropped):

    * normal range: adding ``2**(s-1) - 1`` plus the lowest kept bit to the magnitude's
      bits and shifting right by ``s`` rounds to nearest, ties to even; a carry out of
      the mantissa moves into the exponent field, which is the next binade's first
      value, as it should be. Subtracting ``(127 - bias) << mb`` rebiases the exponent.
      ``y`` is clamped to ``fmt.max`` first (or known not to round past it).
    * subnormal range: the rounding addition of :func:`fp8_grid_values`
      (``|y| + m``, ``m = 1.5 * 2**23 * fmt.min_subnormal``); the sum's low bits minus
      ``m``'s are the number of subnormal steps, the code. A value that rounds up to
      ``min_normal`` counts ``2**mb`` steps: the code of ``min_normal``.
    * the sign is fp32's bit 31 moved to bit 7 (``-0`` and tiny negatives give ``-0``).

    ``clamp=False``: as in :func:`fp8_grid_values`. NaN inputs (and inf ones without
    the clamp) give meaningless codes (callers check amaxes first). The integer
    constants are plain Python arithmetic so that tracing keeps them constants.
    """
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fp8_codes supports e4m3 and e5m2, got {fmt.name}")
    if y.dtype != torch.float32:  # the bits rounded are fp32's
        raise TypeError(f"fp8_codes needs float32 input, got {y.dtype}")
    mb = fmt.mantissa_bits
    dropped = 23 - mb
    if clamp:
        y = y.clamp(-fmt.max, fmt.max)
    bits = y.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    lowest_kept = (magnitude >> dropped) & 1
    normal = ((magnitude + ((1 << (dropped - 1)) - 1) + lowest_kept) >> dropped) - (
        (127 - fmt.bias) << mb
    )
    # m = 1.5 * 2**(24 - bias - mb): exponent field 151 - bias - mb, top mantissa bit set
    magic_bits = ((151 - fmt.bias - mb) << 23) | (1 << 22)
    magic = 1.5 * 2.0**23 * fmt.min_subnormal
    # |y| as a float, not the magnitude's bits viewed back: inductor scalarises every bit
    # view, so one fewer is cheaper.
    subnormal = (y.abs() + magic).view(torch.int32) - magic_bits
    min_normal_bits = (128 - fmt.bias) << 23  # 2**(1 - bias)
    code = torch.where(magnitude < min_normal_bits, subnormal, normal)
    sign = (bits >> 24) & 0x80  # arithmetic shift: bit 31 -> bit 7
    return _code_bytes(code | sign, code_bytes)


def fp8_payload(
    y: torch.Tensor,
    fmt: Format,
    *,
    clamp: bool = True,
    on_grid: bool = False,
    from_bits: bool = False,
    code_bytes: CodeBytes = "direct",
) -> torch.Tensor:
    """``cast_finite(y, fmt)`` (saturating, nearest) for finite fp32 ``y`` and E4M3/E5M2,
    in ``fmt.torch_dtype``: by torch's conversion, or with ``from_bits=True`` from
    ``y``'s fp32 bit fields in integer arithmetic (:func:`fp8_grid_bytes` where ``y``
    already lies on the grid, ``on_grid``, else :func:`fp8_codes`; ``code_bytes`` as
    theirs). The same bytes.

    ``clamp=False``: ``|y|`` is known not to round past ``fmt.max`` (the bound in the
    comment above :func:`fp8_grid_values`), and torch's conversion rounds it to max as
    well: only magnitudes that round past max (``fp8train.cast.overflow_threshold``)
    become NaN or inf.

    Which route is faster depends on the CPU, not on the data: inductor writes no vector
    code for a bit view (it stores the vector, moves each lane in scalar code and loads
    it back), and what that costs differs by CPU; ``benchmarks/cast.py`` times both.
    """
    if from_bits:
        codes = (
            fp8_grid_bytes(y, fmt, code_bytes=code_bytes)
            if on_grid
            else fp8_codes(y, fmt, clamp=clamp, code_bytes=code_bytes)
        )
        assert fmt.torch_dtype is not None  # E4M3/E5M2, checked by either function
        return codes.view(fmt.torch_dtype)
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fp8_payload supports e4m3 and e5m2, got {fmt.name}")
    if y.dtype != torch.float32:  # as the bit-field route: rounded once, from fp32
        raise TypeError(f"fp8_payload needs float32 input, got {y.dtype}")
    if clamp and not on_grid:
        return cast_finite(y, fmt, saturate=True)
    assert fmt.torch_dtype is not None
    return y.to(fmt.torch_dtype)


def fp8_word_values(payload: torch.Tensor) -> torch.Tensor:
    """``payload.float()`` for an E4M3/E5M2 payload whose last dimension is a multiple
    of 4, decoded from its bytes read four at a time as int32 words (little-endian).

    Why: inductor's CPU code without AVX-512 loads a vector of FP8 (or uint8) elements
    through a partial-load path and converts it with scalar code; int32 words load
    whole. Only for compiled kernels: eager, each of the ~30 integer operations is a
    pass of its own.

    How (``mb`` mantissa bits, ``bias``): byte ``j`` of word ``i`` is element ``4i+j``.
    A code with exponent field ``e`` and mantissa ``m`` is ``(2**mb + m) * 2**(e-bias-mb)``
    when ``e > 0`` and ``m * 2**(1-bias-mb)`` when ``e == 0``: one formula,
    ``(m + (e > 0) * 2**mb) * 2**max(e, 1) * 2**-(bias+mb)``, every factor and product
    exact in fp32 (``2**max(e, 1)`` comes from an integer shift, not from ``exp2``, which
    inductor does not compute exactly). The sign is bit 7 (``-0`` included); E4M3's
    ``S.1111.111`` is NaN, E5M2's exponent field 31 is inf (``m == 0``) or NaN.
    """
    if payload.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"fp8_word_values needs an E4M3/E5M2 payload, got {payload.dtype}")
    fmt = E4M3 if payload.dtype == torch.float8_e4m3fn else E5M2
    if payload.shape[-1] % 4:
        raise ValueError(
            f"fp8_word_values needs a last dimension divisible by 4, got "
            f"shape {tuple(payload.shape)}"
        )
    words = payload.view(torch.uint8).view(torch.int32)
    mb, eb = fmt.mantissa_bits, fmt.exponent_bits
    top = (1 << eb) - 1  # the all-ones exponent field
    parts = []
    for j in range(4):
        code = (words >> (8 * j)) & 0xFF
        e = (code >> mb) & top
        m = code & ((1 << mb) - 1)
        significand = (m + ((e > 0).to(torch.int32) << mb)).to(torch.float32)
        # e clamped below 31 so that E5M2's specials do not shift into the sign bit
        power = (1 << e.clamp(1, 30)).to(torch.float32)
        magnitude = significand * power * 2.0 ** -(fmt.bias + mb)
        value = torch.where((code & 0x80) != 0, -magnitude, magnitude)
        if fmt is E4M3:
            special = (code & 0x7F) == 0x7F
            value = torch.where(special, torch.full_like(value, math.nan), value)
        else:
            special = torch.where(
                m == 0, torch.full_like(value, math.inf), torch.full_like(value, math.nan)
            )
            value = torch.where(e == top, torch.copysign(special, value), value)
        parts.append(value)
    return torch.stack(parts, dim=-1).reshape(payload.shape)
