"""scaled_mm against a float64 reference and against torch._scaled_mm, for every
granularity pair the recipes use, plus its argument validation.

Reference: ``a.dequantize(float64) @ b.dequantize(float64)``. ``dequantize`` forms each
operand as payload * fp32(1/scale) in fp32 (exactly what the emulation multiplies), so
the reference differs from the emulation only by the GEMM's own fp32 accumulation and
the final rounding to ``out_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

import fp8train.matmul
from fp8train import (
    E4M3,
    E5M2,
    INT8,
    Format,
    Granularity,
    ScaledTensor,
    ScaleSpec,
    quantize,
    scaled_mm,
)
from fp8train.matmul import gemm_dtype
from fp8train.testing import assert_bitwise_equal

G = Granularity
U_FP32 = 2.0**-24  # unit roundoff of fp32 (24 significant bits)
# Unit roundoff of each output dtype: bf16 has 8 significant bits, fp16 11.
U_OUT = {torch.float32: U_FP32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

TENSOR = ScaleSpec()
ROW_A = ScaleSpec(granularity=G.ROW, axis=-1)  # one scale per row of a (constant along K)
ROW_B = ScaleSpec(granularity=G.ROW, axis=0)  # one scale per column of b
BLOCK_ACT = ScaleSpec(granularity=G.BLOCK, block=(1, 128))
BLOCK_W = ScaleSpec(granularity=G.BLOCK, block=(128, 128))
BLOCK_COL = ScaleSpec(granularity=G.BLOCK, block=(128, 1))
MX_A = ScaleSpec(granularity=G.MX, block=(1, 32))
MX_B = ScaleSpec(granularity=G.MX, block=(32, 1))

# (name, a spec, b spec): the pairs the recipes build.
PAIRS = [
    ("tensor-tensor", TENSOR, TENSOR),
    ("row-row", ROW_A, ROW_B),
    ("tensor-row", TENSOR, ROW_B),
    ("row-tensor", ROW_A, TENSOR),
    ("block1x128-block128x128", BLOCK_ACT, BLOCK_W),
    ("block1x128-block128x1", BLOCK_ACT, BLOCK_COL),
    ("mx1x32-mx32x1", MX_A, MX_B),
    ("int8-tensor", replace(TENSOR, fmt=INT8), replace(TENSOR, fmt=INT8)),
    ("int8-row", replace(ROW_A, fmt=INT8), replace(ROW_B, fmt=INT8)),
]
# (M, K, N): non-multiples of every block, one exact fit, one skinny.
SHAPES = [(70, 300, 90), (128, 256, 64), (1, 33, 5)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _operands(
    m: int, k: int, n: int, sa: ScaleSpec, sb: ScaleSpec, seed: int = 0
) -> tuple[ScaledTensor, ScaledTensor]:
    gen = torch.Generator().manual_seed(seed)
    # Different magnitudes per operand and per row/column, so scales differ.
    a = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-4, 5, (m, 1), generator=gen))
    b = torch.randn(k, n, generator=gen) * torch.exp2(torch.randint(-4, 5, (1, n), generator=gen))
    return quantize(a, sa, name="a"), quantize(b, sb, name="b")


def _reference(qa: ScaledTensor, qb: ScaledTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``a @ b`` and ``|a| @ |b|`` of the dequantised (fp32-valued) operands.

    Each product of two fp32 values is exact in float64; summing K <= 300 of them errs by
    at most ~K * 2^-53 relative, 2^29 times below the fp32 bound checked against it."""
    a64, b64 = qa.dequantize(torch.float64), qb.dequantize(torch.float64)
    return a64 @ b64, a64.abs() @ b64.abs()


