"""FP8 storage of saved activations: what backward receives is exactly the reference
quantise-dequantise of what forward saved, and only the tensors it should touch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train.activations import Fp8SavedActivations
from fp8train.lab.gpt import GPT
from fp8train.lab.train import SavedTensorBytes
from fp8train.testing import assert_bitwise_equal

RECIPES = ["tensorwise", "delayed", "rowwise", "blockwise", "mxfp8", "int8"]


def _reference(t: torch.Tensor, recipe: str) -> torch.Tensor:
    """The library's reference pipeline (fp8train.quantize), independent of the kernels."""
    spec = fp8train.Recipe.from_name(recipe).input
    return fp8train.quantize(t, spec).dequantize(t.dtype)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", RECIPES)
def test_backward_sees_the_reference_dequantisation(
    recipe: str, dtype: torch.dtype, kernels: str
) -> None:
    # GELU saves its input; its gradient is gelu'(saved) * dy, so the gradient with FP8
    # storage must equal the gradient taken at the reference-quantised input, bit for bit.
    x = (torch.randn(4, 37, 160) * torch.logspace(-4, 2, 160)).to(dtype).requires_grad_()
    dy = torch.randn(4, 37, 160, dtype=dtype)
    with Fp8SavedActivations(recipe, kernels=kernels) as storage:  # type: ignore[arg-type]
        y = F.gelu(x.clone())  # an activation: a leaf input would be held anyway
    y.backward(dy)
    assert storage.stored == 1

    x_ref = _reference(x.detach(), recipe).requires_grad_()
    F.gelu(x_ref).backward(dy)
    assert x.grad is not None and x_ref.grad is not None
    assert_bitwise_equal(x.grad, x_ref.grad)
    # The forward itself is untouched.
    assert_bitwise_equal(y.detach(), F.gelu(x.detach()))


def test_unpacked_tensor_keeps_shape_dtype_and_views() -> None:
    # Attention saves transposed views of one buffer; each comes back with its shape.
    qkv = torch.randn(2, 16, 3 * 64, requires_grad=True)
    q, k, v = qkv.split(64, dim=2)
    q, k, v = (t.view(2, 16, 4, 16).transpose(1, 2) for t in (q, k, v))  # (b, h, t, d)
    with Fp8SavedActivations("rowwise", min_numel=1) as storage:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()
    assert storage.stored >= 3
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    assert qkv.grad.shape == qkv.shape


def test_parameters_small_tensors_and_payloads_are_left_alone() -> None:
    layer = nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    with Fp8SavedActivations("tensorwise") as storage, torch.autocast("cpu", torch.bfloat16):
        h = x.clone()  # an activation (x itself, a leaf, is held by the caller anyway)
        y = layer(h)  # saves autocast's bf16 copies of h (stored) and of the weight (not)
    assert storage.stored == 1
    y.float().sum().backward()
    # The weight copy was kept exact: grad_input is the bf16 GEMM of dy with the weight.
    dy = torch.ones(64, 256, dtype=torch.bfloat16)
    assert x.grad is not None
    assert_bitwise_equal(x.grad, (dy @ layer.weight.bfloat16()).float())

    with Fp8SavedActivations("tensorwise") as storage:
        y = x.clone() * x  # saves the clone (stored) and the leaf x (held anyway)
    assert storage.stored == 1

    small = torch.randn(8, 8, requires_grad=True)
    with Fp8SavedActivations("tensorwise") as storage:
        (small.clone() * small.clone()).sum().backward()
    assert storage.stored == 0  # below min_numel

    model = fp8train.convert(nn.Sequential(nn.Linear(128, 128)), "tensorwise")
    with Fp8SavedActivations("tensorwise", min_numel=1) as storage:
        model(torch.randn(32, 128, requires_grad=True).clone()).sum().backward()
    assert storage.stored == 0  # the FP8 linear saves its FP8 payload, nothing else large


