"""FP4 (E2M1) bytes and scales, against independent references: ml_dtypes' E2M1 and
E4M3 casts, and the MX and NVFP4 scale rules computed here in float64 (each fp32
operation of the NVFP4 rule rounded to fp32 with numpy: a float64 +, *, / of two fp32
numbers rounded once to fp32 is the correctly rounded fp32 result, 53 >= 2 * 24 + 2)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import fp8train
from fp8train.cast import cast, e2m1_codes, pack_e2m1, unpack_e2m1
from fp8train.recipes import Recipe
from fp8train.scaling import ScaleSpec, compute_amax, scale_from_amax
from fp8train.tensor import ScaledTensor, quantize

F4 = ml_dtypes.float4_e2m1fn


def _ml_e2m1(x: torch.Tensor) -> torch.Tensor:
    """ml_dtypes' E2M1 cast (round to nearest even, overflow saturating to +-6)."""
    return torch.from_numpy(x.numpy().astype(F4).astype(np.float32))


def _ml_codes(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(F4).view(np.uint8) & 0xF)


# --------------------------------------------------------------------------- bytes


def test_all_256_bytes_round_trip_and_decode_as_ml_dtypes() -> None:
    every = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    values = unpack_e2m1(every, 2)  # (256, 2): low nibble first
    assert torch.equal(pack_e2m1(values), every)
    low = torch.from_numpy((every.numpy() & 0xF).view(F4).astype(np.float32))[:, 0]
    high = torch.from_numpy((every.numpy() >> 4).view(F4).astype(np.float32))[:, 0]
    # Bitwise, so that -0.0 must be -0.0.
    assert torch.equal(values[:, 0].view(torch.int32), low.view(torch.int32))
    assert torch.equal(values[:, 1].view(torch.int32), high.view(torch.int32))


def test_packing_is_torchs_float4_x2_layout() -> None:
    # torch.float4_e2m1fn_x2: element 0 in bits 3..0, element 1 in bits 7..4.
    packed = pack_e2m1(torch.tensor([[0.5, -6.0]]))
    assert packed.tolist() == [[0x1 | (0xF << 4)]]
    as_x2 = packed.view(torch.float4_e2m1fn_x2)
    assert torch.equal(unpack_e2m1(as_x2, 2), torch.tensor([[0.5, -6.0]]))


