"""Invariants of every format in ``fp8train.formats.FORMATS``, checked generically.

One parametrised class runs the same checks on every format; branches probe
capabilities (``has_inf``, ``has_nan``, ``has_negative_zero``, ``is_integer``, whether
zero is on the grid) rather than names. The independent references are ml_dtypes
(its finfo and its decode of every code), torch's dtypes, and hex-float literals.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train import round_to_grid
from fp8train.cast import overflow_threshold
from fp8train.formats import FORMATS, Format, by_name
from fp8train.testing import all_codes

# Our name -> the ml_dtypes type with the same encoding (None: compared to numpy int8).
ML_DTYPES: dict[str, type | None] = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "int8": None,
}

# Limits written out by hand as hex floats (decimal in the comment), independent of
# both our derivation and ml_dtypes.  Columns: max, min_normal, min_subnormal, epsilon.
LITERAL_LIMITS: dict[str, tuple[float, float, float, float]] = {
    "e4m3": (
        float.fromhex("0x1.cp8"),  # 448
        float.fromhex("0x1p-6"),  # 0.015625
        float.fromhex("0x1p-9"),  # 0.001953125
        float.fromhex("0x1p-3"),  # 0.125
    ),
    "e5m2": (
        float.fromhex("0x1.cp15"),  # 57344
        float.fromhex("0x1p-14"),  # 6.103515625e-05
        float.fromhex("0x1p-16"),  # 1.52587890625e-05
        float.fromhex("0x1p-2"),  # 0.25
    ),
    "e8m0": (
        float.fromhex("0x1p127"),  # 1.7014118346046923e+38
        float.fromhex("0x1p-127"),  # 5.877471754111438e-39 (no subnormals: same as normal)
        float.fromhex("0x1p-127"),  # 5.877471754111438e-39
        float.fromhex("0x1p0"),  # 1 (one value per binade)
    ),
    "e2m1": (
        float.fromhex("0x1.8p2"),  # 6
        float.fromhex("0x1p0"),  # 1
        float.fromhex("0x1p-1"),  # 0.5
        float.fromhex("0x1p-1"),  # 0.5
    ),
    "int8": (
        float.fromhex("0x1.fcp6"),  # 127
        float.fromhex("0x1p0"),  # 1 (the grid step)
        float.fromhex("0x1p0"),  # 1
        float.fromhex("0x1p0"),  # 1
    ),
    "e4m3fnuz": (
        float.fromhex("0x1.ep7"),  # 240
        float.fromhex("0x1p-7"),  # 0.0078125
        float.fromhex("0x1p-10"),  # 0.0009765625
        float.fromhex("0x1p-3"),  # 0.125
    ),
    "e5m2fnuz": (
        float.fromhex("0x1.cp15"),  # 57344
        float.fromhex("0x1p-15"),  # 3.0517578125e-05
        float.fromhex("0x1p-17"),  # 7.62939453125e-06
        float.fromhex("0x1p-2"),  # 0.25
    ),
}


def test_every_format_has_a_reference() -> None:
    # A new format must be added to both tables, or the class below silently skips it.
    assert set(ML_DTYPES) == set(FORMATS)
    assert set(LITERAL_LIMITS) == set(FORMATS)


def _reference_decode(fmt: Format) -> np.ndarray:
    """float64 value of every code, decoded by ml_dtypes (numpy for INT8)."""
    codes = np.arange(2**fmt.bits, dtype=np.uint8)
    ml = ML_DTYPES[fmt.name]
    if ml is None:
        return codes.view(np.int8).astype(np.float64)
    return codes.view(ml).astype(np.float64)


def _ours_decode(fmt: Format) -> np.ndarray:
    return np.array([fmt.decode(c) for c in range(2**fmt.bits)], dtype=np.float64)


def _assert_same_values(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Equal values, NaN where NaN, and the same sign of zero."""
    nan_ours, nan_ref = np.isnan(ours), np.isnan(ref)
    bad = (nan_ours != nan_ref) | (
        ~nan_ref & ((ours != ref) | (np.signbit(ours) != np.signbit(ref)))
    )
    idx = np.flatnonzero(bad)
    assert idx.size == 0, f"{what}: {idx.size} codes differ; first: " + ", ".join(
        f"code 0x{i:02x}: {ours[i]!r} != {ref[i]!r}" for i in idx[:8]
    )


def _round(x: float, fmt: Format, *, saturate: bool = True) -> float:
    """Our nearest-even rounding of one float32 value (the value as float64)."""
    return float(round_to_grid(torch.tensor([x], dtype=torch.float32), fmt, saturate=saturate))


def _next_up(x: float) -> float:
    """The float32 value one ulp above ``x``."""
    t = torch.tensor([x], dtype=torch.float32)
    return float(torch.nextafter(t, torch.full_like(t, math.inf)))


def _next_down(x: float) -> float:
    """The float32 value one ulp below ``x``."""
    t = torch.tensor([x], dtype=torch.float32)
    return float(torch.nextafter(t, torch.full_like(t, -math.inf)))


