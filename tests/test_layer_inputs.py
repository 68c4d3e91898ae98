"""Inputs an FP8 layer meets outside a training step's usual tensors: an empty batch,
an unsupported dtype, the meta device. Each either works as ``nn.Linear`` does or raises
naming the layer, the tensor and its shape, before any state changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8train import RECIPE_NAMES, Fp8Linear
from fp8train.autograd import LayerState, fp8_linear


def _counts(layer: Fp8Linear) -> dict[str, int]:
    return {r: h.count for r, h in layer.fp8_state.histories.items()}


def _warmed(recipe: str) -> Fp8Linear:
    """A layer after one full step, so delayed histories hold an amax."""
    layer = Fp8Linear(32, 64, recipe=recipe, name="blocks.0.fc", kernels="eager")
    layer(torch.randn(4, 32)).sum().backward()
    layer.zero_grad()
    return layer


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("batch", [(0, 32), (2, 0, 32)])
def test_empty_batch_forward_and_backward(recipe: str, batch: tuple[int, ...]) -> None:
    """rowwise / int8_rowwise used to fail in backward (amax over 0 rows); delayed
    recorded an amax of nothing."""
    layer = _warmed(recipe)
    before = _counts(layer)
    x = torch.randn(batch, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch[:-1], 64) and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.weight.grad is not None and layer.bias is not None
    assert layer.bias.grad is not None
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
    assert _counts(layer) == before


@pytest.mark.parametrize("recipe", ["rowwise", "delayed"])
def test_empty_batch_under_autocast(recipe: str) -> None:
    layer = _warmed(recipe)
    x = torch.randn(0, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_unsupported_input_dtype_raises_before_state_changes(
    recipe: str, dtype: torch.dtype
) -> None:
    """float64 used to fail deep in scaled_mm ('out_dtype must be one of ...'), naming
    neither the layer nor the input."""
    layer = _warmed(recipe)
    before = _counts(layer)
    x = torch.randn(4, 32).to(dtype)
    with pytest.raises(
        TypeError,
        match=r"layer 'blocks.0.fc': input of shape \(4, 32\) has dtype \w+; FP8 layers "
        r"take float32, bfloat16, float16: .*x\.float\(\)",
    ):
        layer(x)
    assert _counts(layer) == before


def test_unsupported_input_dtype_through_the_function() -> None:
    state = LayerState("proj", Fp8Linear(8, 8, recipe="delayed").recipe)
    w = torch.randn(8, 8)
    with pytest.raises(TypeError, match=r"layer 'proj': input of shape \(2, 8\) has dtype"):
        fp8_linear(torch.randn(2, 8, dtype=torch.float64), w, None, state)
    assert all(h.count == 0 for h in state.histories.values())


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@pytest.mark.parametrize("autocast", [False, True])
def test_meta_device_propagates_shapes_like_nn_linear(recipe: str, autocast: bool) -> None:
    """Used to fail inside autocast ('unknown device type for autocast')."""
    layer = Fp8Linear(32, 64, recipe=recipe, name="fc", kernels="eager", device="meta")
    ref = nn.Linear(32, 64, device="meta")
    x = torch.empty(3, 5, 32, device="meta", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        expected = ref(x)
    assert y.device.type == "meta"
    assert (y.shape, y.dtype) == (expected.shape, expected.dtype) == ((3, 5, 64), torch.float32)
    assert all(h.count == 0 for h in layer.fp8_state.histories.values())
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