@pytest.mark.parametrize("cols", [1, 15, 16, 33])
def test_odd_last_dimension_is_padded_with_a_zero_code(cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    x = cast(torch.randn(3, cols, generator=g) * 3, "e2m1")
    packed = pack_e2m1(x)
    assert packed.shape == (3, (cols + 1) // 2) and packed.dtype == torch.uint8
    if cols % 2:
        assert bool((packed[:, -1] >> 4 == 0).all()), "the pad is a +0 code"
    assert torch.equal(unpack_e2m1(packed, cols), x)
    with pytest.raises(ValueError, match="columns pack into"):
        unpack_e2m1(packed, cols + 2)


def test_pack_refuses_values_off_the_grid() -> None:
    with pytest.raises(ValueError, match="off it"):
        pack_e2m1(torch.tensor([0.7]))


def test_scaled_tensor_holds_half_a_byte_per_element() -> None:
    x = torch.randn(8, 33)
    for name in ("mxfp4", "nvfp4"):
        q = quantize(x, Recipe.from_name(name).input)
        assert q.stored.dtype == torch.uint8 and q.stored.shape == (8, 17)
        assert q.shape == (8, 33) and q.data.shape == (8, 33)
        assert torch.equal(pack_e2m1(q.data), q.stored)
        # rebuilt from its bytes (as backward does), the same values
        again = ScaledTensor(q.stored, q.scale, q.spec, q.orig_dtype, cols=33)
        assert torch.equal(again.dequantize(), q.dequantize())


# ---------------------------------------------------------------------- the cast


def _sweep() -> torch.Tensor:
    """Every multiple of 2^-12 in [0, 8) (ties of every binade included: 0.25, 0.75,
    1.25, 1.75, 2.5, 3.5, 5), the subnormal 0.5 and its neighbours, values around the
    saturation threshold, huge values, inf, fp32 subnormals and both zeros, with both
    signs, plus random fp32 bit patterns (finite)."""
    grid = torch.arange(0, 8 * 4096, dtype=torch.float64) / 4096
    corners = [0.25, 0.2500001, 0.2499999, 0.5, 0.75, 5.0, 5.0000005, 6.0, 6.5, 6.9999995]
    corners += [7.0, 7.0001, 100.0, 3.0e38, math.inf, 1e-45, 1e-40, 1.2e-38, 0.0]
    special = torch.tensor(
        corners,
        dtype=torch.float64,
    )
    pos = torch.cat([grid, special]).float()
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (100_000,), generator=g, dtype=torch.int64)
    random = bits.to(torch.int32).view(torch.float32)
    random = random[torch.isfinite(random)]
    return torch.cat([pos, -pos, random, -random])


def test_cast_is_bit_exact_against_ml_dtypes() -> None:
    x = _sweep()
    ours = cast(x, "e2m1")
    theirs = _ml_e2m1(x)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), "values and signs"
    assert torch.equal(e2m1_codes(ours), _ml_codes(x)), "codes"
    # The corners by name.
    assert cast(torch.tensor([0.25, 0.75, 2.5, 5.0]), "e2m1").tolist() == [0.0, 1.0, 2.0, 4.0]
    assert cast(torch.tensor([0.2500001, 6.9, math.inf]), "e2m1").tolist() == [0.5, 6.0, 6.0]
    assert torch.signbit(cast(torch.tensor([-0.0, -0.1]), "e2m1")).all()


def test_cast_of_bf16_inputs_is_bit_exact_too() -> None:
    x = _sweep().to(torch.bfloat16)
    assert torch.equal(cast(x, "e2m1").view(torch.int32), _ml_e2m1(x.float()).view(torch.int32))


# ------------------------------------------------------------------------ MX scales


