"""The E4M3/E5M2 encoders and decoders of the speed layer (fp8train._kernels.encoders)
give the reference cast's bits, eager and compiled, by every route."""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train import cast
from fp8train._kernels.encoders import CodeBytes
from fp8train.formats import E4M3, E5M2, Format, by_name
from fp8train.testing import assert_bitwise_equal


# ------------------------------------------------------- fp8_grid_values (float arithmetic)
def _all_fp32_of_binade(lo_exponent: int) -> torch.Tensor:
    """Every fp32 of magnitude in [2**lo_exponent, 2**(lo_exponent + 1)), both signs."""
    mantissas = torch.arange(2**23, dtype=torch.int32)
    positive = (mantissas | ((lo_exponent + 127) << 23)).view(torch.float32)
    return torch.cat([positive, -positive])


def _grid_value_inputs(fmt: Format) -> torch.Tensor:
    """Whole binades, each fp32 in them: the one below the smallest normal (subnormal
    steps, the tie into the normal range), the smallest normal one, [1, 2) and the one
    holding max (values past max saturate); plus every bf16 bit pattern that is finite,
    and both zeros. Veltkamp's split scales exactly with the binade (no intermediate
    underflows or overflows for |y| <= max), so the normal binades stand for all normal
    ones; the subnormal branch is one correctly rounded addition. (Every finite fp32 was
    checked once: no difference for E4M3 or E5M2, eager or compiled.)"""
    e_min = math.frexp(fmt.min_normal)[1] - 1
    e_max = math.frexp(fmt.max)[1] - 1
    binades = [_all_fp32_of_binade(e) for e in (e_min - 1, e_min, 0, e_max)]
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bf16 = bf16[torch.isfinite(bf16)].float()
    return torch.cat([*binades, bf16, torch.tensor([0.0, -0.0])])


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_grid_values_equal_the_cast_bit_for_bit(fmt: Format) -> None:
    """fp8_grid_values (Veltkamp split and a rounding addition, no FP8 conversion) gives
    the fp32 values of the saturating nearest cast, signed zeros included, eager and
    compiled (inductor must not simplify ``c - (c - y)``)."""
    from fp8train._kernels.encoders import fp8_grid_values

    y = _grid_value_inputs(fmt)
    expected = cast(y, fmt, saturate=True).float()
    compiled = torch.compile(fp8_grid_values, dynamic=False)
    for name, fn in (("eager", fp8_grid_values), ("compiled", compiled)):
        assert_bitwise_equal(fn(y, fmt), expected, f"{name} {fmt.name} grid values")


# Both ways int32 codes become bytes (which is faster depends on the CPU), checked on
# every machine.
CODE_BYTES = ["direct", "via_fp32"]


@pytest.mark.parametrize("code_bytes", CODE_BYTES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_grid_bytes_are_the_codes(fmt: Format, code_bytes: CodeBytes) -> None:
    """fp8_grid_bytes reads the code of an on-grid value off its fp32 bits: every finite
    code round-trips (both zeros, subnormals, max), and on the grid values of the inputs
    above it gives torch's cast byte for byte, eager and compiled, with either
    conversion of the codes to bytes."""
    from fp8train._kernels.encoders import fp8_grid_bytes, fp8_grid_values

    assert fmt.torch_dtype is not None
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = codes.view(fmt.torch_dtype).float()
    finite = torch.isfinite(decoded)
    y = _grid_value_inputs(fmt)
    expected = cast(y, fmt, saturate=True).view(torch.uint8)
    grid_bytes = functools.partial(fp8_grid_bytes, code_bytes=code_bytes)
    compiled = torch.compile(grid_bytes, dynamic=False)
    for name, fn in (("eager", grid_bytes), ("compiled", compiled)):
        assert_bitwise_equal(fn(decoded[finite], fmt), codes[finite], f"{name} {fmt.name} codes")
        assert_bitwise_equal(
            fn(fp8_grid_values(y, fmt), fmt), expected, f"{name} {fmt.name} bytes of grid values"
        )


@pytest.mark.parametrize("code_bytes", CODE_BYTES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_codes_equal_the_cast_byte_for_byte(fmt: Format, code_bytes: CodeBytes) -> None:
    """fp8_codes rounds on the input's bits (integer RNE for normals, the rounding
    addition for subnormals) and gives torch's saturating cast byte for byte, eager and
    compiled. The integer rounding treats every binade alike (only the exponent field
    differs, and a carry into it is the next binade's first value), so the whole binades
    of the inputs stand for all of them; the clamp covers everything past max."""
    from fp8train._kernels.encoders import fp8_codes

    y = _grid_value_inputs(fmt)
    expected = cast(y, fmt, saturate=True).view(torch.uint8)
    codes = functools.partial(fp8_codes, code_bytes=code_bytes)
    compiled = torch.compile(codes, dynamic=False)
    for name, fn in (("eager", codes), ("compiled", compiled)):
        assert_bitwise_equal(fn(y, fmt), expected, f"{name} {fmt.name} codes")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_word_values_decode_every_code_in_every_byte_of_a_word(fmt: Format) -> None:
    """fp8_word_values (the payload's bytes read as int32 words) gives ml_dtypes' value of
    every code -- zeros, subnormals, max, inf and NaN -- at each of the four byte
    positions of a word, eager and compiled."""
    from fp8train._kernels.encoders import fp8_word_values

    assert fmt.torch_dtype is not None
    np_dtype = {E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}[fmt]
    codes = np.arange(256, dtype=np.uint8)
    rows = np.stack([np.roll(codes, r) for r in range(4)])  # each code at offsets 0..3
    expected = torch.from_numpy(rows.view(np_dtype).astype(np.float32))
    payload = torch.from_numpy(rows.copy()).view(fmt.torch_dtype)
    compiled = torch.compile(fp8_word_values, dynamic=False)
    for name, fn in (("eager", fp8_word_values), ("compiled", compiled)):
        assert_bitwise_equal(fn(payload), expected, f"{name} {fmt.name} decoded codes")


def test_fp8_word_values_rejects_what_it_cannot_read_as_words() -> None:
    from fp8train._kernels.encoders import fp8_word_values

    with pytest.raises(TypeError, match="E4M3/E5M2"):
        fp8_word_values(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"divisible by 4, got shape \(2, 6\)"):
        fp8_word_values(torch.zeros(2, 6).to(torch.float8_e4m3fn))


def test_fp8_grid_values_rejects_other_formats() -> None:
    from fp8train._kernels.encoders import fp8_codes, fp8_grid_bytes, fp8_grid_values, fp8_payload

    for from_bits in (True, False):  # either route refuses alike
        with pytest.raises(ValueError, match="e4m3 and e5m2"):
            fp8_payload(torch.ones(3), by_name("int8"), from_bits=from_bits)
        with pytest.raises(TypeError, match="float32"):
            fp8_payload(torch.ones(3, dtype=torch.bfloat16), E4M3, from_bits=from_bits)
    with pytest.raises(ValueError, match="e4m3 and e5m2"):
        fp8_codes(torch.ones(3), by_name("int8"))
    with pytest.raises(TypeError, match="float32"):
        fp8_codes(torch.ones(3, dtype=torch.bfloat16), E4M3)

    with pytest.raises(ValueError, match="e4m3 and e5m2"):
        fp8_grid_values(torch.ones(3), by_name("int8"))
    with pytest.raises(ValueError, match="e4m3 and e5m2"):
        fp8_grid_bytes(torch.ones(3), by_name("int8"))
