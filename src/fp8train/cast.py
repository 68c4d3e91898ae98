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
from fp8train.formats import E4M3, E5M2, INT8, Format, by_name

Rounding = Literal["nearest", "stochastic"]

__all__ = [
    "cast",
    "cast_finite",
    "fp8_codes",
    "fp8_grid_bytes",
    "fp8_grid_values",
    "fp8_payload",
    "fp8_word_values",
    "overflow_threshold",
    "round_to_grid",
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
    x32 = x.float()
    if not fmt.has_nan and bool(torch.isnan(x32).any()):
        raise ValueError(
            f"{fmt.name} has no NaN code; input of shape {tuple(x.shape)} contains NaN"
        )
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
    return _to_storage(
        round_to_grid(x, fmt, saturate=saturate, rounding=rounding, generator=generator), fmt
    )


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
    in ATen's at::vec) cost 2-4x a multiply pass, and the emulated GEMM only needs the
    values; the FP8 bytes are made only where something stores them.

    How (``p`` = significant bits of ``fmt``, 4 for E4M3, 3 for E5M2):

    * normal range: Veltkamp's split, ``c = y * (2**(24 - p) + 1)``, ``hi = c - (c - y)``
      keeps the top ``p`` bits of ``y`` rounded to nearest. Every step scales exactly
      with ``y``'s binade (no intermediate can be subnormal or overflow once ``y`` is
      clamped to ``fmt.max``), so one binade checked exhaustively covers all of them;
      tests/test_cast.py checks every fp32 of several binades against torch's cast.
    * subnormal range (``|y| < fmt.min_normal``): ``(|y| + m) - m`` with
      ``m = 1.5 * 2**23 * fmt.min_subnormal``, whose fp32 spacing is the FP8 subnormal
      step, so the addition itself rounds (ties to even: ``m`` is an even multiple).
      The sign is put back with ``copysign`` so that ``-0`` and tiny negatives stay
      negative zero, as the cast keeps them.

    ``clamp=False`` skips the saturation, for callers whose ``|y|`` cannot round past
    ``fmt.max`` (the bound is argued in the comment above): a clamp, with its NaN
    handling, is a fifth of the kernel's time.

    Inductor compiles with ``-fno-unsafe-math-optimizations`` and
    ``-ffp-contract=off`` (torch 2.13 defaults), so ``c - (c - y)`` is not simplified or
    fused; the compiled kernels are checked bit for bit against eager ones.
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


