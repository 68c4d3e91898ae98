"""End-to-end numerics of the FP8 linear (autograd.py, nn.py) for every recipe.

Shapes: ``x (4, 37, 256)`` so ``M = 148`` tokens (not a multiple of 128 or 32: the
block/MX paths pad), ``W (384, 256)``, a bias, a fixed random ``dy (4, 37, 384)``; in
fp32 and under bf16 autocast.

Three kinds of reference:

* **the same quantised operands** (tight): each recipe's quantisation is rebuilt from
  the public pieces (``fp8train.quantize`` with the recipe's specs, ``spec.transposed()``
  where a backward GEMM contracts the other axis, as autograd.py documents) and
  multiplied in float64. The only admissible difference is fp32 accumulation plus the
  rounding to the output dtype, bounded element by element (see ``_gemm_bound``).
* **the unquantised layer** (loose): float64 ``x W^T + b`` and its gradients; SQNR in dB
  with named, derived thresholds.
* **the hardware GEMM**: ``torch._scaled_mm`` (runs on CPU) on the operands the layer
  actually built, against the emulation.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch import nn

import fp8train
from fp8train import RECIPE_NAMES, Fp8Linear, Granularity, Recipe, ScaledTensor, quantize
from fp8train.autograd import NonFiniteWarning
from fp8train.testing import assert_bitwise_equal, assert_nested_bitwise_equal, sqnr

BATCH, SEQ, K, N = 4, 37, 256, 384
M = BATCH * SEQ  # 148 tokens
ROLES = ("input", "weight", "grad_output")
MODES = ("fp32", "bf16_autocast")

# Unit roundoffs: fp32 keeps 24 significant bits, bf16 keeps 8.
U_FP32 = 2.0**-24  # 0x1p-24 ~ 5.96e-8
U_BF16 = 2.0**-8  # 0x1p-8 ~ 3.91e-3


# ------------------------------------------------------------------------------ helpers


@dataclass
class Data:
    x: torch.Tensor  # (B, S, K) fp32
    w: torch.Tensor  # (N, K) fp32
    b: torch.Tensor  # (N,) fp32
    dy: torch.Tensor  # (B, S, N) fp32; cast to the output dtype before backward


@functools.cache
def _data() -> Data:
    g = torch.Generator().manual_seed(1234)
    return Data(
        x=torch.randn(BATCH, SEQ, K, generator=g),
        # Kaiming-like scale 1/sqrt(K): y has unit variance, as in a trained network.
        w=torch.randn(N, K, generator=g) / math.sqrt(K),
        b=torch.randn(N, generator=g) * 0.1,
        dy=torch.randn(BATCH, SEQ, N, generator=g),
    )


@pytest.fixture
def data() -> Data:
    """Shared, read-only inputs (tests clone before modifying)."""
    return _data()


def _layer(recipe: Recipe | str, d: Data, name: str = "layer") -> Fp8Linear:
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(d.w)
        lin.bias.copy_(d.b)
    return Fp8Linear.from_linear(lin, _nearest(Recipe.from_name(recipe)), name)


def _nearest(recipe: Recipe) -> Recipe:
    """The recipe without random draws (nvfp4's stochastic rounding of dy and Hadamard
    transform of the grad_weight inputs), so that the references below, which quantise
    with round-to-nearest, apply; tests/test_fp4_recipes.py checks those options."""
    dy = replace(recipe.grad_output, rounding="nearest")
    return replace(recipe, grad_output=dy, hadamard_wgrad=False)


@contextmanager
def _mode(mode: str) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
        yield


@dataclass
class Run:
    y: torch.Tensor  # (B, S, N) in the compute dtype
    dx: torch.Tensor
    dw: torch.Tensor
    db: torch.Tensor
    dy: torch.Tensor  # the dy actually fed to backward (output dtype)


def _run(layer: Fp8Linear, d: Data, mode: str) -> Run:
    x = d.x.clone().requires_grad_(True)
    with _mode(mode):
        y = layer(x)
    dy = d.dy.to(y.dtype)
    y.backward(dy)
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    return Run(y.detach(), x.grad, layer.weight.grad, layer.bias.grad, dy)


def _deq(q: ScaledTensor) -> torch.Tensor:
    # dequantize(float64) multiplies by the fp32 reciprocal of the scale, as the GEMM
    # backends do; for power-of-two scales that equals payload / scale exactly.
    out: torch.Tensor = q.dequantize(torch.float64)
    return out


@dataclass
class Reference:
    """Float64 products of the operands the recipe promises, plus what bounds them."""

    y: torch.Tensor  # (M, N), bias included
    dx: torch.Tensor  # (M, K)
    dw: torch.Tensor  # (N, K)
    y_bound: torch.Tensor
    dx_bound: torch.Tensor
    dw_bound: torch.Tensor


def _gemm_bound(
    a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, exact: torch.Tensor | None = None
) -> torch.Tensor:
    """Elementwise bound on |computed - exact| of ``a @ b`` (float64 operands, exact values).

    fp32 accumulation: any summation order satisfies |fl(a.b) - a.b| <= gamma_k |a|.|b|
    with gamma_k = k u / (1 - k u), k the contraction length (Higham, Accuracy and
    Stability, Thm 3.5); products of two FP8 values are exact in fp32, so this is loose
    for FP8 and necessary for INT8 (non power-of-two scales). Rounding the fp32 result
    to bf16 adds at most U_BF16 times its magnitude: "one bf16 rounding".
    """
    k = a.shape[1]
    gamma = k * U_FP32 / (1 - k * U_FP32)
    acc = gamma * (a.abs() @ b.abs())
    if out_dtype == torch.bfloat16:
        acc = acc + U_BF16 * ((a @ b if exact is None else exact).abs() + acc)
    return acc


def _output_bound(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Bound for the output ``a @ b + bias``: scaled_mm adds the bias in the GEMM epilogue,
    before the single rounding to out_dtype, after casting it to out_dtype.

    The bias is one more term of the fp32 sum (gamma_{k+1}); its cast to the output
    dtype errs by exactly ``|bias - bias.to(out_dtype)|`` (0 for fp32); then one rounding.
    """
    k = a.shape[1] + 1
    gamma = k * U_FP32 / (1 - k * U_FP32)
    b_out = bias.to(out_dtype).double()
    acc = gamma * (a.abs() @ b.abs() + b_out.abs())
    if out_dtype == torch.bfloat16:
        acc = acc + U_BF16 * ((a @ b + b_out).abs() + acc)
    return acc + (bias.double() - b_out).abs()


