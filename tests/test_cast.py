"""Bit-exactness of ``fp8train.cast`` and ``fp8train.round_to_grid``.

References, in order of authority:

* ml_dtypes, for every format it has, on every probe: all codes, every midpoint and
  one ulp either side, random values over all binades, the specials.
  - ``saturate=False``: ml_dtypes' own conversion *is* the hardware policy for E4M3,
    E5M2 and the fnuz formats (overflow to inf or NaN), so we compare directly.
  - ``saturate=True``: ml_dtypes has no saturating mode, so the reference is ml_dtypes
    applied to ``clamp(x, -max, max)`` (which also sends +-inf to +-max and keeps NaN).
  - INT8 has no ml_dtypes type: numpy's ``rint`` (ties to even) plus the clamp.
* torch's own ``.to(float8 dtype)`` where its policy agrees with ours (finite, |x| <= max).
* A float64 reference for the documented contract differences (E8M0 below 2**-126).

NaN is compared by NaN-ness, never by bit pattern: torch and ml_dtypes choose different
NaN codes (E5M2: torch 0x7F, ml_dtypes 0x7E) and no contract fixes one.

Inputs in bf16 and fp16 are generated in that dtype (values are rounded into the input
dtype first, ulp neighbours are that dtype's neighbours); the reference then sees the
exact widened value. fp16 cannot hold E8M0's range, so fp16 cases test what it holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train import cast, round_to_grid
from fp8train.cast import overflow_threshold
from fp8train.formats import E4M3, E5M2, E8M0, FORMATS, Format, by_name
from fp8train.testing import all_codes, assert_bitwise_equal, grid_probes, random_over_binades

ML_DTYPES: dict[str, type | None] = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "int8": None,  # numpy int8 with the symmetric grid [-127, 127]
}

INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# Smallest normal float32, 0x1p-126 (1.1754943508222875e-38). E8M0 inputs below it are
# float32 subnormals, where ml_dtypes and torch round differently from our contract.
FP32_MIN_NORMAL = float.fromhex("0x1p-126")

# Random probe counts: 10**6 where the formats are used most (E4M3, E5M2 at fp32 input),
# 10**5 elsewhere, enough to hit every code of an 8-bit format many times over.
N_RANDOM_MAIN = 10**6
N_RANDOM = 10**5


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run this module's tensor ops on one thread, then restore the setting.

    The ops here are elementwise on at most 10**6 elements, where threads gain little;
    on a shared 2-core machine OpenMP barriers made the module ~3x slower (wall clock).
    Results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _saturate_modes(fmt: Format) -> tuple[bool, ...]:
    return (True, False) if fmt.has_inf or fmt.has_nan else (True,)


FORMAT_MODES = [
    pytest.param(fmt, saturate, id=f"{fmt.name}-{'sat' if saturate else 'nosat'}")
    for fmt in FORMATS.values()
    for saturate in _saturate_modes(fmt)
]
ALL_FORMATS = pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
ALL_DTYPES = pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=DTYPE_IDS)


def _name(fmt: Format) -> str:
    return fmt.name


def _storage_dtype(fmt: Format) -> torch.dtype:
    """What ``cast`` returns: the format's torch dtype, else float32 holding exact values."""
    return fmt.torch_dtype if fmt.torch_dtype is not None else torch.float32