# Whether int32 -> uint8 is converted directly (see _code_bytes): where ATen, and with it
# inductor's CPU code, uses AVX-512, and off the CPU. Read at call time, so tests can
# run both conversions on one machine.
_DIRECT_CODE_BYTES_ON_CPU = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _code_bytes(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes in [0, 255] as uint8: directly with AVX-512 (or off the CPU), else
    converted through fp32 (exact for these values); the same bytes either way.

    Why the detour: inductor's AVX2 code converts int32 vectors to uint8 through a slow
    generic path, while fp32 -> uint8 is vectorised; on a 2-core AMD EPYC Zen 3 (AVX2,
    torch 2.13, 2026-12-01) a 4096^2 fp32 cast pass to E4M3 codes took 19.0 ms one
    thread with the direct conversion and 6.0 ms through fp32 (a fp32 copy: 7.3 ms), and
    the grid values' bytes 20.7 -> 10.6 ms. With AVX-512 the direct conversion is the
    fast one: on a 2-core AMD EPYC Zen 4 (2026-12-02, two threads, compiled) a 4096^2
    fp32 tensorwise cast to codes took 8.0 ms through fp32 and 4.6 ms directly, a
    4096x8192 bf16 one 21.0 -> 7.8 ms, and a 2048x512 bf16 payload with its operand
    (the lab GPT's MLP input) 789 -> 431-459 us.
    """
    if codes.device.type != "cpu" or _DIRECT_CODE_BYTES_ON_CPU:
        return codes.to(torch.uint8)
    return codes.to(torch.float32).to(torch.uint8)


def fp8_grid_bytes(values: torch.Tensor, fmt: Format) -> torch.Tensor:
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
    tests/test_cast.py round-trips every finite code of both formats.
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
    return _code_bytes(code | sign)


def fp8_codes(y: torch.Tensor, fmt: Format, *, clamp: bool = True) -> torch.Tensor:
    """``cast_finite(y, fmt).view(torch.uint8)`` for finite fp32 ``y`` and E4M3/E5M2 with
    saturation and nearest rounding, rounded in integer arithmetic on ``y``'s bits: the
    codes straight from the input, where :func:`fp8_grid_bytes` needs the grid values
    first. For a payload alone (no GEMM operand) this is the shorter route (a 4096^2
    fp32 cast pass, compiled: 4.5 -> 3.4 ms, 2026-11-29).

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
    constants are plain Python arithmetic so that ``torch.compile`` traces them too.
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
    # view, and dropping this one took a 4096^2 cast pass from 35 to 25 ms (one thread,
    # AMD EPYC Zen 1, 2026-12-02).
    subnormal = (y.abs() + magic).view(torch.int32) - magic_bits
    min_normal_bits = (128 - fmt.bias) << 23  # 2**(1 - bias)
    code = torch.where(magnitude < min_normal_bits, subnormal, normal)
    sign = (bits >> 24) & 0x80  # arithmetic shift: bit 31 -> bit 7
    return _code_bytes(code | sign)


def fp8_payload(
    y: torch.Tensor,
    fmt: Format,
    *,
    clamp: bool = True,
    on_grid: bool = False,
    from_bits: bool = False,
) -> torch.Tensor:
    """``cast_finite(y, fmt)`` (saturating, nearest) for finite fp32 ``y`` and E4M3/E5M2,
    in ``fmt.torch_dtype``: by torch's conversion, or with ``from_bits=True`` from
    ``y``'s fp32 bit fields in integer arithmetic (:func:`fp8_grid_bytes` where ``y``
    already lies on the grid, ``on_grid``, else :func:`fp8_codes`). The same bytes.

    ``clamp=False``: ``|y|`` is known not to round past ``fmt.max`` (the bound in the
    comment above :func:`fp8_grid_values`), and torch's conversion rounds it to max as
    well: only magnitudes that round past max (:func:`overflow_threshold`) become NaN or
    inf.

    Which is faster depends on the CPU, not on the data: inductor writes no vector code
    for a bit view (it stores the vector, moves each lane in scalar code and loads it
    back), and what that round trip costs differs by CPU; fp8train.kernels measures it
    once per machine (``bytes_from_bits_faster``).
    """
    if from_bits:
        codes = fp8_grid_bytes(y, fmt) if on_grid else fp8_codes(y, fmt, clamp=clamp)
        assert fmt.torch_dtype is not None  # E4M3/E5M2, checked by either function
        return codes.view(fmt.torch_dtype)
    if fmt not in (E4M3, E5M2):
        raise ValueError(f"fp8_payload supports e4m3 and e5m2, got {fmt.name}")
    if y.dtype != torch.float32:  # as the bit-field route: rounded once, from fp32
        raise TypeError(f"fp8_payload needs float32 input, got {y.dtype}")
    if clamp and not on_grid:
        return _cast_native(y, fmt, saturate=True)
    assert fmt.torch_dtype is not None
    return y.to(fmt.torch_dtype)


def fp8_word_values(payload: torch.Tensor) -> torch.Tensor:
    """``payload.float()`` for an E4M3/E5M2 payload whose last dimension is a multiple
    of 4, decoded from its bytes read four at a time as int32 words (little-endian).

    Why: inductor's AVX2 code loads a vector of FP8 (or uint8) elements through a
    partial-load path and converts it with scalar code; on a 2-core AMD EPYC Zen 3
    (torch 2.13, 2026-12-02, one thread) a 2048x512 E4M3 payload took 2.5 ms to turn
    into fp32 that way, 13x a 4 MiB copy, and 1.1 ms from int32 words. Only for the
    compiled kernels: eager, each of the ~30 integer operations is a pass of its own.

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