def _reference(
    recipe: Recipe, d: Data, run_dy: torch.Tensor, out_dtype: torch.dtype, *, fp8_saved: bool = True
) -> Reference:
    """Rebuild the recipe's three GEMMs from ``fp8train.quantize`` and multiply in float64.

    As autograd.py documents: forward quantises ``x2d (M, K)`` with ``recipe.input`` and
    ``W (N, K)`` with ``recipe.weight``; grad_input quantises ``dy (M, N)`` with
    ``recipe.grad_output`` and W with ``recipe.weight.transposed()`` (contracts N; for
    tensor and square-block specs this equals the forward quantisation, which the layer
    reuses); grad_weight quantises ``dy`` with ``grad_output.transposed()`` and the input
    with ``input.transposed()`` -- from the forward's payload dequantised to the gradient
    dtype when ``save_fp8_activations`` (re-quantisation), reusing the forward's FP8
    input as is for tensorwise specs. On the first step the delayed recipe's scales come
    from the current amax, so it is tensorwise here.
    """
    x2d = d.x.reshape(M, K)
    dy2d = run_dy.reshape(M, N)
    gdtype = run_dy.dtype
    qx = quantize(x2d, recipe.input)
    qw = quantize(d.w, recipe.weight)
    a, bt = _deq(qx), _deq(qw).t()  # (M, K), (K, N)
    mm = a @ bt
    y_bound = _output_bound(a, bt, d.b, out_dtype)

    qdy = quantize(dy2d, recipe.grad_output)
    qw_d = quantize(d.w, recipe.weight.transposed())
    g, w = _deq(qdy), _deq(qw_d)  # (M, N), (N, K)
    dx = g @ w
    dx_bound = _gemm_bound(g, w, gdtype, dx)

    qdy_w = quantize(dy2d, recipe.grad_output.transposed())
    if fp8_saved and recipe.input.granularity is Granularity.TENSOR:
        qx_w = qx
    elif fp8_saved:
        qx_w = quantize(qx.dequantize(gdtype), recipe.input.transposed())
    else:  # saved as the forward quantised it (quantize_from="input": x as it arrived)
        qx_w = quantize(x2d, recipe.input.transposed())
    gt, xw = _deq(qdy_w).t(), _deq(qx_w)  # (N, M), (M, K)
    dw = gt @ xw
    dw_bound = _gemm_bound(gt, xw, gdtype, dw)
    return Reference(mm + d.b.double(), dx, dw, y_bound, dx_bound, dw_bound)