def _ml_reference(x: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    """The reference cast of ``x`` (any input dtype) as exact float32 values."""
    x32 = x.float().numpy()
    if saturate:
        x32 = np.clip(x32, -fmt.max, fmt.max)  # NaN passes through, +-inf -> +-max
    ml = ML_DTYPES[fmt.name]
    if ml is None:  # INT8 (saturating only, NaN rejected earlier): rint is ties-to-even
        ref = np.rint(x32).astype(np.int8).astype(np.float32)
    else:
        ref = x32.astype(ml).astype(np.float32)
    if fmt.special == "e8m0" and saturate:
        # Contract difference: zero saturates to the smallest value 2**-127; ml_dtypes
        # (like our saturate=False) gives NaN.
        ref = np.where(x32 == 0, np.float32(fmt.min_subnormal), ref)
    return torch.from_numpy(np.ascontiguousarray(ref))


def _ml_dtypes_rounds_e8m0_subnormals_up() -> bool:
    """Whether the installed ml_dtypes rounds float32-subnormal inputs to E8M0 upward
    (0.5 and 0.6 do: 1.4 * 2**-127 -> 2**-126, although 2**-127 is nearer; 0.7 rounds
    to nearest). Probed, not read off the version."""
    x = np.array([1.4 * 2.0**-127], dtype=np.float32)
    return bool(float(x.astype(ml_dtypes.float8_e8m0fnu)[0]) == 2.0**-126)


ML_DTYPES_E8M0_SUBNORMALS_UP = _ml_dtypes_rounds_e8m0_subnormals_up()


def _comparable_with_ml_dtypes(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Drop inputs where the contract deliberately differs from the installed ml_dtypes.

    Where ml_dtypes rounds float32-subnormal E8M0 inputs upward (see
    :func:`_ml_dtypes_rounds_e8m0_subnormals_up`), those inputs are checked against a
    float64 reference in their own test instead; with a newer ml_dtypes nothing is dropped.
    """
    if fmt.special != "e8m0" or not ML_DTYPES_E8M0_SUBNORMALS_UP:
        return x
    x32 = x.float()
    return x[~((x32 > 0) & (x32 < FP32_MIN_NORMAL))]


def _assert_cast_equal(x: torch.Tensor, got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """assert_bitwise_equal, plus the offending *inputs* (as hex floats) on failure."""
    try:
        assert_bitwise_equal(got, ref, what)
    except AssertionError as err:
        g, r = got.to(torch.float64), ref.to(torch.float64)
        both_nan = torch.isnan(g) & torch.isnan(r)
        bad = ((g != r) | (torch.signbit(g) != torch.signbit(r))) & ~both_nan
        inputs = [float(v).hex() for v in x.float()[bad][:8]]
        raise AssertionError(
            f"{err}\ninputs ({x.dtype}) at the first mismatches: {inputs}"
        ) from None


def _check_against_reference(x: torch.Tensor, fmt: Format, saturate: bool, what: str) -> None:
    """cast (codes) and round_to_grid (float32 values) both equal the reference."""
    x = _comparable_with_ml_dtypes(x, fmt)
    ref = _ml_reference(x, fmt, saturate)
    label = f"{fmt.name} saturate={saturate} {x.dtype} {what}"

    got = cast(x, fmt, saturate=saturate)
    assert got.dtype == _storage_dtype(fmt)
    assert got.shape == x.shape
    # In the storage dtype, so float8 results are compared code by code (uint8 view);
    # exact grid values convert to their codes exactly.
    _assert_cast_equal(x, got, ref.to(_storage_dtype(fmt)), f"cast {label}")

    grid = round_to_grid(x, fmt, saturate=saturate)
    assert grid.dtype == torch.float32
    _assert_cast_equal(x, grid, ref, f"round_to_grid {label}")


def _specials(fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """+-inf, and NaN for formats that have one (the others reject NaN)."""
    values = [math.inf, -math.inf] + ([math.nan] if fmt.has_nan else [])
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------- ml_dtypes
@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
@ALL_DTYPES
def test_grid_probes_match_ml_dtypes(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    # Every value, midpoint, ulp either side of each midpoint, +-0, just past max, the
    # overflow threshold, +-inf and NaN.
    x = torch.cat([grid_probes(fmt, dtype), _specials(fmt, dtype)])
    _check_against_reference(x, fmt, saturate, "grid probes")


@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
@ALL_DTYPES
def test_random_values_match_ml_dtypes(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    main = fmt in (E4M3, E5M2) and dtype == torch.float32
    gen = torch.Generator().manual_seed(1234)
    x = random_over_binades(fmt, N_RANDOM_MAIN if main else N_RANDOM, gen).to(dtype)
    x = x[torch.isfinite(x)]  # fp16 (and bf16 at the very top) cannot hold every value
    assert x.numel() > N_RANDOM // 10, "too few probes survive the input dtype"
    _check_against_reference(x, fmt, saturate, "random over binades")


@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
@ALL_DTYPES
def test_all_codes_round_trip(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    # decode code -> cast -> the same code. For formats with a torch dtype the codes
    # are compared through a uint8 view; NaN codes only need to come back as NaN.
    if fmt.torch_dtype is None:  # E2M1: decode with the format itself, compare fp32 bits
        codes = torch.tensor([fmt.decode(c) for c in range(2**fmt.bits)], dtype=torch.float32)
    else:
        codes = all_codes(fmt)
    values = codes.float()
    keep = torch.isnan(values) | (values.to(dtype).float() == values)  # what dtype holds
    if fmt.is_integer:
        keep &= values != -128  # off the symmetric grid: saturates to -127
    if not fmt.has_nan:
        keep &= ~torch.isnan(values)
    if saturate:
        keep &= ~torch.isinf(values)  # inf codes saturate to max (test_inf_and_nan)
    codes, x = codes[keep], values[keep].to(dtype)
    _assert_cast_equal(x, cast(x, fmt, saturate=saturate), codes, f"{fmt.name} {dtype} codes")


# ---------------------------------------------------------------------------- specials
@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
@ALL_DTYPES
def test_signed_zero(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    if 0.0 not in fmt.values:  # E8M0: no zero code (its own test covers the rules)
        pytest.skip(f"{fmt.name} has no zero")
    got = round_to_grid(torch.tensor([0.0, -0.0], dtype=dtype), fmt, saturate=saturate)
    assert got.tolist() == [0.0, 0.0]
    assert not torch.signbit(got[0])
    # -0 stays -0 where the format has a negative zero; fnuz and INT8 give +0.
    assert bool(torch.signbit(got[1])) == fmt.has_negative_zero


@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
@ALL_DTYPES
def test_inf_and_nan(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    x = _specials(fmt, dtype)
    got = cast(x, fmt, saturate=saturate).to(torch.float64)
    top = fmt.max if saturate else (math.inf if fmt.has_inf else math.nan)
    expected_pos = top
    expected_neg = -top if fmt.signed else math.nan  # E8M0: negative -> NaN
    for value, expected in ((got[0], expected_pos), (got[1], expected_neg)):
        if math.isnan(expected):
            assert torch.isnan(value)
        else:
            assert float(value) == expected
    if fmt.has_nan:
        assert torch.isnan(got[2])


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if not f.has_nan], ids=_name)
@pytest.mark.parametrize("func", [cast, round_to_grid], ids=["cast", "round_to_grid"])
def test_nan_input_raises_without_nan_code(fmt: Format, func: object) -> None:
    x = torch.tensor([1.0, math.nan])
    with pytest.raises(ValueError, match="NaN"):
        func(x, fmt)  # type: ignore[operator]


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if not f.has_nan], ids=_name)
@pytest.mark.parametrize("func", [cast, round_to_grid], ids=["cast", "round_to_grid"])
def test_no_saturate_raises_without_inf_or_nan(fmt: Format, func: object) -> None:
    x = torch.tensor([1.0])
    with pytest.raises(ValueError, match="saturate=True"):
        func(x, fmt, saturate=False)  # type: ignore[operator]


# ---------------------------------------------------------------------------- torch
TORCH_FLOAT8 = [f for f in FORMATS.values() if f.torch_dtype is not None and not f.is_integer]


@pytest.mark.parametrize("fmt", TORCH_FLOAT8, ids=_name)
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@ALL_DTYPES
def test_matches_torch_native_conversion(fmt: Format, saturate: bool, dtype: torch.dtype) -> None:
    # Where torch's policy and ours agree: finite |x| <= max (torch's overflow handling
    # is version-dependent). E8M0 also needs x >= 2**-126: torch drops the sign of
    # negatives, maps 0 to 2**-127, and rounds float32 subnormals upward like ml_dtypes.
    gen = torch.Generator().manual_seed(99)
    x = torch.cat([grid_probes(fmt, dtype), random_over_binades(fmt, N_RANDOM, gen).to(dtype)])
    x32 = x.float()
    keep = torch.isfinite(x32) & (x32.abs() <= fmt.max)
    if fmt.special == "e8m0":
        keep &= x32 >= FP32_MIN_NORMAL
    x = x[keep]
    ref = x.to(fmt.torch_dtype)
    label = f"{fmt.name} saturate={saturate} {dtype}"
    _assert_cast_equal(x, cast(x, fmt, saturate=saturate), ref, f"cast vs torch {label}")
    via_grid = round_to_grid(x, fmt, saturate=saturate).to(fmt.torch_dtype)
    _assert_cast_equal(x, via_grid, ref, f"round_to_grid vs torch {label}")


# ---------------------------------------------------------------------------- E8M0
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@ALL_DTYPES
def test_e8m0_negative_is_nan(saturate: bool, dtype: torch.dtype) -> None:
    # No sign bit: every negative number is NaN (torch's own cast drops the sign instead).
    x = torch.tensor([-1.0, -E8M0.min_subnormal, -3.0, -65504.0, -math.inf], dtype=dtype)
    x = x[x != 0]  # fp16 flushes -2**-127 to -0, which is a zero, not a negative number
    assert torch.isnan(cast(x, E8M0, saturate=saturate).float()).all()


@ALL_DTYPES
def test_e8m0_zero(dtype: torch.dtype) -> None:
    # No zero code: zero saturates to the smallest value, and is NaN otherwise. -0 is a
    # zero, not a negative number.
    x = torch.tensor([0.0, -0.0], dtype=dtype)
    saturated = round_to_grid(x, E8M0, saturate=True)
    assert saturated.tolist() == [E8M0.min_subnormal] * 2
    assert torch.isnan(round_to_grid(x, E8M0, saturate=False)).all()


@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
def test_e8m0_below_smallest_rounds_to_smallest(saturate: bool) -> None:
    x = torch.tensor(
        [
            float.fromhex("0x1p-128"),  # half the smallest value: no zero to round to
            float.fromhex("0x1p-149"),  # float32's smallest subnormal
            float.fromhex("0x1.fffffcp-128"),  # just below the 2**-127 / 2**-128 boundary
        ]
    )
    got = round_to_grid(x, E8M0, saturate=saturate)
    assert got.tolist() == [E8M0.min_subnormal] * 3


@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
def test_e8m0_overflow(saturate: bool) -> None:
    # Nearest by value, ties up (the implicit significand 1 is odd, as in ml_dtypes and
    # torch): the boundary between 2**127 and the missing 2**128 is 1.5 * 2**127.
    stays = torch.tensor([float.fromhex("0x1p127"), float.fromhex("0x1.7ffffep127")])
    over = torch.tensor([float.fromhex("0x1.8p127"), float.fromhex("0x1.fffffep127"), math.inf])
    assert round_to_grid(stays, E8M0, saturate=saturate).tolist() == [E8M0.max] * 2
    got = round_to_grid(over, E8M0, saturate=saturate)
    if saturate:
        assert got.tolist() == [E8M0.max] * 3
    else:
        assert torch.isnan(got).all()  # no inf code


def _nearest_power_of_two(x: np.ndarray) -> np.ndarray:
    """float64 reference for E8M0 on positive inputs: nearest power of two by value.

    Ties (1.5 * 2**e) go up, as E8M0 does for normal inputs; results are floored at the
    smallest value 2**-127 (no zero code).
    """
    lower = np.exp2(np.floor(np.log2(x)))
    nearest = np.where(x >= 1.5 * lower, 2.0 * lower, lower)
    floored: np.ndarray = np.maximum(nearest, E8M0.min_subnormal)
    return floored


@ALL_DTYPES
def test_e8m0_fp32_subnormal_inputs_round_to_nearest_value(dtype: torch.dtype) -> None:
    # ml_dtypes 0.5-0.6 round float32-subnormal inputs (below 2**-126) upward, e.g.
    # 1.4 * 2**-127 -> 2**-126, although 2**-127 is nearer; torch's own E8M0 cast does
    # the same. Our contract is nearest by value (-> 2**-127), checked here against a
    # float64 reference whatever ml_dtypes is installed.
    if dtype == torch.float16:
        pytest.skip("fp16 cannot hold values near 2**-127")
    # A stride through the subnormals (arithmetic on them is slow on CPU, so not all 2**23).
    bits = torch.arange(1, 2**23, 997, dtype=torch.int32)
    boundary = float.fromhex("0x1.8p-127")  # 1.5 * 2**-127, the rounding boundary
    edges = torch.tensor([boundary, float.fromhex("0x1p-127")], dtype=torch.float32)
    up = torch.full_like(edges, math.inf)
    x32 = torch.cat(
        [
            bits.view(torch.float32),
            edges,
            torch.nextafter(edges, up),
            torch.nextafter(edges, -up),
        ]
    )
    x = x32.to(dtype)
    x = x[(x.float() > 0) & (x.float() < FP32_MIN_NORMAL)]
    expected = torch.from_numpy(_nearest_power_of_two(x.double().numpy())).float()
    for saturate in (True, False):
        _assert_cast_equal(
            x,
            round_to_grid(x, E8M0, saturate=saturate),
            expected,
            f"e8m0 fp32-subnormal inputs saturate={saturate} {dtype}",
        )
        _assert_cast_equal(
            x,
            cast(x, E8M0, saturate=saturate).float(),
            expected,
            f"e8m0 cast fp32-subnormal inputs saturate={saturate} {dtype}",
        )


def test_e8m0_fp32_subnormal_inputs_agree_with_ml_dtypes_where_it_rounds_to_nearest() -> None:
    # Where the installed ml_dtypes rounds float32-subnormal E8M0 inputs to nearest (0.7
    # and newer), the generic reference tests compare them against ml_dtypes unfiltered;
    # this checks the same on the probe value and on every subnormal stride point here,
    # so the filter's removal is itself tested. With the quirk present it is skipped:
    # the float64 test above covers these inputs.
    if ML_DTYPES_E8M0_SUBNORMALS_UP:
        pytest.skip("installed ml_dtypes rounds fp32-subnormal E8M0 inputs upward")
    bits = torch.arange(1, 2**23, 997, dtype=torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([1.4 * 2.0**-127])])
    for saturate in (True, False):
        _assert_cast_equal(
            x,
            round_to_grid(x, E8M0, saturate=saturate),
            _ml_reference(x, E8M0, saturate),
            f"e8m0 fp32-subnormal inputs vs ml_dtypes saturate={saturate}",
        )
    assert float(round_to_grid(torch.tensor([1.4 * 2.0**-127]), E8M0)[0]) == 2.0**-127


# ---------------------------------------------------------------------------- stochastic
N_DRAWS = 200_000
N_SIGMA = 5  # a false alarm per test has probability ~6e-7 (two-sided normal tail)


def _straddled_pairs(fmt: Format) -> list[tuple[float, float]]:
    """Neighbouring grid points at the bottom, around 1, and at the top of the range."""
    values = fmt.values
    positive = [v for v in values if v > 0]
    pairs = [(positive[0], positive[1]), (positive[-2], positive[-1])]
    if 0.0 in values:
        pairs.append((0.0, positive[0]))
    one = positive.index(1.0)
    pairs.append((positive[one], positive[one + 1]))
    if fmt.signed:
        pairs.append((-positive[one + 1], -positive[one]))
    return pairs


@ALL_FORMATS
def test_stochastic_rounding_is_unbiased(fmt: Format) -> None:
    gen = torch.Generator().manual_seed(7)
    for lo, hi in _straddled_pairs(fmt):
        for fraction in (0.3, 0.71):
            x = float(torch.tensor(lo + fraction * (hi - lo), dtype=torch.float32))
            got = cast(torch.full((N_DRAWS,), x), fmt, rounding="stochastic", generator=gen)
            got64 = got.to(torch.float64)
            # Always one of the two neighbours, and both occur.
            at_lo, at_hi = got64 == lo, got64 == hi
            assert bool((at_lo | at_hi).all()), f"{fmt.name}: x={x!r} left [{lo!r}, {hi!r}]"
            assert bool(at_lo.any()) and bool(at_hi.any()), f"{fmt.name}: x={x!r} one-sided"
            # Bernoulli(p) between lo and hi: mean x, variance p(1-p)(hi-lo)^2.
            p = (x - lo) / (hi - lo)
            std_err = (hi - lo) * math.sqrt(p * (1 - p) / N_DRAWS)
            mean = float(got64.mean())
            assert abs(mean - x) <= N_SIGMA * std_err, (
                f"{fmt.name}: mean of {N_DRAWS} draws at x={x!r} is {mean!r}; "
                f"|bias| {abs(mean - x):.3g} > {N_SIGMA} standard errors ({std_err:.3g})"
            )


@pytest.mark.parametrize(("fmt", "saturate"), FORMAT_MODES)
def test_stochastic_rounding_overflow_follows_policy(fmt: Format, saturate: bool) -> None:
    # Between max and the next (missing) grid point some draws round past max; those
    # overflow after rounding, exactly like round-to-nearest results do.
    x = torch.full((10_000,), overflow_threshold(fmt))  # strictly between max and the next step
    got = round_to_grid(
        x, fmt, saturate=saturate, rounding="stochastic", generator=torch.Generator().manual_seed(2)
    )
    if saturate:
        assert (got == fmt.max).all()
        return
    kept, overflowed = got[got == fmt.max], got[got != fmt.max]
    assert kept.numel() > 0 and overflowed.numel() > 0
    if fmt.has_inf:
        assert (overflowed == math.inf).all()
    else:
        assert torch.isnan(overflowed).all()


@ALL_FORMATS
def test_stochastic_rounding_keeps_grid_values(fmt: Format) -> None:
    x = torch.tensor(fmt.values, dtype=torch.float32).repeat(50)
    got = round_to_grid(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert_bitwise_equal(got, x, f"{fmt.name} stochastic on grid values")


@ALL_FORMATS
def test_stochastic_rounding_is_reproducible(fmt: Format) -> None:
    x = random_over_binades(fmt, 10_000, torch.Generator().manual_seed(5))
    x = x.clamp(-fmt.max, fmt.max)
    if not fmt.signed:
        x = x.abs()  # E8M0: negatives are NaN, nothing to draw

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return cast(x, fmt, rounding="stochastic", generator=gen)

    assert_bitwise_equal(draw(11), draw(11), f"{fmt.name} same seed")
    first, other = draw(11).float(), draw(12).float()
    assert not torch.equal(first, other), "a different seed gave identical draws"


# ---------------------------------------------------------------------------- API errors
@pytest.mark.parametrize("func", [cast, round_to_grid], ids=["cast", "round_to_grid"])
@pytest.mark.parametrize(
    "bad", [[1.0, 2.0], 1.5, np.ones(3, dtype=np.float32)], ids=["list", "float", "ndarray"]
)
def test_non_tensor_raises_type_error(func: object, bad: object) -> None:
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        func(bad, E4M3)  # type: ignore[operator]


@pytest.mark.parametrize("func", [cast, round_to_grid], ids=["cast", "round_to_grid"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64], ids=str)
def test_unsupported_dtype_raises_type_error(func: object, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=str(dtype)):
        func(torch.ones(3, dtype=dtype), E4M3)  # type: ignore[operator]


@pytest.mark.parametrize("func", [cast, round_to_grid], ids=["cast", "round_to_grid"])
def test_unknown_rounding_raises_value_error(func: object) -> None:
    with pytest.raises(ValueError, match="rounding"):
        func(torch.ones(3), E4M3, rounding="down")  # type: ignore[operator]


def test_unknown_format_raises_value_error() -> None:
    with pytest.raises(ValueError, match="known formats"):
        cast(torch.ones(3), "e3m4")


@pytest.mark.parametrize("fmt", ["E4M3", "float8_e5m2"])
def test_format_given_by_name(fmt: str) -> None:
    x = torch.tensor([1.3, -300.0])
    assert_bitwise_equal(cast(x, fmt), cast(x, by_name(fmt)), "name versus Format")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_shape_and_dtype_preserved(fmt: Format) -> None:
    x = torch.rand(3, 4, 5) * 4  # positive, inside every format's range
    got = cast(x, fmt)
    assert got.shape == (3, 4, 5)
    assert got.dtype == _storage_dtype(fmt)
    assert round_to_grid(x, fmt).shape == (3, 4, 5)