def _saturate_modes(fmt: Format) -> tuple[bool, ...]:
    """The saturate values ``fmt`` accepts: False needs an inf or a NaN to overflow to."""
    return (True, False) if fmt.has_inf or fmt.has_nan else (True,)


def _max_significand_is_odd(fmt: Format) -> bool:
    """Whether ``max`` / (its quantum) is odd, i.e. a tie above max rounds up (RNE).

    The significand includes the implicit leading bit, which is how ml_dtypes and
    torch round: for E8M0 (no mantissa) the significand is always 1, so ties go up.
    """
    if fmt.is_integer:
        return int(fmt.max) % 2 == 1
    exponent = max(math.frexp(fmt.max)[1] - 1, fmt.min_exponent)
    significand = fmt.max / math.ldexp(1.0, exponent - fmt.mantissa_bits)
    assert significand == int(significand)
    return int(significand) % 2 == 1


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
class TestFormat:
    # ------------------------------------------------------------ limits
    def test_limits_match_hex_literals(self, fmt: Format) -> None:
        assert (fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.epsilon) == LITERAL_LIMITS[fmt.name]

    def test_limits_match_ml_dtypes_finfo(self, fmt: Format) -> None:
        ml = ML_DTYPES[fmt.name]
        if ml is None:  # INT8: numpy's int8 with the code -128 left out (symmetric grid)
            info = np.iinfo(np.int8)
            assert fmt.max == info.max
            assert -fmt.max == info.min + 1
            assert fmt.bits == info.bits
            return
        fi = ml_dtypes.finfo(ml)  # type: ignore[no-untyped-call]  # ml_dtypes ships no types
        assert fmt.max == float(fi.max)
        assert fmt.min_normal == float(fi.smallest_normal)
        assert fmt.min_subnormal == float(fi.smallest_subnormal)
        assert fmt.epsilon == float(fi.eps)
        assert fmt.bits == fi.bits

    def test_binades_and_min_exponent(self, fmt: Format) -> None:
        assert fmt.binades == math.log2(fmt.max / fmt.min_subnormal)
        if not fmt.is_integer:
            assert fmt.min_normal == math.ldexp(1.0, fmt.min_exponent)

    def test_bits_add_up(self, fmt: Format) -> None:
        sign_bits = 1 if fmt.signed or fmt.is_integer else 0
        exponent_bits = 0 if fmt.is_integer else fmt.exponent_bits
        assert fmt.bits == sign_bits + exponent_bits + fmt.mantissa_bits
        if fmt.torch_dtype is not None:
            assert torch.empty((), dtype=fmt.torch_dtype).element_size() * 8 == fmt.bits

    # ------------------------------------------------------------ codes and values
    def test_decode_matches_ml_dtypes(self, fmt: Format) -> None:
        _assert_same_values(_ours_decode(fmt), _reference_decode(fmt), f"{fmt.name} vs ml_dtypes")

    def test_decode_matches_torch(self, fmt: Format) -> None:
        if fmt.torch_dtype is None:
            pytest.skip(f"torch has no dtype for {fmt.name}")
        ref = all_codes(fmt).to(torch.float64).numpy()
        _assert_same_values(_ours_decode(fmt), ref, f"{fmt.name} vs torch {fmt.torch_dtype}")

    def test_decode_rejects_out_of_range_codes(self, fmt: Format) -> None:
        with pytest.raises(ValueError, match="outside"):
            fmt.decode(2**fmt.bits)
        with pytest.raises(ValueError, match="outside"):
            fmt.decode(-1)

    def test_values_are_the_finite_ml_dtypes_values(self, fmt: Format) -> None:
        ref = _reference_decode(fmt)
        expected = {float(v) for v in ref if np.isfinite(v)}  # +0 and -0 merge in a set
        if fmt.is_integer:
            expected.discard(-128.0)  # the symmetric grid leaves -128 out
        assert fmt.values == tuple(sorted(expected))

    def test_values_are_sorted_unique_and_symmetric(self, fmt: Format) -> None:
        values = fmt.values
        assert all(a < b for a, b in itertools.pairwise(values))
        if fmt.signed:
            assert values == tuple(sorted(-v + 0.0 for v in values))  # + 0.0: -0 -> +0
        else:
            assert min(values) > 0

    def test_special_value_capabilities(self, fmt: Format) -> None:
        decoded = _ours_decode(fmt)
        assert fmt.has_inf == bool(np.isinf(decoded).any())
        assert fmt.has_nan == bool(np.isnan(decoded).any())
        negative_zero = bool(((decoded == 0) & np.signbit(decoded)).any())
        assert fmt.has_negative_zero == negative_zero

    def test_is_frozen(self, fmt: Format) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            fmt.bias = 0  # type: ignore[misc]

    # ------------------------------------------------------------ max and overflow
    def test_max_is_representable(self, fmt: Format) -> None:
        for saturate in _saturate_modes(fmt):
            assert _round(fmt.max, fmt, saturate=saturate) == fmt.max
            if fmt.signed:
                assert _round(-fmt.max, fmt, saturate=saturate) == -fmt.max

    def test_overflow_threshold_is_where_rounding_passes_max(self, fmt: Format) -> None:
        # Per its docstring: values strictly above the threshold overflow, values below
        # round to max, and the threshold itself overflows iff a tie there rounds up.
        threshold = overflow_threshold(fmt)
        assert _round(_next_down(threshold), fmt) == fmt.max
        if fmt.has_inf or fmt.has_nan:
            below = _round(_next_down(threshold), fmt, saturate=False)
            at = _round(threshold, fmt, saturate=False)
            above = _round(_next_up(threshold), fmt, saturate=False)
            assert below == fmt.max, f"{fmt.name}: just below {threshold.hex()} gave {below}"
            assert not math.isfinite(above), (
                f"{fmt.name}: {_next_up(threshold).hex()} > overflow_threshold "
                f"{threshold.hex()} gave {above}, not an overflow"
            )
            assert math.isfinite(at) != _max_significand_is_odd(fmt), (
                f"{fmt.name}: the threshold {threshold.hex()} itself gave {at}"
            )

    def test_overflow_threshold_matches_ml_dtypes(self, fmt: Format) -> None:
        # Independent of our rounding: ml_dtypes' own conversion of the float32 values
        # one ulp either side of overflow_threshold (non-saturating where it has one).
        ml = ML_DTYPES[fmt.name]
        if ml is None or not (fmt.has_inf or fmt.has_nan):
            pytest.skip(f"{fmt.name}: ml_dtypes saturates or has no type, nothing overflows")
        threshold = overflow_threshold(fmt)
        probes = np.array([_next_down(threshold), _next_up(threshold)], dtype=np.float32)
        below, above = probes.astype(ml).astype(np.float64)
        assert below == fmt.max
        assert not np.isfinite(above), (
            f"{fmt.name}: ml_dtypes rounds {float(probes[1]).hex()} (just above "
            f"overflow_threshold = {threshold.hex()}) to {above}, which is not an overflow"
        )

    def test_overflow_follows_policy(self, fmt: Format) -> None:
        # Far past the threshold (and inf): saturate gives +-max; otherwise inf when
        # the format has inf, else NaN.
        huge = [2.0 * overflow_threshold(fmt), float.fromhex("0x1.fffffep127"), math.inf]
        huge = [v for v in huge if math.isinf(v) or v < float.fromhex("0x1p128")]
        signs = (1.0, -1.0) if fmt.signed else (1.0,)
        for sign in signs:
            for v in huge:
                assert _round(sign * v, fmt) == sign * fmt.max
                if fmt.has_inf:
                    assert _round(sign * v, fmt, saturate=False) == sign * math.inf
                elif fmt.has_nan:
                    assert math.isnan(_round(sign * v, fmt, saturate=False))

    # ------------------------------------------------------------ underflow
    def test_half_smallest_subnormal_rounds_to_zero(self, fmt: Format) -> None:
        half = fmt.min_subnormal / 2
        has_zero = 0.0 in fmt.values
        for sign in (1.0, -1.0) if fmt.signed else (1.0,):
            got = _round(sign * half, fmt)
            if has_zero:  # a tie between 0 and the smallest subnormal: ties to even (0)
                assert got == 0.0
                assert math.copysign(1.0, got) == (sign if fmt.has_negative_zero else 1.0)
            else:  # no zero code (E8M0): underflow stops at the smallest value
                assert got == fmt.min_subnormal

    def test_just_above_half_smallest_subnormal_rounds_up(self, fmt: Format) -> None:
        just_above = _next_up(fmt.min_subnormal / 2)
        for sign in (1.0, -1.0) if fmt.signed else (1.0,):
            assert _round(sign * just_above, fmt) == sign * fmt.min_subnormal


class TestByName:
    @pytest.mark.parametrize("name", list(FORMATS))
    def test_case_insensitive(self, name: str) -> None:
        assert by_name(name) is FORMATS[name]
        assert by_name(name.upper()) is FORMATS[name]
        assert by_name(name.capitalize()) is FORMATS[name]

    @pytest.mark.parametrize(
        ("alias", "name"),
        [
            ("e4m3fn", "e4m3"),
            ("FLOAT8_E4M3FN", "e4m3"),
            ("float8_e5m2", "e5m2"),
            ("E8M0FNU", "e8m0"),
            ("fp4", "e2m1"),
            ("e2m1fn", "e2m1"),
        ],
    )
    def test_aliases(self, alias: str, name: str) -> None:
        assert by_name(alias) is FORMATS[name]

    @pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
    def test_format_passes_through(self, fmt: Format) -> None:
        assert by_name(fmt) is fmt

    def test_unknown_name_lists_known_names(self) -> None:
        with pytest.raises(ValueError, match="e4m3x") as info:
            by_name("e4m3x")
        for name in FORMATS:
            assert name in str(info.value)