def _mx_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX v1.0 in float64: per 1 x block group, shared exponent
    X = floor(log2 amax) - emax_elem with emax_elem = 2 (E2M1's largest binade, 6 =
    1.5 * 2^2), clamped to E8M0's [-127, 127] (an all-zero block: -127); elements
    E2M1(x / 2^X). Returns (multiply-to-enter scales 2^-X, payload)."""
    rows, cols = x.shape
    scales = torch.empty(rows, -(-cols // block), dtype=torch.float64)
    payload = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(scales.shape[1]):
            chunk = x[i, j * block : (j + 1) * block].double()
            amax = float(chunk.abs().max())
            shared = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127
            shared = max(-127, min(127, shared))
            scales[i, j] = 2.0**-shared
            scaled = (chunk * 2.0**-shared).float()  # exact: a power of two
            payload[i, j * block : (j + 1) * block] = _ml_e2m1(scaled)
    return scales, payload


def test_mxfp4_scales_follow_the_ocp_floor_rule() -> None:
    g = torch.Generator().manual_seed(1)
    # Rows of very different magnitude, one all-zero block, a block with amax 6 * 2^k.
    x = torch.randn(6, 96, generator=g) * torch.logspace(-30, 30, 6, base=2)[:, None]
    x[2, 32:64] = 0
    x[3, :32] = x[3, :32].clamp(-1, 1)
    x[3, 0] = 6 * 2.0**5
    spec = Recipe.from_name("mxfp4").input
    q = quantize(x, spec)
    want_scale, want_payload = _mx_reference(x, 32)
    assert torch.equal(q.scale.double(), want_scale)
    assert torch.equal(q.data, want_payload)
    # The floor rule saturates the block maximum when its significand exceeds 1.5.
    assert float(q.data.abs().max()) == 6.0


# --------------------------------------------------------------------- NVFP4 scales


def _nvfp4_reference(x: torch.Tensor, br: int, bc: int) -> tuple[np.ndarray, torch.Tensor]:
    """NVFP4's two-level rule (arXiv 2509.25149, appendix), float64 math rounded to
    fp32 after every operation, E4M3 by ml_dtypes; zero and underflowing block scales
    raised to E4M3's 2^-9 (fp8train's documented corner)."""
    f32 = np.float32
    a = x.double().abs().numpy()
    rows, cols = a.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    big = f32(a.max())
    s_enc = f32(448.0 * 6.0 / float(big)) if big > 0 else f32(1.0)
    s_dec = f32(1.0 / float(s_enc))
    scales = np.empty((gr, gc), dtype=np.float32)
    payload = torch.empty(rows, cols)
    for i in range(gr):
        for j in range(gc):
            tile = a[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            d_b = f32(float(f32(tile.max())) / 6.0)
            q_b = np.array(f32(float(d_b) * float(s_enc))).astype(ml_dtypes.float8_e4m3fn)
            q = max(float(q_b.astype(np.float32)), 2.0**-9)
            s_b = f32(1.0 / float(f32(q * float(s_dec))))
            scales[i, j] = s_b
            xs = x[i * br : (i + 1) * br, j * bc : (j + 1) * bc].double().numpy()
            prod = (xs * float(s_b)).astype(np.float32)  # one fp32 rounding
            payload[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = _ml_e2m1(torch.from_numpy(prod))
    return scales, payload


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_scales_follow_the_two_level_rule(block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 72, generator=g) * torch.logspace(-8, 8, 40, base=2)[:, None]
    x[:16, :16] = 0  # an all-zero block
    x[20:24, 16:32] *= 2.0**-30  # blocks whose E4M3 decode scale underflows
    spec = ScaleSpec("e2m1", "block", block=block, scale_fmt="e4m3")
    q = quantize(x, spec)
    want_scale, want_payload = _nvfp4_reference(x, *block)
    assert torch.equal(q.scale, torch.from_numpy(want_scale))
    assert torch.equal(q.data.view(torch.int32), want_payload.view(torch.int32))
    # The largest block's decode scale lands on E4M3's max: q_b * s_dec * 6 == amax.
    amax = compute_amax(x, spec)
    assert torch.allclose(6 / q.scale.flatten()[amax.flatten().argmax()], x.abs().max())


def test_nvfp4_scale_of_an_all_zero_tensor_is_finite() -> None:
    spec = Recipe.from_name("nvfp4").input
    scale = scale_from_amax(torch.zeros(2, 3), spec)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    q = quantize(torch.zeros(2, 48), spec)
    assert torch.equal(q.dequantize(), torch.zeros(2, 48))


def test_two_level_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="granularity='block'"):
        ScaleSpec("e2m1", "mx", block=(1, 32), scale_fmt="e4m3")
    with pytest.raises(ValueError, match="scale_fmt must be None"):
        ScaleSpec("e2m1", "block", block=(1, 16), scale_fmt="e5m2")
    with pytest.raises(ValueError, match="power_of_two"):
        ScaleSpec("e2m1", "block", block=(1, 16), scale_fmt="e4m3", power_of_two=True)


def test_16x16_weight_transpose_reuses_the_same_quantisation() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 80, generator=g)
    spec = Recipe.from_name("nvfp4").weight
    qw = quantize(w, spec)
    direct = quantize(w.t().contiguous(), spec.transposed())
    qt = qw.t()
    assert torch.equal(qt.scale, direct.scale)
    assert torch.equal(qt.stored, direct.stored)
    assert torch.equal(qt.dequantize(), qw.dequantize().t())


def test_recipe_descriptions_name_fp4() -> None:
    text = fp8train.recipes.describe_all()
    assert "mxfp4: OCP MXFP4" in text and "nvfp4: NVIDIA NVFP4" in text
    assert "random Hadamard" in Recipe.from_name("nvfp4").gemms()
    assert "stochastic rounding" in Recipe.from_name("nvfp4").gemms()
