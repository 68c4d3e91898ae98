"""The CUDA route, proven on the CPU.

Three checks of every scaled GEMM the layers would hand a GPU:

* the route table: which compute capability takes which recipe's GEMMs on
  ``F.scaled_mm`` (written out below independently of ``cuda_gemm``'s own rules);
* torch's checks: each call's arguments, as ``cuda_gemm.prepare`` lays them out, are
  replayed on fake CUDA tensors (``FakeTensorMode``), where the meta kernel of
  ``F.scaled_mm`` checks shapes, strides, dtypes, scale layouts and swizzles as on a GPU;
* the values: a float64 decoder written from the kernel's documented layouts (scale
  shapes and strides, the 32x4x4 swizzle) reads the prepared arguments back, and must
  give the float64 product of the dequantised operands: a scale in the wrong place or a
  wrong padding changes the result.

The calls come from real layers: every recipe's forward and backward run on the CPU
with ``fp8train.autograd.scaled_mm`` wrapped to record its operands.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fp8train
import fp8train.autograd as fp8_autograd
from fp8train import cuda_gemm
from fp8train.recipes import RECIPE_NAMES, Recipe

HOPPER, BLACKWELL, ADA, AMPERE, CONSUMER_BLACKWELL, B300 = (
    (9, 0),
    (10, 0),
    (8, 9),
    (8, 0),
    (12, 0),
    (10, 3),
)
ALL_CAPS = (AMPERE, ADA, HOPPER, BLACKWELL, B300, CONSUMER_BLACKWELL)

# Which capabilities run a recipe's three GEMMs on F.scaled_mm with bf16 outputs (torch's
# CUDA checks and cuBLAS's scale modes; see docs/cuda.md): everything else emulates.
HARDWARE_BF16: dict[str, set[tuple[int, int]]] = {
    "tensorwise": {ADA, HOPPER, BLACKWELL, B300, CONSUMER_BLACKWELL},
    "delayed": {ADA, HOPPER, BLACKWELL, B300, CONSUMER_BLACKWELL},
    "rowwise": {ADA, HOPPER, BLACKWELL, B300, CONSUMER_BLACKWELL},
    "blockwise": {HOPPER},
    "mxfp8": {BLACKWELL, B300},
    "int8": set(),
    "int8_rowwise": set(),
    # FP4: no route to Blackwell's FP4 tensor cores is built; every capability emulates.
    "mxfp4": set(),
    "nvfp4": set(),
}
# With fp32 outputs rowwise and MX have no kernel (bf16 only); the rest as above.
HARDWARE_FP32 = {
    **HARDWARE_BF16,
    "rowwise": set(),
    "mxfp8": set(),
}


@pytest.mark.parametrize("name", RECIPE_NAMES)
@pytest.mark.parametrize("cap", ALL_CAPS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_route_table(name: str, cap: tuple[int, int], out_dtype: torch.dtype) -> None:
    recipe = Recipe.from_name(name)
    table = HARDWARE_BF16 if out_dtype == torch.bfloat16 else HARDWARE_FP32
    for gemm, (a, b) in cuda_gemm.gemm_specs(recipe).items():
        chosen = cuda_gemm.route(a, b, out_dtype, cap)
        assert chosen.hardware == (cap in table[name]), (name, cap, gemm, chosen)
        assert chosen.hardware == (chosen.reason == ""), chosen
        if not chosen.hardware:
            assert len(chosen.reason) > 10, "the log line says why"


def test_route_refusals_name_the_rule() -> None:
    tw = Recipe.from_name("tensorwise")
    e5m2 = tw.grad_output
    assert "E5M2 x E5M2" in cuda_gemm.route(e5m2, e5m2, torch.bfloat16, HOPPER).reason
    assert "8.0" in cuda_gemm.route(tw.input, tw.weight, torch.bfloat16, AMPERE).reason
    mx = Recipe.from_name("mxfp8")
    a, b = cuda_gemm.gemm_specs(mx)["output"]
    assert "bf16, not float32" in cuda_gemm.route(a, b, torch.float32, BLACKWELL).reason
    for fp4 in ("mxfp4", "nvfp4"):
        a, b = cuda_gemm.gemm_specs(Recipe.from_name(fp4))["output"]
        assert "no FP4 route built" in cuda_gemm.route(a, b, torch.bfloat16, BLACKWELL).reason
    blk = Recipe.from_name("blockwise")
    a, b = cuda_gemm.gemm_specs(blk)["output"]
    assert "9.0" not in cuda_gemm.route(a, b, torch.bfloat16, HOPPER).reason
    assert "10.0 has no BlockWise" in cuda_gemm.route(a, b, torch.bfloat16, BLACKWELL).reason


def test_docs_route_table_is_current() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "cuda.md").read_text()
    recipes = {n: Recipe.from_name(n) for n in RECIPE_NAMES}
    for dtype in (torch.bfloat16, torch.float32):
        assert cuda_gemm.route_table(recipes, dtype) in text, (
            f"docs/cuda.md lacks the current {dtype} table: regenerate it with "
            "python docs/gen_cuda_routes.py"
        )


# ---------------------------------------------------------------- the float64 decoder


def _decode_mx(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Factors ``(rows, cols)`` from a swizzled E8M0 buffer, by the layout's formula:
    tile ``(r // 128, c // 4)`` in row-major tile order, 512 bytes each, and within it
    ``(r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4``."""
    codes = scale.contiguous().view(torch.uint8).reshape(-1).long()
    tiles_per_row = -(-cols // 4)
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tiles_per_row + c // 4
            offset = tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
            out[r, c] = 2.0 ** (int(codes[offset]) - 127)
    return out


def _expand(grid: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    return grid.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]


def decode(call: cuda_gemm.Call) -> torch.Tensor:
    """What ``F.scaled_mm`` computes from ``call``'s arguments, in float64, read the way
    the kernel reads them (strides included: a scale tensor is read by index)."""
    S = F.ScalingType
    a = call.a.double()  # (M, Kp)
    b = call.b.double()  # (Kp, Np)
    (m, kp), np_ = a.shape, b.shape[1]
    ra, rb = call.recipe_a, call.recipe_b
    if ra == S.TensorWise:
        fa = call.scale_a.double().expand(m, kp)
        fb = call.scale_b.double().expand(kp, np_)
    elif ra == S.RowWise:
        assert tuple(call.scale_a.shape) == (m, 1) and tuple(call.scale_b.shape) == (1, np_)
        fa = call.scale_a.double().expand(m, kp)
        fb = call.scale_b.double().expand(kp, np_)
    elif ra == S.BlockWise1x128:
        fa = _expand(call.scale_a.double(), m, kp, 1, 128)  # (M, Kp/128)
        if rb == S.BlockWise128x128:
            sb = call.scale_b.double()  # (L4, Np/128): K blocks by N blocks
            fb = _expand(sb[: kp // 128], kp, np_, 128, 128)
        else:
            sb = call.scale_b.double()  # (Np, Kp/128)
            fb = _expand(sb.t(), kp, np_, 128, 1)
    elif ra == S.BlockWise1x32:
        fa = _expand(_decode_mx(call.scale_a, m, kp // 32), m, kp, 1, 32)
        fb = _expand(_decode_mx(call.scale_b, np_, kp // 32).t(), kp, np_, 32, 1)
    else:
        raise AssertionError(f"no decoder for {ra}")
    out = (a * fa) @ (b * fb)
    if call.bias is not None:
        out = out + call.bias.double()
    out = out[:, : call.n]
    if call.bias_after is not None:
        out = out + call.bias_after.double()
    return out


def _on_fake_cuda(call: cuda_gemm.Call) -> torch.Size:
    """Replay ``call`` on fake CUDA tensors of the same shapes, strides and dtypes, so
    that torch's meta kernel of F.scaled_mm checks it as the GPU would; the shape out."""

    with FakeTensorMode():

        def fake(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

        swizzle = None if call.swizzle is None else [call.swizzle]
        out = F.scaled_mm(
            fake(call.a),
            fake(call.b),
            fake(call.scale_a),
            call.recipe_a,
            fake(call.scale_b),
            call.recipe_b,
            swizzle_a=swizzle,
            swizzle_b=swizzle,
            bias=fake(call.bias),
            output_dtype=call.out_dtype,
        )
        assert out.device.type == "cuda" and out.dtype == call.out_dtype
        return out.shape


# ------------------------------------------------------- every call of real layers


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.original = fp8_autograd.scaled_mm

    def __call__(self, a: Any, b: Any, **kw: Any) -> torch.Tensor:
        self.calls.append((a, b, kw.get("bias"), kw["out_dtype"], kw["label"]))
        return self.original(a, b, **kw)


def _check_call(
    a: Any, b: Any, bias: Any, out_dtype: torch.dtype, label: str, cap: tuple[int, int]
) -> bool:
    """Check one recorded GEMM on ``cap``; True if it takes the hardware route."""
    chosen = cuda_gemm.route(a.spec, b.spec, out_dtype, cap)
    if not chosen.hardware:
        return False
    call = cuda_gemm.prepare(a, b, bias, out_dtype, chosen)
    m, n = a.shape[0], b.shape[1]
    shape = _on_fake_cuda(call)
    assert shape[0] == m and shape[1] >= n, (label, shape, m, n)
    # Values: the prepared arguments, read as the kernel reads them, are the operands.
    expected = a.dequantize(torch.float64) @ b.dequantize(torch.float64)
    if bias is not None:
        expected = expected + bias.to(out_dtype).double()
    got = decode(call)
    assert got.shape == expected.shape, label
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=label)
    return True


SHAPES = [
    # (input shape, in_features, out_features): token counts that are and are not
    # multiples of 16, 32 and 128; 2-D and 3-D inputs; widths off every multiple.
    ((256, 256), 256, 384),
    ((48, 128), 128, 128),
    ((2, 50, 96), 96, 160),
    ((130, 64), 64, 10),
    ((7, 100), 100, 48),
]


@pytest.mark.parametrize("name", RECIPE_NAMES)
@pytest.mark.parametrize("dtype", ["bf16-autocast", "fp32"])
def test_every_layer_gemm_passes_torch_cuda_checks(
    name: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(fp8_autograd, "scaled_mm", recorder)
    torch.manual_seed(0)
    for x_shape, k, n in SHAPES:
        for bias in (True, False):
            layer = fp8train.Fp8Linear(k, n, bias=bias, recipe=name, kernels="eager")
            x = torch.randn(*x_shape, requires_grad=True)
            if dtype == "fp32":
                y = layer(x)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = layer(x)
            y.float().square().sum().backward()
    gemms = {label.rsplit(" ", 2)[1] for *_, label in recorder.calls}
    assert gemms == {"output", "grad_input", "grad_weight"}, gemms
    assert len(recorder.calls) == 3 * 2 * len(SHAPES)
    for cap in ALL_CAPS:
        table = HARDWARE_BF16 if dtype != "fp32" else HARDWARE_FP32
        for a, b, bias_t, out_dtype, label in recorder.calls:
            on_hardware = _check_call(a, b, bias_t, out_dtype, label, cap)
            # No silent fall-back: where the table says hardware, the call takes it.
            assert on_hardware == (cap in table[name]), (name, cap, label)


# ------------------------------------------------- scaled_mm on fake CUDA tensors


def _fake_cuda(q: fp8train.ScaledTensor) -> fp8train.ScaledTensor:
    def fake(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

    return fp8train.ScaledTensor(fake(q.data), fake(q.scale), q.spec, q.orig_dtype)


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise", "mxfp8"])
@pytest.mark.parametrize("m", [16, 100, 256])
def test_scaled_mm_on_fake_cuda_calls_the_kernel(
    name: str, m: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``fp8train.scaled_mm`` on CUDA tensors: operand preparation, scale layouts and the
    kernel call all run on fake CUDA tensors; where the table says hardware it calls
    ``F.scaled_mm`` once, elsewhere it emulates with one log line naming the GEMM."""
    recipe = Recipe.from_name(name)
    a_spec, b_spec = cuda_gemm.gemm_specs(recipe)["output"]
    k, n = 200, 72
    qa = fp8train.quantize(torch.randn(m, k), a_spec)
    qb = fp8train.quantize(torch.randn(n, k), recipe.weight).t()
    assert qb.spec == b_spec
    calls: list[object] = []
    real = F.scaled_mm

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(cuda_gemm.F, "scaled_mm", spy)
    emulated: list[object] = []

    def emulation(a: Any, b: Any, bias: Any, out_dtype: torch.dtype) -> torch.Tensor:
        # The emulation itself is tested on real tensors; fake CUDA tensors cannot run
        # its gathers on a CPU-only build.
        emulated.append(a)
        return torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)

    monkeypatch.setattr(fp8train.matmul, "_emulated_mm", emulation)
    for cap in ALL_CAPS:
        monkeypatch.setattr(cuda_gemm, "device_capability", lambda device, cap=cap: cap)
        calls.clear()
        emulated.clear()
        with FakeTensorMode(), caplog.at_level(logging.WARNING, logger="fp8train"):
            caplog.clear()
            fa, fb = _fake_cuda(qa), _fake_cuda(qb)
            bias = torch.empty(n, device="cuda")
            label = f"test {name} {m} {cap}"
            out = fp8train.scaled_mm(fa, fb, bias=bias, out_dtype=torch.bfloat16, label=label)
            assert out.shape == (m, n) and out.device.type == "cuda"
        hardware = cap in HARDWARE_BF16[name]
        assert (len(calls), len(emulated)) == ((1, 0) if hardware else (0, 1)), (name, cap)
        logged = [r.getMessage() for r in caplog.records if label in r.getMessage()]
        assert len(logged) == (0 if hardware else 1), logged


def test_backend_scaled_mm_refuses_what_the_gpu_cannot_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cuda_gemm, "device_capability", lambda device: AMPERE)
    q = fp8train.quantize(torch.randn(32, 64), Recipe.from_name("tensorwise").input)
    with FakeTensorMode():
        fq = _fake_cuda(q)
        with pytest.raises(ValueError, match=r"8\.0 has no TensorWise"):
            fp8train.scaled_mm(fq, fq.t(), backend="scaled_mm", label="probe")


# ------------------------------------------------------------- the swizzle itself


@pytest.mark.parametrize("rows, cols", [(1, 1), (130, 7), (256, 8), (37, 4)])
def test_mx_swizzle_matches_the_layout_formula(rows: int, cols: int) -> None:
    codes = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    swizzled = cuda_gemm.swizzle_mx_scales(codes)
    assert swizzled.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    decoded = _decode_mx(swizzled.view(torch.float8_e8m0fnu), rows, cols)
    assert torch.equal(decoded, 2.0 ** (codes.double() - 127))


def test_padding_keeps_the_product_on_the_cpu_kernel() -> None:
    """torch's CPU scaled GEMM runs tensorwise and rowwise for real: the padded,
    column-major arguments give the unpadded product (cut back), bias included."""
    for name in ("tensorwise", "rowwise"):
        recipe = Recipe.from_name(name)
        a_spec, b_spec = cuda_gemm.gemm_specs(recipe)["output"]
        qa = fp8train.quantize(torch.randn(50, 100), a_spec)
        qb = fp8train.quantize(torch.randn(10, 100), recipe.weight).t()
        bias = torch.randn(10)
        chosen = cuda_gemm.route(a_spec, b_spec, torch.bfloat16, HOPPER)
        out = cuda_gemm.hardware_mm(qa, qb, bias, torch.bfloat16, chosen)
        ref = fp8train.scaled_mm(qa, qb, bias=bias, out_dtype=torch.bfloat16, backend="emulate")
        assert out.shape == (50, 10)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-2)


# ------------------------------------------------------------ on a real GPU, if any

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_on_the_gpu_the_layer_matches_the_emulation(name: str) -> None:
    """The same layer, weights and input on the GPU's route and on the emulation: the
    products are exact either way, so only the fp32 summation order (and, for a bias
    added after the GEMM, one rounding) can differ: bf16 outputs agree to a few ulps."""
    device = torch.device("cuda")
    cap = cuda_gemm.device_capability(device)
    torch.manual_seed(0)
    results = {}
    for backend in ("auto", "emulate"):
        layer = fp8train.Fp8Linear(200, 72, recipe=name, kernels="eager", device=device)
        torch.manual_seed(1)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(72, 200, device=device) * 0.05)
            assert layer.bias is not None
            layer.bias.copy_(torch.randn(72, device=device))
        x = torch.randn(3, 100, 200, device=device, requires_grad=True)
        chosen = functools.partial(fp8train.matmul.scaled_mm, backend=backend)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fp8_autograd, "scaled_mm", chosen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        results[backend] = (y.float(), x.grad, layer.weight.grad)
    recipe = Recipe.from_name(name)
    on_hardware = any(
        cuda_gemm.route(a, b, torch.bfloat16, cap).hardware
        for a, b in cuda_gemm.gemm_specs(recipe).values()
    )
    for got, want in zip(results["auto"], results["emulate"], strict=True):
        torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)
    if not on_hardware:
        for got, want in zip(results["auto"], results["emulate"], strict=True):
            assert torch.equal(got, want), "both took the emulation"


def test_the_emulation_accumulates_in_fp32_on_a_gpu() -> None:
    # cuBLAS may reduce a bf16 GEMM's split-K partial sums in bf16; the emulation on a
    # GPU multiplies in fp32 so that its sums stay fp32 sums.
    assert fp8train.matmul.gemm_dtype(torch.bfloat16, True, "cuda") == torch.float32