def _assert_within(actual: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - ref| <= bound elementwise; the message gives the worst element and shape."""
    actual = actual.detach().double().reshape(ref.shape)
    err = (actual - ref).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bool(bad.any()):
        ratio = (err / bound.clamp_min(1e-300)).nan_to_num(math.inf).masked_fill(~bad, -1.0)
        i = tuple(int(v) for v in torch.unravel_index(ratio.argmax(), ratio.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.numel()} elements exceed the bound (shape "
            f"{tuple(ref.shape)}); worst at {list(i)}: actual {actual[i].item()!r}, reference "
            f"{ref[i].item()!r}, |err| {err[i].item():.3e} > bound {bound[i].item():.3e}"
        )


def _assert_sqnr(ref: torch.Tensor, actual: torch.Tensor, threshold: float, what: str) -> float:
    value: float = sqnr(ref, actual.detach().reshape(ref.shape))
    assert value >= threshold, (
        f"{what}: SQNR {value:.2f} dB < {threshold:.1f} dB (shape {tuple(ref.shape)}, "
        f"dtype {actual.dtype})"
    )
    return value


@functools.cache
def _default_run(name: str, mode: str) -> Run:
    """One forward/backward of the registered recipe (shared by (a) and (b); read-only)."""
    return _run(_layer(name, _data()), _data(), mode)


# ----------------------------------------------------- (a) against the same quantised operands


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_matches_float64_product_of_the_same_quantised_operands(
    name: str, mode: str, data: Data, gemm_route: str
) -> None:
    recipe = _nearest(Recipe.from_name(name))
    run = _run(_layer(name, data), data, mode)
    out_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    assert run.y.dtype == out_dtype and run.y.shape == (BATCH, SEQ, N)
    ref = _reference(recipe, data, run.dy, out_dtype)
    _assert_within(run.y, ref.y, ref.y_bound, f"{name}/{mode} output")
    _assert_within(run.dx, ref.dx, ref.dx_bound, f"{name}/{mode} grad_input")
    _assert_within(run.dw, ref.dw, ref.dw_bound, f"{name}/{mode} grad_weight")
    # Teeth: the unquantised products lie outside these bounds (the bounds are far
    # tighter than FP8's or INT8's rounding), so a wrong quantisation cannot pass.
    x64, w64, dy64 = data.x.double().reshape(M, K), data.w.double(), run.dy.double().reshape(M, N)
    assert not bool(((x64 @ w64.t() + data.b.double() - ref.y).abs() <= ref.y_bound).all())
    assert not bool(((dy64 @ w64 - ref.dx).abs() <= ref.dx_bound).all())
    assert not bool(((dy64.t() @ x64 - ref.dw).abs() <= ref.dw_bound).all())
    # db is a plain fp32 sum of dy over the tokens: exact up to fp32 summation.
    _assert_within(
        run.db, dy64.sum(0), M * U_FP32 * dy64.abs().sum(0) * 1.01, f"{name}/{mode} grad_bias"
    )


@pytest.mark.parametrize("mode", MODES)
def test_delayed_first_step_equals_tensorwise(mode: str, data: Data) -> None:
    tw, dl = _default_run("tensorwise", mode), _default_run("delayed", mode)
    for what in ("y", "dx", "dw", "db"):
        assert_bitwise_equal(getattr(dl, what), getattr(tw, what), what)


# --------------------------------------------------------- (b) against the unquantised layer

# Derivations (Gaussian data, round-to-nearest). A format with m mantissa bits has a
# relative error uniform in +-2^-(m+1) of the binade, so per quantised operand
# SQNR ~ 10 log10(3 * 2^(2m+2) * E[(v/2^e)^2]) with E[(v/2^e)^2] ~ 2.2 for Gaussian
# mantissas: E4M3 (m=3) ~ 32 dB, E5M2 (m=2) ~ 26 dB. A GEMM of two quantised operands
# adds both noises: E4M3 x E4M3 ~ 3 dB below one operand, ~28.5-29 dB. E5M2 dy x E4M3
# ~ 10 log10(1 / (10^-2.6 + 10^-3.2)) ~ 25 dB. INT8 with amax-based tensorwise scales:
# step = amax/127 with amax ~ 4.3 sigma over 37k-98k samples, noise step^2/12, so
# ~ 10 log10(12 * 127^2 / 4.3^2) ~ 40 dB per operand, ~37 dB per GEMM; per-row INT8
# scales see amax ~ 2.9 sigma over 256 values, ~ +3 dB. MXFP8's floor rule sets
# 2^floor(log2 amax) to 2^8, so block maxima in [448, 512) of the scaled range saturate
# to 448 and the 32-element blocks' top binade is clipped: ~1 dB below E4M3.
# Measured on this test's data (fp32 | bf16 autocast), y / dx / dW in dB:
#   tensorwise, delayed  28.5 / 24.5 / 24.5  |  28.5 / 24.5 / 24.5
#   rowwise, blockwise   28.5 / 28.5 / 28.5  |  28.5 / 28.5 / 28.5
#   mxfp8                27.6 / 27.5 / 27.4  |  27.6 / 27.5 / 27.4
#   int8                 37.7 / 37.4 / 37.5  |  37.6 / 37.3 / 37.4
#   int8_rowwise         40.3 / 39.9 / 38.8  |  40.1 / 39.8 / 38.6
# (int8_rowwise dW is lower: its x is re-quantised columnwise from the rowwise payload,
# a second INT8 rounding.) Thresholds sit 2-3 dB below the measured values; the bf16
# output rounding (~46 dB) costs at most ~0.2 dB.
SQNR_E4M3_GEMM = 26.5  # E4M3 x E4M3 (28.5 measured)
SQNR_E5M2_GRAD_GEMM = 22.5  # E5M2 dy x E4M3 (24.5 measured)
SQNR_MXFP8_GEMM = 25.5  # E4M3 with MX floor-rule saturation (27.4-27.6 measured)
SQNR_INT8_GEMM = 34.5  # INT8 tensorwise x INT8 tensorwise (37.3-37.7 measured)
SQNR_INT8_ROW_GEMM = 36.5  # INT8 per-row (38.6-40.3 measured, dW the lowest)
# E2M1 (m=1): 10 log10(3 * 2^4 * 2.2) ~ 20 dB per operand, less the values a 16- or
# 32-element block pushes into E2M1's subnormal 0.5 step and, for MX, the floor rule's
# saturation; ~3 dB less per GEMM. Measured (fp32 | bf16 alike), y / dx / dW:
#   mxfp4  15.9 / 15.8 / 15.6;  nvfp4 (rounded to nearest, no Hadamard)  16.8 / 16.7 / 15.8
SQNR_MXFP4_GEMM = 14.0
SQNR_NVFP4_GEMM = 14.5

# (output, grad_input, grad_weight) thresholds per recipe.
SQNR_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "tensorwise": (SQNR_E4M3_GEMM, SQNR_E5M2_GRAD_GEMM, SQNR_E5M2_GRAD_GEMM),
    "delayed": (SQNR_E4M3_GEMM, SQNR_E5M2_GRAD_GEMM, SQNR_E5M2_GRAD_GEMM),
    "rowwise": (SQNR_E4M3_GEMM,) * 3,
    "blockwise": (SQNR_E4M3_GEMM,) * 3,
    "mxfp8": (SQNR_MXFP8_GEMM,) * 3,
    "int8": (SQNR_INT8_GEMM,) * 3,
    "int8_rowwise": (SQNR_INT8_ROW_GEMM,) * 3,
    "mxfp4": (SQNR_MXFP4_GEMM,) * 3,
    "nvfp4": (SQNR_NVFP4_GEMM,) * 3,
}


def test_every_recipe_has_thresholds() -> None:
    assert set(SQNR_THRESHOLDS) == set(RECIPE_NAMES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_sqnr_against_unquantised_layer(name: str, mode: str, data: Data) -> None:
    run = _default_run(name, mode)
    x64, w64 = data.x.double().reshape(M, K), data.w.double()
    dy64 = run.dy.double().reshape(M, N)  # the same (possibly bf16-rounded) dy
    t_y, t_dx, t_dw = SQNR_THRESHOLDS[name]
    _assert_sqnr(x64 @ w64.t() + data.b.double(), run.y.reshape(M, N), t_y, f"{name}/{mode} y")
    _assert_sqnr(dy64 @ w64, run.dx.reshape(M, K), t_dx, f"{name}/{mode} dx")
    _assert_sqnr(dy64.t() @ x64, run.dw, t_dw, f"{name}/{mode} dW")


# ------------------------------------------------------------- (c) emulation vs torch._scaled_mm


def _capture(layer: Fp8Linear) -> dict[str, list[ScaledTensor | None]]:
    """Record every operand the layer quantises, by role, via the state's observer."""
    seen: dict[str, list[ScaledTensor | None]] = {}

    def observer(state: Any, role: str, t: torch.Tensor, qt: ScaledTensor | None) -> None:
        seen.setdefault(role, []).append(qt)

    layer.fp8_state.observer = observer
    return seen


def _layer_gemm_operands(
    name: str, seen: dict[str, list[ScaledTensor | None]]
) -> dict[str, tuple[ScaledTensor, ScaledTensor]]:
    """The (a, b) pairs of the three GEMMs, from the operands the layer built."""
    q = {role: qs[-1] for role, qs in seen.items()}
    assert all(v is not None for v in q.values())
    qx, qw, qdy = q["input"], q["weight"], q["grad_output"]
    assert qx is not None and qw is not None and qdy is not None
    # tensorwise reuses forward quantisations; rowwise re-quantises along the other axis.
    qw_d = q.get("weight.t", qw)
    qdy_w = q.get("grad_output.t", qdy)
    qx_w = q.get("input.t")
    if name == "rowwise":
        assert {"weight.t", "grad_output.t", "input.t"} <= set(q)
    if qx_w is None:  # tensorwise: the saved FP8 input itself
        qx_w = qx
    assert qw_d is not None and qdy_w is not None
    return {"output": (qx, qw.t()), "grad_input": (qdy, qw_d), "grad_weight": (qdy_w.t(), qx_w)}


def _compare_backends(
    a: ScaledTensor, b: ScaledTensor, bias: torch.Tensor | None, out_dtype: torch.dtype, what: str
) -> torch.Tensor:
    """torch._scaled_mm vs the emulation on the same operands; returns the emulated result."""
    hw = fp8train.scaled_mm(a, b, bias=bias, out_dtype=out_dtype, backend="scaled_mm")
    emu: torch.Tensor = fp8train.scaled_mm(a, b, bias=bias, out_dtype=out_dtype, backend="emulate")
    if out_dtype == torch.float32 and bias is None:
        # The fp32 emulation dequantises to fp32 and runs an fp32 GEMM: "what
        # torch._scaled_mm does on CPU, bit for bit" (matmul.py module docstring).
        assert_bitwise_equal(emu, hw, what)
        return emu
    # bf16 output: the emulation runs a bf16 GEMM (fp32 accumulation inside, in its own
    # order). scaled_mm's docstring promises no bitwise equality across backends here;
    # both must be within fp32 accumulation + one bf16 rounding of the exact product and
    # differ in a handful of elements (measured: 1 of 56,832 output elements, by one
    # bf16 ulp, at a rounding boundary).
    da, db = _deq(a), _deq(b)
    exact = da @ db
    if bias is None:
        bound = _gemm_bound(da, db, out_dtype, exact)
    else:
        exact, bound = exact + bias.double(), _output_bound(da, db, bias, out_dtype)
    _assert_within(hw, exact, bound, f"{what} torch._scaled_mm")
    _assert_within(emu, exact, bound, f"{what} emulation")
    if bias is None:
        differ = int((hw != emu).sum())
        assert differ <= hw.numel() // 1000, f"{what}: {differ} of {hw.numel()} elements differ"
    return emu


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tensorwise", "rowwise"])
def test_emulation_matches_torch_scaled_mm(
    name: str, mode: str, data: Data, gemm_route: str
) -> None:
    layer = _layer(name, data)
    seen = _capture(layer)
    run = _run(layer, data, mode)
    out_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    pairs = _layer_gemm_operands(name, seen)
    results = {
        "output": run.y.reshape(M, N),
        "grad_input": run.dx.reshape(M, K),
        "grad_weight": run.dw,
    }
    for gemm, (a, b) in pairs.items():
        _compare_backends(a, b, None, out_dtype, f"{name} {gemm}")
        # The layer ran exactly the emulated GEMM on those operands (the forward one
        # with the layer's bias in its epilogue).
        bias = data.b if gemm == "output" else None
        emu = fp8train.scaled_mm(a, b, bias=bias, out_dtype=out_dtype, backend="emulate")
        assert_bitwise_equal(results[gemm], emu.to(results[gemm].dtype), f"{name} {gemm} layer")
    if mode == "bf16_autocast":
        _compare_backends(*pairs["output"], data.b, out_dtype, f"{name} output + bias")


@pytest.mark.parametrize("name", ["tensorwise", "delayed", "rowwise", "blockwise", "mxfp8"])
def test_layer_gemm_operands_are_in_the_routes_dtype(
    name: str, data: Data, gemm_route: str
) -> None:
    # Under bf16 autocast with power-of-two scales every operand is exact in bf16; the
    # GEMM takes bf16 operands where bf16 GEMMs are native and fp32 ones where they are
    # not (fp8train.matmul.gemm_dtype), and the layer's kernels make them in that dtype.
    layer = _layer(name, data)
    seen = _capture(layer)
    _run(layer, data, "bf16_autocast")
    want = torch.bfloat16 if gemm_route == "bf16" else torch.float32
    assert set(seen) >= set(ROLES)
    for role, qs in seen.items():
        for q in qs:
            assert q is not None and q.operand is not None, f"{name} {role}: no GEMM operand"
            assert q.operand.dtype == want, (
                f"{name} {role}: GEMM operand {q.operand.dtype}, expected {want} on the "
                f"{gemm_route} route (shape {tuple(q.shape)})"
            )


def _no_pow2(recipe: Recipe) -> Recipe:
    return replace(
        recipe,
        input=replace(recipe.input, power_of_two=False),
        weight=replace(recipe.weight, power_of_two=False),
    )


# With a bias the backends round differently by design: the emulation adds the bias in
# the GEMM epilogue before the single output rounding (torch.addmm, as FP8 GEMMs on GPUs
# do, and what inductor fuses mm + bias into, so eager and compiled agree), while CPU
# torch._scaled_mm adds it after the GEMM. Both must stay within fp32 accumulation plus
# one output rounding of the exact result; they are not compared element by element.
@pytest.mark.parametrize(
    ("recipe", "out_dtype"),
    [
        (Recipe.from_name("tensorwise"), torch.float32),
        (Recipe.from_name("rowwise"), torch.float32),
        (_no_pow2(Recipe.from_name("tensorwise")), torch.bfloat16),
    ],
    ids=["tensorwise-fp32", "rowwise-fp32", "tensorwise_no_pow2-bf16"],
)
def test_emulation_with_bias_matches_torch_scaled_mm(
    recipe: Recipe, out_dtype: torch.dtype, data: Data
) -> None:
    qx = quantize(data.x.reshape(M, K), recipe.input)
    qw = quantize(data.w, recipe.weight)
    emu = _compare_backends(qx, qw.t(), data.b, out_dtype, f"{recipe.name} output + bias")
    if out_dtype == torch.float32:
        exact = _deq(qx) @ _deq(qw.t()) + data.b.double()
        _assert_within(
            emu,
            exact,
            _output_bound(_deq(qx), _deq(qw.t()), data.b, out_dtype),
            f"{recipe.name} output + bias, emulation",
        )


# ------------------------------------------------------------------------ (d) gradient dtypes


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_gradient_dtypes_with_fp32_master_weights(name: str, data: Data) -> None:
    run = _default_run(name, "bf16_autocast")  # fp32 x and weights, bf16 autocast
    assert run.y.dtype == torch.bfloat16
    assert (run.dx.dtype, run.dw.dtype, run.db.dtype) == (torch.float32,) * 3
    # A bf16 input without autocast: output and dx in bf16, master-weight grads fp32.
    layer = _layer(name, data)
    x = data.x.to(torch.bfloat16).requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(data.dy.to(torch.bfloat16))
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    assert (x.grad.dtype, layer.weight.grad.dtype, layer.bias.grad.dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_bf16_master_weights_train_a_step_with_adamw(name: str, data: Data) -> None:
    model = nn.Sequential(nn.Linear(K, N), nn.GELU(), nn.Linear(N, K))
    fp8train.convert(model, name)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = data.x[:1].to(torch.bfloat16).requires_grad_(True)  # 37 tokens are enough here
    loss = model(x).float().pow(2).mean()
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16
        assert bool(torch.isfinite(p.grad).all())
    opt.step()
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all())
        assert not torch.equal(p, p0), "every parameter moved"


# ------------------------------------------------- (e) saved activations and high-precision GEMMs


def _saved_bytes(
    layer: nn.Module, x: torch.Tensor
) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Bytes the autograd graph keeps for backward under bf16 autocast.

    Counts each distinct storage once and leaves out the layer's Parameters (the graph
    holding a Parameter costs no memory: it is alive anyway).
    """
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep.append(t)
        saved.append((tuple(t.shape), t.dtype))
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _mode("bf16_autocast"):
        y = layer(x.clone().requires_grad_(True))
    del y
    return sum(storages.values()), saved


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_fp8_activations_save_one_byte_per_input_element(name: str, data: Data) -> None:
    lin = nn.Linear(K, N)
    ref_bytes, _ = _saved_bytes(lin, data.x)
    recipe = Recipe.from_name(name)
    assert recipe.save_fp8_activations, "the default"
    fp8_bytes, fp8_saved = _saved_bytes(Fp8Linear.from_linear(lin, recipe, "l"), data.x)
    packed = recipe.input.fmt is fp8train.E2M1  # two E2M1 codes per byte
    one_byte = [s for s in fp8_saved if s[0] == (M, K // 2 if packed else K)]
    assert len(one_byte) == 1 and torch.empty((), dtype=one_byte[0][1]).element_size() == 1, (
        fp8_saved
    )
    hp_bytes, hp_saved = _saved_bytes(
        Fp8Linear.from_linear(lin, replace(recipe, save_fp8_activations=False), "l"), data.x
    )
    # Saved as the forward quantised it (quantize_from="input"): x in its own dtype.
    assert ((M, K), data.x.dtype) in hp_saved, hp_saved
    assert fp8_bytes < ref_bytes, f"FP8 layer saves {fp8_bytes} B, nn.Linear {ref_bytes} B"
    assert hp_bytes > fp8_bytes, f"save_fp8_activations=False saves {hp_bytes} B vs {fp8_bytes} B"
    # Exactly the input's other bytes per element, less its scale grid, which only the
    # FP8 copy needs: fp32, or for one-byte scale formats a byte per block (MX: the E8M0
    # code; NVFP4: an index into a table of the grid's distinct fp32 values).
    spec = recipe.input
    grid = fp8train.quantize(data.x.reshape(M, K), spec).scale
    x_scale_bytes = 4 * grid.numel()
    if spec.granularity is fp8train.scaling.Granularity.MX:
        x_scale_bytes = grid.numel()
    elif spec.scale_fmt is not None:
        x_scale_bytes = grid.numel() + 4 * grid.unique().numel()
    extra = int((data.x.element_size() - (0.5 if packed else 1)) * M * K)
    assert hp_bytes - fp8_bytes == extra - x_scale_bytes


# The variants run under bf16 autocast only: there the compute dtype differs from the
# input's, which is the case they exist for; fp32 adds nothing (a) does not cover.
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_save_fp8_activations_false_requantises_the_input_as_quantised(
    name: str, data: Data
) -> None:
    mode, out_dtype = "bf16_autocast", torch.bfloat16
    recipe = replace(_nearest(Recipe.from_name(name)), save_fp8_activations=False)
    run = _run(_layer(recipe, data), data, mode)
    ref = _reference(recipe, data, run.dy, out_dtype, fp8_saved=False)
    _assert_within(run.y, ref.y, ref.y_bound, f"{name}/{mode} output")
    _assert_within(run.dx, ref.dx, ref.dx_bound, f"{name}/{mode} grad_input")
    _assert_within(run.dw, ref.dw, ref.dw_bound, f"{name}/{mode} grad_weight")


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_high_precision_backward_gemm_variants(name: str, data: Data) -> None:
    mode, out_dtype = "bf16_autocast", torch.bfloat16
    recipe = _nearest(Recipe.from_name(name))
    w_c = data.w.to(out_dtype).double()  # W as the compute dtype sees it

    run = _run(_layer(replace(recipe, fp8_dgrad=False), data, mode), data, mode)
    ref = _reference(recipe, data, run.dy, out_dtype)
    dy64 = run.dy.double().reshape(M, N)
    # dx = dy . W as a bf16 GEMM: one bf16 rounding, far below FP8's ~2^-4 errors, so
    # the bound also proves the GEMM did not run in FP8.
    _assert_within(run.dx, dy64 @ w_c, _gemm_bound(dy64, w_c, out_dtype), f"{name} hp dgrad")
    _assert_within(run.dw, ref.dw, ref.dw_bound, f"{name} fp8 wgrad beside hp dgrad")

    run = _run(_layer(replace(recipe, fp8_wgrad=False), data, mode), data, mode)
    ref = _reference(recipe, data, run.dy, out_dtype)
    x_c = data.x.reshape(M, K).to(out_dtype).double()  # x saved in the compute dtype
    # dW = dy^T . x in the compute dtype.
    _assert_within(
        run.dw, dy64.t() @ x_c, _gemm_bound(dy64.t(), x_c, out_dtype), f"{name} hp wgrad"
    )
    _assert_within(run.dx, ref.dx, ref.dx_bound, f"{name} fp8 dgrad beside hp wgrad")


# --------------------------------------------------------------------- (f) delayed scaling


def test_delayed_histories_update_in_forward_and_backward(data: Data) -> None:
    recipe = Recipe.from_name("delayed")
    layer = _layer(recipe, data)
    seen = _capture(layer)
    hist = layer.fp8_state.histories
    assert set(hist) == set(ROLES) and all(hist[r].empty for r in ROLES)

    # Step 1: forward records input and weight; backward records grad_output.
    x1 = data.x.clone().requires_grad_(True)
    y1 = layer(x1)
    assert (len(hist["input"]), len(hist["weight"]), len(hist["grad_output"])) == (1, 1, 0)
    assert_bitwise_equal(hist["input"].reduced(), data.x.abs().amax(), "input amax")
    assert_bitwise_equal(hist["weight"].reduced(), data.w.abs().amax(), "weight amax")
    y1.backward(data.dy)
    assert len(hist["grad_output"]) == 1
    assert_bitwise_equal(hist["grad_output"].reduced(), data.dy.abs().amax(), "dy amax")
    q1 = {role: seen[role][-1] for role in ROLES}

    # Step 2: 4x larger input and dy. Their scales come from step 1's amaxes, so the
    # largest values saturate at the format maximum instead of being re-scaled.
    x2 = (4 * data.x).requires_grad_(True)
    dy2 = 4 * data.dy
    y2 = layer(x2)
    y2.backward(dy2)
    q2 = {role: seen[role][-1] for role in ROLES}
    for role, fmt in (("input", fp8train.E4M3), ("grad_output", fp8train.E5M2)):
        a, b = q1[role], q2[role]
        assert a is not None and b is not None
        assert_bitwise_equal(b.scale, a.scale, f"{role} scale on step 2 == step 1's")
        fresh = quantize(
            (x2 if role == "input" else dy2).detach().reshape(M, -1), getattr(recipe, role)
        )
        assert float(fresh.scale) < float(a.scale), "current scaling would have rescaled"
        n_sat = int((b.data.float().abs() == fmt.max).sum())
        assert n_sat > 0, f"{role}: no element saturated at {fmt.max}"
        expected = quantize(
            (x2 if role == "input" else dy2).detach().reshape(M, -1),
            getattr(recipe, role),
            scale=a.scale,
        )
        assert_bitwise_equal(b.data, expected.data, f"{role} payload")
    # The step-2 output is the product of those saturated operands.
    qx2, qw2 = q2["input"], q2["weight"]
    assert qx2 is not None and qw2 is not None
    a, bt = _deq(qx2), _deq(qw2).t()
    _assert_within(
        y2.detach(),
        a @ bt + data.b.double(),
        _output_bound(a, bt, data.b, torch.float32),
        "step-2 output",
    )
    # ...and the histories now hold both steps (algo max: the reduced amax is step 2's).
    assert (len(hist["input"]), len(hist["grad_output"])) == (2, 2)
    assert_bitwise_equal(hist["input"].reduced(), x2.detach().abs().amax(), "input history")
    assert_bitwise_equal(hist["grad_output"].reduced(), dy2.abs().amax(), "dy history")


@pytest.mark.parametrize(
    ("length", "algo", "expected"),
    [
        # amax multipliers used for the scale at each of five steps fed x, 4x, x, x, x
        (16, "max", [1, 1, 4, 4, 4]),
        (2, "max", [1, 1, 4, 4, 1]),
        (2, "most_recent", [1, 1, 4, 1, 1]),
    ],
)
def test_delayed_history_window_and_algo(
    length: int, algo: str, expected: list[int], data: Data
) -> None:
    recipe = replace(Recipe.from_name("delayed"), history_len=length, history_algo=algo)
    layer = _layer(recipe, data)
    seen = _capture(layer)
    x = data.x.reshape(M, K)
    with torch.no_grad():
        for mult in (1, 4, 1, 1, 1):
            layer(mult * x)
    amax = x.abs().amax()
    got = [q.scale for q in seen["input"] if q is not None]
    want = [fp8train.scaling.scale_from_amax(e * amax, recipe.input) for e in expected]
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise_equal(g, w, f"step {step + 1} input scale")


# ------------------------------------------------------------------------------ (g) bad input


class ThreeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(K, K)
        self.block = nn.Sequential(nn.Linear(K, K), nn.GELU())
        self.head = nn.Linear(K, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.head(self.block(torch.relu(self.fc_in(x))))
        return y


LAYER_NAMES = ("fc_in", "block.0", "head")


def _history_snapshot(model: nn.Module) -> dict[str, Any]:
    layers: dict[str, Any] = fp8train.recipe_state_dict(model)["layers"]
    return layers


def _nan_step(data: Data) -> tuple[nn.Module, dict[str, Any], torch.Tensor, Any]:
    """A delayed 3-layer model after one clean step, then one step with a NaN input."""
    model = fp8train.convert(ThreeLayer(), "delayed")
    model(data.x).float().pow(2).mean().backward()
    before = _history_snapshot(model)
    x = data.x.clone()
    x[1, 5, 17] = math.nan
    with pytest.warns(NonFiniteWarning) as record:
        y = model(x)
    y.float().pow(2).mean().backward()  # dy holds NaN in the bad token's row
    return model, before, y, record


def test_nan_input_warns_by_layer_name_and_propagates(data: Data) -> None:
    model, _, y, record = _nan_step(data)
    messages = [str(w.message) for w in record if issubclass(w.category, NonFiniteWarning)]
    for name in LAYER_NAMES:  # the NaN token reaches every layer
        assert any(f"layer {name!r}" in m and "input" in m for m in messages), (name, messages)
    # Not saturated into a finite value: the bad token's row is NaN, the others are clean.
    assert bool(torch.isnan(y[1, 5]).all())
    clean = torch.ones(BATCH, SEQ, dtype=torch.bool)
    clean[1, 5] = False
    assert bool(torch.isfinite(y[clean]).all())
    for name, layer in fp8train.nn.fp8_layers(model):
        assert layer.fp8_state.nonfinite["input"] == 1, name


def test_nan_input_leaves_input_and_grad_histories_and_scales_unchanged(data: Data) -> None:
    model, before, _, _ = _nan_step(data)
    after = _history_snapshot(model)
    for name in LAYER_NAMES:
        for role in ("input", "grad_output"):
            assert_nested_bitwise_equal(
                after[name]["histories"][role], before[name]["histories"][role], f"{name}.{role}"
            )
        # Every scale the next step would use is unchanged (the weight's included).
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp8Linear)
        for role in ROLES:
            window = before[name]["histories"][role]["window"][:1]
            assert_bitwise_equal(
                layer.fp8_state.histories[role].reduced(),
                window.amax(0),
                f"{name}.{role} reduced amax",
            )


def test_nan_input_leaves_every_history_bitwise_unchanged(data: Data) -> None:
    model, before, _, _ = _nan_step(data)
    # Every amax history (weight included) is untouched; only the diagnostic NaN/inf
    # counters move, by exactly the events the warnings reported.
    after = _history_snapshot(model)
    for name in LAYER_NAMES:
        assert_nested_bitwise_equal(
            after[name]["histories"], before[name]["histories"], f"{name} histories"
        )
        assert after[name]["nonfinite"]["input"] == before[name]["nonfinite"]["input"] + 1


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_inf_in_dy_gives_non_finite_grads_and_skips_the_history(name: str, data: Data) -> None:
    layer = _layer(name, data)
    _run(layer, data, "fp32")  # one clean step (fills the delayed histories)
    before = layer.fp8_state.state_dict()
    layer.zero_grad()
    x = data.x.clone().requires_grad_(True)
    y = layer(x)
    dy = data.dy.clone()
    dy[2, 3, 7] = math.inf  # a loss-scale overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)  # dy overflow is logged, not warned
        y.backward(dy)
    assert x.grad is not None and layer.weight.grad is not None
    assert not bool(torch.isfinite(x.grad).all()), "dx must be non-finite"
    assert not bool(torch.isfinite(layer.weight.grad).all()), "dW must be non-finite"
    after = layer.fp8_state.state_dict()
    assert after["nonfinite"]["grad_output"] == 1
    if "grad_output" in before["histories"]:
        assert_nested_bitwise_equal(
            after["histories"]["grad_output"],
            before["histories"]["grad_output"],
            "grad_output history",
        )


def test_shape_mismatch_names_layer_and_both_shapes(data: Data) -> None:
    model = fp8train.convert(ThreeLayer(), "tensorwise")
    with pytest.raises(ValueError, match=r"'block\.0'.*\(4, 37, 100\).*\(256, 256\)"):
        model.block(torch.randn(4, 37, 100))