def _assert_within_accumulation_bound(
    out: torch.Tensor, ref: torch.Tensor, abs_prod: torch.Tensor, k: int, what: str
) -> None:
    """Elementwise: |out - ref| <= u_out |ref| + (1 + u_out) K u_fp32 sum_k |a_ik| |b_kj|.

    The second term is the standard worst-case bound for a length-K fp32 dot product
    (Higham, gamma_K ~ K u); the first is the final rounding to out_dtype (zero for fp32,
    whose rounding the accumulation term already counts). Operands are exact fp32 values
    (see the module docstring), so nothing else contributes.
    """
    u_out = U_OUT[out.dtype] if out.dtype != torch.float32 else 0.0
    bound = u_out * ref.abs() + (1 + u_out) * k * U_FP32 * abs_prod
    err = (out.double() - ref).abs()
    excess = err - bound
    worst = divmod(int(excess.argmax()), out.shape[1])
    assert bool((excess <= 0).all()), (
        f"{what}: out {tuple(out.shape)} {out.dtype}: at {worst} err {err[worst].item():.3g} > "
        f"bound {bound[worst].item():.3g} (ref {ref[worst].item():.6g}); max relative "
        f"error {(err / ref.abs().clamp(min=1e-30)).max().item():.3g}"
    )


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, sa, sb", PAIRS, ids=[p[0] for p in PAIRS])
def test_emulated_against_float64_reference(
    name: str,
    sa: ScaleSpec,
    sb: ScaleSpec,
    shape: tuple[int, int, int],
    power_of_two: bool,
    gemm_route: str,
) -> None:
    sa, sb = replace(sa, power_of_two=power_of_two), replace(sb, power_of_two=power_of_two)
    qa, qb = _operands(*shape, sa, sb)
    ref, abs_prod = _reference(qa, qb)
    for out_dtype in OUT_DTYPES:
        out = scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
        assert out.dtype == out_dtype and out.shape == (shape[0], shape[2])
        _assert_within_accumulation_bound(
            out, ref, abs_prod, shape[1], f"{name} pow2={power_of_two}"
        )
        # "auto" on CPU is the emulation.
        assert_bitwise_equal(scaled_mm(qa, qb, out_dtype=out_dtype), out, f"{name} auto")


@pytest.mark.parametrize("fa, fb", [(E4M3, E5M2), (E5M2, E4M3), (E5M2, E5M2)], ids=lambda f: f.name)
@pytest.mark.parametrize("name, sa, sb", PAIRS[:4], ids=[p[0] for p in PAIRS[:4]])
def test_mixed_fp8_formats_against_reference(
    name: str, sa: ScaleSpec, sb: ScaleSpec, fa: Format, fb: Format
) -> None:
    qa, qb = _operands(70, 300, 90, replace(sa, fmt=fa), replace(sb, fmt=fb))
    ref, abs_prod = _reference(qa, qb)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
        _assert_within_accumulation_bound(out, ref, abs_prod, 300, f"{name} {fa.name} x {fb.name}")