def test_a_tensor_saved_twice_is_stored_once() -> None:
    x = torch.randn(64, 128, requires_grad=True)
    with Fp8SavedActivations("tensorwise") as storage:
        a = x.clone()
        y = a * a  # mul saves both operands: the same tensor twice
    y.sum().backward()
    assert storage.stored == 1
    ref = _reference(x.detach(), "tensorwise")
    assert x.grad is not None
    assert_bitwise_equal(x.grad, ref + ref)


def test_nonfinite_activation_is_kept_exact_and_reaches_the_gradient() -> None:
    x = torch.randn(64, 128)
    x[3, 5] = float("nan")
    x.requires_grad_()
    with Fp8SavedActivations("tensorwise") as storage:
        y = F.gelu(x.clone())
    y.sum().backward()
    assert storage.stored == 0 and storage.kept_nonfinite == 1
    assert x.grad is not None and torch.isnan(x.grad[3, 5])
    exact = x.detach().clone().requires_grad_()
    F.gelu(exact).sum().backward()
    assert exact.grad is not None
    torch.testing.assert_close(x.grad, exact.grad, equal_nan=True, rtol=0, atol=0)


def test_gpt_saved_bytes_and_gradients() -> None:
    # The lab's reference GPT: storage must cut the saved bytes to at most 0.6 of bf16
    # (issue 6's target; bytes are deterministic) and keep the gradients close to those
    # without it. SQNR floor: backward now sees E4M3-rounded activations (~25-30 dB
    # each, fp8train.testing.sqnr); 10 dB is far below what we measure (13-24 dB on the
    # worst parameter) and far above what a wrong tensor would give (< 0 dB).
    torch.manual_seed(0)
    base = GPT(seq=64, d_model=128, layers=2, heads=4)
    idx = torch.randint(0, 256, (8, 65))

    def step(
        model: nn.Module, storage: Fp8SavedActivations | None
    ) -> tuple[int, list[torch.Tensor]]:
        meter = SavedTensorBytes(model.parameters())
        if storage is not None:
            storage.observer = meter.pack
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            with torch.autocast("cpu", torch.bfloat16):
                if storage is not None:
                    with storage:
                        logits = model(idx[:, :-1])
                else:
                    logits = model(idx[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        return meter.total, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    bf16_bytes, _ = step(copy.deepcopy(base), None)
    fp8 = fp8train.convert(copy.deepcopy(base), "tensorwise")
    fp8_bytes, grads = step(fp8, None)
    both = fp8train.convert(copy.deepcopy(base), "tensorwise")
    storage = Fp8SavedActivations("tensorwise")
    both_bytes, grads_stored = step(both, storage)
    assert storage.stored > 0 and storage.stored_bytes * 2 <= storage.original_bytes
    assert both_bytes <= 0.6 * bf16_bytes, (both_bytes, fp8_bytes, bf16_bytes)
    assert both_bytes < fp8_bytes
    for g, gs in zip(grads, grads_stored, strict=False):
        assert fp8train.testing.sqnr(g, gs) > 10.0


def test_deepcopy_of_an_int8_model_keeps_formats_identical() -> None:
    # Regression: deepcopy copied the Format objects, and `fmt is INT8` checks failed.
    model = fp8train.convert(nn.Sequential(nn.Linear(64, 64)), "int8")
    twin = copy.deepcopy(model)
    twin(torch.randn(8, 64)).sum().backward()


def test_errors() -> None:
    with pytest.raises(ValueError, match="min_numel"):
        Fp8SavedActivations("tensorwise", min_numel=0)
    with pytest.raises(ValueError, match=r"unknown recipe|known"):
        Fp8SavedActivations("fp9")
    storage = Fp8SavedActivations("tensorwise")
    with storage, pytest.raises(RuntimeError, match="already active"):
        storage.__enter__()


def test_kernels_default_to_auto_which_compiles_here() -> None:
    """The default kernel set is "auto": compiled on this machine's CPU."""
    kernels = Fp8SavedActivations("tensorwise").kernels
    assert kernels.mode == "auto" and kernels.resolved("cpu") == "compiled"
    with pytest.raises(ValueError, match="'auto', 'eager' or 'compiled'"):
        Fp8SavedActivations("tensorwise", kernels="fast")  # type: ignore[arg-type]
