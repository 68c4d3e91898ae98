"""On CUDA, the compiled quantisation kernels (inductor's triton code) give the eager
kernels' bits: amax, scale, FP8 payload and GEMM operand, for every operand spec of every
recipe, and a whole layer's output and gradients (issue 28, item 4).

Skipped without a CUDA device: ``benchmarks/gpu.py`` runs this file on a GPU. On the CPU,
tests/test_kernels.py holds the same checks against inductor's C++ code.

Why bitwise and not close: both kernel sets run the reference pipeline's arithmetic op
for op (fp32 product, saturating round-to-nearest-even cast, multiplication by the fp32
reciprocal); a difference means one compiler changed the arithmetic (a contracted
multiply-add, an approximate division or exp2), and eager and compiled training would
drift apart.
"""

from __future__ import annotations

import pytest
import torch

import fp8train
from fp8train._kernels import Kernels, compile_blocker
from fp8train.recipes import RECIPE_NAMES, Recipe
from fp8train.scaling import ScaleSpec, compute_amax, scale_from_amax
from fp8train.testing import assert_bitwise_equal, assert_nested_bitwise_equal

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.py runs it on one)"
)

DEVICE = "cuda"


def _operand_specs() -> dict[str, ScaleSpec]:
    """Every distinct spec a recipe quantises an operand with, its transposed roles
    (``weight.t``, ``input.t``, ``grad_output.t``) included."""
    specs: dict[ScaleSpec, str] = {}
    for name in RECIPE_NAMES:
        recipe = Recipe.from_name(name)
        for role in ("input", "weight", "grad_output"):
            spec = getattr(recipe, role)
            for s, suffix in ((spec, ""), (spec.transposed(), ".t")):
                specs.setdefault(s, f"{name}-{role}{suffix}")
    return {label: spec for spec, label in specs.items()}


SPECS = _operand_specs()


@pytest.fixture(autouse=True)
def _needs_triton() -> None:
    blocker = compile_blocker("cuda")
    if blocker is not None:
        pytest.skip(f"no compiled kernels on CUDA here: {blocker}")


def _spread(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values scaled per row (2^-20 .. 2^20) and per column (2^-4 .. 2^4): many
    binades, so that row, block and MX scales differ and the subnormals are reached.
    200 columns: partial 1x128, 128x128 and 1x32 tiles; rows likewise."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.exp2(torch.rand(rows, 1, generator=gen) * 40 - 20)
    col = torch.exp2(torch.rand(1, cols, generator=gen) * 8 - 4)
    return (torch.randn(rows, cols, generator=gen) * row * col).to(dtype).to(DEVICE)


def _work(spec: ScaleSpec) -> torch.dtype:
    # The emulated GEMM's operand dtype: bf16 only where every scale is a power of two.
    return torch.bfloat16 if spec.scales_are_power_of_two else torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label", list(SPECS))
def test_compiled_quantisation_equals_eager_on_cuda(label: str, dtype: torch.dtype) -> None:
    spec = SPECS[label]
    x = _spread(300, 200, dtype)
    eager = Kernels("eager").quantize_current(x, spec, _work(spec))
    compiled = Kernels("compiled").quantize_current(x, spec, _work(spec))
    assert compiled[2] is not None and compiled[2].device.type == DEVICE
    assert_nested_bitwise_equal(compiled, eager, f"{label} {dtype} compiled vs eager")
    # and both are the reference pipeline's (fp8train.quantize, run on the GPU)
    reference = fp8train.quantize(x, spec)
    assert_bitwise_equal(eager[1], reference.scale, f"{label} {dtype} scale vs reference")
    assert_bitwise_equal(eager[2], reference.data, f"{label} {dtype} payload vs reference")


@pytest.mark.parametrize("label", list(SPECS))
def test_cuda_quantisation_equals_the_cpu_reference(label: str) -> None:
    """The scales and payloads the GPU computes are the CPU's (the emulation's) bit for
    bit: amax is exact, the scale one correctly rounded division (or a power of two),
    the cast one rounding."""
    spec = SPECS[label]
    x = _spread(300, 200, torch.float32, seed=1)
    on_gpu = fp8train.quantize(x, spec)
    on_cpu = fp8train.quantize(x.cpu(), spec)
    assert_bitwise_equal(on_gpu.scale.cpu(), on_cpu.scale, f"{label} scale")
    assert_bitwise_equal(on_gpu.data.cpu(), on_cpu.data, f"{label} payload")


@pytest.mark.parametrize("label", ["tensorwise-input", "rowwise-input", "blockwise-input"])
def test_compiled_given_scale_saturates_like_eager_on_cuda(label: str) -> None:
    """A given (delayed) scale 8x too large: products past max saturate, compiled as
    eager."""
    spec = SPECS[label]
    x = _spread(64, 256, torch.float32, seed=2)
    scale = scale_from_amax(compute_amax(x, spec), spec) * 8
    eager = Kernels("eager").quantize_given(x, scale, spec, torch.float32)
    compiled = Kernels("compiled").quantize_given(x, scale, spec, torch.float32)
    assert eager[2] is not None
    assert bool((eager[2].float().abs() == spec.fmt.max).any()), "nothing saturated"
    assert_nested_bitwise_equal(compiled, eager, f"{label} given scale")


def test_compiled_window_scale_equals_eager_on_cuda() -> None:
    """Delayed scaling's scale from its history window, reduced inside the kernel call."""
    spec = Recipe.from_name("delayed").input
    history = fp8train.AmaxHistory(4, "max")
    for i in range(6):  # wrapped around
        history.record(compute_amax(_spread(64, 256, torch.float32, seed=10 + i), spec))
    x = _spread(64, 256, torch.bfloat16, seed=3)
    window = history.to_reduce()
    eager = Kernels("eager").quantize_from_window(x, window, spec, torch.bfloat16)
    compiled = Kernels("compiled").quantize_from_window(x, window, spec, torch.bfloat16)
    assert_nested_bitwise_equal(compiled, eager, "delayed window")


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_layer_compiled_equals_eager_on_cuda(name: str) -> None:
    """One layer, eager kernels against compiled, two steps under bf16 autocast (delayed
    scaling's history in play): output, input and weight gradients bit for bit; the
    bias gradient (an fp32 column sum in another order) to fp32 summation accuracy."""
    torch.manual_seed(0)
    layers = {
        mode: fp8train.Fp8Linear(200, 96, recipe=name, kernels=mode).to(DEVICE)
        for mode in ("eager", "compiled")
    }
    layers["compiled"].load_state_dict(layers["eager"].state_dict())
    for step in range(2):
        x = _spread(150, 200, torch.bfloat16, seed=20 + step)
        dy = torch.randn(150, 96, device=DEVICE, dtype=torch.bfloat16)
        out = {}
        for mode, layer in layers.items():
            xi = x.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                y = layer(xi)
            y.backward(dy)
            assert layer.bias.grad is not None and layer.weight.grad is not None
            out[mode] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad)
        what = f"{name} step {step}"
        for i, part in enumerate(("output", "grad_input", "grad_weight")):
            assert_bitwise_equal(out["compiled"][i], out["eager"][i], f"{what} {part}")
        torch.testing.assert_close(out["compiled"][3], out["eager"][3], rtol=1e-5, atol=1e-6)