# ---------------------------------------------------------------- vs torch._scaled_mm
# With power-of-two scales every dequantised value, product and scaling is exact, so
# the tests find the two equal bit for bit on every CPU tried so far. With
# other scales, CPU torch._scaled_mm takes one of two oneDNN paths: on some CPUs it
# dequantises to fp32 first, as the emulation does, and the bits agree; on CPUs with
# AVX512-FP16 or AMX, e4m3 x e4m3 runs a native FP8 kernel
# whose scaling and summation order differ. That one pair is checked against the
# float64 reference within the accumulation bound (both backends) instead.
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("fa, fb", [(E4M3, E4M3), (E4M3, E5M2), (E5M2, E4M3)], ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, sa, sb", PAIRS[:2], ids=[p[0] for p in PAIRS[:2]])
def test_emulated_bitwise_equals_torch_scaled_mm(
    name: str,
    sa: ScaleSpec,
    sb: ScaleSpec,
    shape: tuple[int, int, int],
    fa: Format,
    fb: Format,
    power_of_two: bool,
    out_dtype: torch.dtype,
    gemm_route: str,
) -> None:
    sa = replace(sa, fmt=fa, power_of_two=power_of_two)
    sb = replace(sb, fmt=fb, power_of_two=power_of_two)
    qa, qb = _operands(*shape, sa, sb, seed=1)
    hw = scaled_mm(qa, qb, out_dtype=out_dtype, backend="scaled_mm")
    emu = scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
    what = f"{name} {fa.name}x{fb.name} pow2={power_of_two} {shape} {gemm_route} route"
    if power_of_two or not fa is fb is E4M3:
        assert_bitwise_equal(emu, hw, what)
        return
    ref, abs_prod = _reference(qa, qb)
    _assert_within_accumulation_bound(emu, ref, abs_prod, shape[1], f"emulated {what}")
    # The native kernel may scale after the GEMM: 2 more fp32 roundings per product.
    _assert_within_accumulation_bound(hw, ref, abs_prod, shape[1] + 2, f"_scaled_mm {what}")


@pytest.mark.parametrize("native", [True, False], ids=["bf16-native", "bf16-fallback"])
def test_gemm_dtype_is_bf16_only_where_exact_and_native(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp8train.matmul, "bf16_gemm_is_native", lambda device_type: native)
    assert gemm_dtype(torch.bfloat16, True, "cpu") == (torch.bfloat16 if native else torch.float32)
    # Not exact in bf16 (non-power-of-two scales), or not a bf16 output: fp32 either way.
    assert gemm_dtype(torch.bfloat16, False, "cpu") == torch.float32
    assert gemm_dtype(torch.float32, True, "cpu") == torch.float32
    assert gemm_dtype(torch.float16, True, "cpu") == torch.float32


# (machine, AVX512_BF16, AMX tiles, oneDNN's bf16 probe) -> bf16 GEMMs faster than fp32.
CPUS = {
    "zen4": ("x86_64", True, False, True, True),
    "sapphire-rapids": ("x86_64", True, True, True, True),
    # oneDNN takes bf16 on plain AVX-512 but converts to fp32: 3x slower here.
    "ice-lake": ("x86_64", False, False, True, False),
    "zen3-avx2": ("x86_64", False, False, False, False),
    # Off x86 the oneDNN probe decides (it asks for Arm's BF16 extension).
    "arm-bf16": ("aarch64", False, False, True, True),
    "arm-no-bf16": ("aarch64", False, False, False, False),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_bf16_gemm_is_native_only_with_bf16_instructions(
    cpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine, avx512_bf16, amx, onednn, expected = CPUS[cpu]
    monkeypatch.setattr(fp8train.matmul.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(
        torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn, raising=False
    )
    fp8train.matmul.bf16_gemm_is_native.cache_clear()
    try:
        assert fp8train.matmul.bf16_gemm_is_native("cpu") is expected, cpu
        assert fp8train.matmul.bf16_gemm_is_native("cuda") is True
    finally:
        fp8train.matmul.bf16_gemm_is_native.cache_clear()


@pytest.mark.parametrize("name, sa, sb", PAIRS[2:], ids=[p[0] for p in PAIRS[2:]])
def test_scaled_mm_backend_rejects_layouts_it_cannot_take(
    name: str, sa: ScaleSpec, sb: ScaleSpec
) -> None:
    # Mixed tensor/row, block, MX and INT8 pairs are valid GEMMs (the emulation runs
    # them) but not torch._scaled_mm layouts.
    qa, qb = _operands(64, 128, 32, sa, sb)
    scaled_mm(qa, qb, backend="emulate")
    with pytest.raises(ValueError, match="emulate") as info:
        scaled_mm(qa, qb, backend="scaled_mm")
    assert repr(qa) in str(info.value) and repr(qb) in str(info.value)


# ---------------------------------------------------------------- validation
def _q(shape: tuple[int, ...], spec: ScaleSpec = TENSOR) -> ScaledTensor:
    return quantize(torch.randn(shape), spec)


INVALID = [
    ("shape mismatch", lambda: (_q((8, 32)), _q((16, 8))), "shape mismatch"),
    ("3-D a", lambda: (_q((2, 8, 32)), _q((32, 8))), "2-D"),
    ("1-D b", lambda: (_q((8, 32)), _q((32,))), "2-D"),
    ("e4m3 x int8", lambda: (_q((8, 32)), _q((32, 16), replace(TENSOR, fmt=INT8))), "int8"),
    (
        "int8 x e5m2",
        lambda: (_q((8, 32), replace(TENSOR, fmt=INT8)), _q((32, 16), replace(TENSOR, fmt=E5M2))),
        "do not pair",
    ),
    ("row x block", lambda: (_q((8, 128), ROW_A), _q((128, 16), BLOCK_W)), "granularities"),
    ("block x tensor", lambda: (_q((8, 128), BLOCK_ACT), _q((128, 16))), "granularities"),
    ("mx x block", lambda: (_q((8, 64), MX_A), _q((64, 16), BLOCK_COL)), "granularities"),
    (
        "block K-chunk mismatch",
        lambda: (_q((8, 256), BLOCK_ACT), _q((256, 16), replace(BLOCK_W, block=(64, 64)))),
        "K chunk",
    ),
    (
        "mx K-chunk mismatch",
        lambda: (_q((8, 64), MX_A), _q((64, 16), replace(MX_B, block=(16, 1)))),
        "K chunk",
    ),
    ("a row scales vary along K", lambda: (_q((8, 32), ROW_B), _q((32, 16), ROW_B)), "along K"),
    ("b row scales vary along K", lambda: (_q((8, 32), ROW_A), _q((32, 16), ROW_A)), "along K"),
    ("a columnwise x tensor", lambda: (_q((8, 32), ROW_B), _q((32, 16))), "along K"),
]


@pytest.mark.parametrize("backend", ["emulate", "scaled_mm", "auto"])
@pytest.mark.parametrize("what, make, match", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_pairs_raise_naming_both_operands(
    what: str, make: Callable[[], tuple[ScaledTensor, ScaledTensor]], match: str, backend: Any
) -> None:
    qa, qb = make()
    assert repr(qa) != repr(qb)  # so the check below can tell them apart
    with pytest.raises(ValueError, match=match) as info:
        scaled_mm(qa, qb, backend=backend)
    msg = str(info.value)
    assert repr(qa) in msg and repr(qb) in msg, msg


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.int32, torch.float8_e4m3fn], ids=str)
def test_bad_out_dtype_raises(out_dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_mm(_q((8, 32)), _q((32, 16)), out_dtype=out_dtype)


@pytest.mark.parametrize("backend", ["cuda", "hw", "", "Emulate"])
def test_bad_backend_raises(backend: Any) -> None:
    with pytest.raises(ValueError, match="backend"):
        scaled_mm(_q((8, 32)), _q((32, 16)), backend=backend)


# ---------------------------------------------------------------- autocast
# Autocast must not reach the GEMM: an fp32 output asks for fp32 operands and accumulation.
@pytest.mark.parametrize(
    "name, sa, sb", [PAIRS[0], PAIRS[1], PAIRS[4]], ids=[PAIRS[0][0], PAIRS[1][0], PAIRS[4][0]]
)
def test_fp32_output_unchanged_under_bf16_autocast(name: str, sa: ScaleSpec, sb: ScaleSpec) -> None:
    qa, qb = _operands(70, 300, 90, sa, sb)
    for out_dtype in (torch.float32, torch.bfloat16):
        plain = scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
        assert_bitwise_equal(under, plain, f"{name} {out_dtype} under autocast")


@pytest.mark.parametrize("name, sa, sb", [PAIRS[0], PAIRS[1]], ids=[PAIRS[0][0], PAIRS[1][0]])
def test_scaled_mm_backend_unchanged_under_bf16_autocast(
    name: str, sa: ScaleSpec, sb: ScaleSpec
) -> None:
    qa, qb = _operands(70, 300, 90, sa, sb)
    plain = scaled_mm(qa, qb, out_dtype=torch.float32, backend="scaled_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = scaled_mm(qa, qb, out_dtype=torch.float32, backend="scaled_mm")
    assert_bitwise_equal(under, plain, f"{name} scaled_mm under autocast")
