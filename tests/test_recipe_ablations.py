"""The recipe options the loss-parity study ablates (issue 33): each GEMM in FP8 or in
high precision (``fp8_fprop``/``fp8_dgrad``/``fp8_wgrad``), what the input is quantised
from (``quantize_from``), FP8 or high-precision input saved for backward
(``save_fp8_activations``), power-of-two scales or not (``ScaleSpec.power_of_two``).

Each test runs one layer under CPU bf16 autocast with an fp32 input, the case the
options exist for (a LayerNorm output reaching a converted Linear).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train import E4M3, Fp8Linear, Recipe
from fp8train.recipes import RECIPE_NAMES

M, K, N = 96, 64, 48


def _layer(recipe: Recipe, seed: int = 0) -> Fp8Linear:
    torch.manual_seed(seed)
    return Fp8Linear.from_linear(nn.Linear(K, N, bias=False), recipe, "l", kernels="eager")


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3.0  # fp32, as a LayerNorm output under autocast
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)  # the output's gradient
    return x, dy


def _run(layer: Fp8Linear, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, grad_input and grad_weight of one step under bf16 autocast."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy)
    assert x.grad is not None and layer.weight.grad is not None
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad}


def _observed(layer: Fp8Linear, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """Every operand the layer quantised in one step, by role: (tensor, ScaledTensor)."""
    seen: dict[str, Any] = {}

    def observer(state: Any, role: str, t: torch.Tensor, q: Any) -> None:
        seen[role] = (t, q)

    layer.fp8_state.observer = observer
    _run(layer, x, dy)
    return seen


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    same = a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert same, f"{what}: {int((a != b).sum())} of {a.numel()} elements differ ({a.shape})"


# --------------------------------------------------------------------- validation


def test_new_fields_are_validated() -> None:
    base = Recipe.from_name("tensorwise")
    with pytest.raises(TypeError, match="fp8_fprop must be a bool"):
        replace(base, fp8_fprop=1)
    with pytest.raises(TypeError, match="save_fp8_activations must be a bool"):
        replace(base, save_fp8_activations="yes")
    with pytest.raises(ValueError, match="quantize_from must be 'input' or 'compute_dtype'"):
        replace(base, quantize_from="bf16")
    with pytest.raises(ValueError, match="fp8_fprop=False needs current scaling"):
        replace(Recipe.from_name("delayed"), fp8_fprop=False)


def test_defaults_are_the_behaviour_before_the_options() -> None:
    r = Recipe.from_name("tensorwise")
    assert r.fp8_fprop and r.quantize_from == "input" and r.save_fp8_activations


# ---------------------------------------------------------- canonical and checkpoints


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_canonical_leaves_later_fields_out_at_their_default(name: str) -> None:
    r = Recipe.from_name(name)
    assert "fp8_fprop" not in r.canonical() and "quantize_from" not in r.canonical()
    hp = replace(r, fp8_fprop=False) if r.scaling == "current" else r
    if hp is not r:
        assert hp.canonical()["fp8_fprop"] == "False"
    bf = replace(r, quantize_from="compute_dtype")
    assert bf.canonical()["quantize_from"] == "'compute_dtype'"
    assert bf.canonical() != r.canonical()


def _old_state(model: nn.Module) -> dict[str, Any]:
    """A recipe state as versions before the new fields saved it (no such keys)."""
    state = fp8train.recipe_state_dict(model)
    for entry in state["layers"].values():
        entry["recipe_config"] = {
            k: v
            for k, v in entry["recipe_config"].items()
            if k not in ("fp8_fprop", "quantize_from")
        }
    return state


@pytest.mark.parametrize("name", ["tensorwise", "delayed"])
def test_state_saved_before_the_fields_loads_into_the_default_recipe(name: str) -> None:
    torch.manual_seed(0)
    model = fp8train.convert(nn.Sequential(nn.Linear(32, 32)), name, kernels="eager")
    old = _old_state(model)
    torch.manual_seed(0)
    fresh = fp8train.convert(nn.Sequential(nn.Linear(32, 32)), name, kernels="eager")
    fp8train.load_recipe_state_dict(fresh, old)  # accepted: the fields are at default


def test_state_saved_before_the_fields_is_refused_by_a_variant() -> None:
    model = fp8train.convert(nn.Sequential(nn.Linear(32, 32)), "tensorwise", kernels="eager")
    old = _old_state(model)
    variant = replace(Recipe.from_name("tensorwise"), quantize_from="compute_dtype")
    other = fp8train.convert(nn.Sequential(nn.Linear(32, 32)), variant, kernels="eager")
    with pytest.raises(ValueError, match=r"quantize_from: checkpoint \(absent\)"):
        fp8train.load_recipe_state_dict(other, old)


# ----------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "mxfp8", "int8"])
def test_hp_fprop_output_is_f_linear_in_the_compute_dtype(name: str) -> None:
    x, dy = _inputs()
    recipe = replace(Recipe.from_name(name), fp8_fprop=False)
    layer = _layer(recipe)
    run = _run(layer, x, dy)
    ref = F.linear(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16))
    _assert_bitwise(run["y"], ref, f"{name} fp8_fprop=False output")
    assert "output      = x.W^T : compute dtype" in recipe.gemms()


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise"])
def test_hp_fprop_leaves_the_backward_gemms_as_they_were(name: str) -> None:
    # The same dy into both layers: the backward GEMMs must not notice the forward's.
    x, dy = _inputs()
    fp8 = _run(_layer(Recipe.from_name(name)), x, dy)
    hp = _run(_layer(replace(Recipe.from_name(name), fp8_fprop=False)), x, dy)
    _assert_bitwise(hp["dx"], fp8["dx"], f"{name} grad_input")
    _assert_bitwise(hp["dw"], fp8["dw"], f"{name} grad_weight")
    assert not torch.equal(hp["y"], fp8["y"]), "the output GEMM did run in FP8"


def test_every_gemm_in_high_precision_is_the_bf16_linear() -> None:
    x, dy = _inputs()
    recipe = replace(
        Recipe.from_name("tensorwise"),
        fp8_fprop=False,
        fp8_dgrad=False,
        fp8_wgrad=False,
    )
    run = _run(_layer(recipe), x, dy)
    lin = _layer(Recipe.from_name("tensorwise"))  # the same initial weight
    ref_lin = nn.Linear(K, N, bias=False)
    ref_lin.weight = nn.Parameter(lin.weight.detach().clone())
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = ref_lin(xr)
    yr.backward(dy)
    assert xr.grad is not None and ref_lin.weight.grad is not None
    _assert_bitwise(run["y"], yr.detach(), "output")
    _assert_bitwise(run["dx"], xr.grad, "grad_input")
    _assert_bitwise(run["dw"], ref_lin.weight.grad, "grad_weight")


def test_scales_without_power_of_two_are_max_over_amax() -> None:
    x, dy = _inputs()
    base = Recipe.from_name("tensorwise")
    specs = {
        role: replace(getattr(base, role), power_of_two=False)
        for role in ("input", "weight", "grad_output")
    }
    seen = _observed(_layer(replace(base, **specs)), x, dy)
    for role in ("input", "weight", "grad_output"):
        t, q = seen[role]
        fmt = specs[role].fmt
        want = torch.tensor(fmt.max, dtype=torch.float32) / t.abs().amax().float()
        assert torch.equal(q.scale.reshape(()), want), (role, q.scale, want)
    # And with them (the default): the largest power of two not above max / amax.
    seen = _observed(_layer(base), x, dy)
    t, q = seen["input"]
    ratio = E4M3.max / t.abs().amax().item()
    assert q.scale.item() <= ratio < 2 * q.scale.item()
    assert q.scale.log2().item().is_integer()


@pytest.mark.parametrize("name", ["tensorwise", "rowwise"])
def test_quantize_from_compute_dtype_casts_the_bf16_rounding(name: str) -> None:
    x, dy = _inputs()
    base = Recipe.from_name(name)
    from_input = _observed(_layer(base), x, dy)["input"][1]
    from_bf16 = _observed(_layer(replace(base, quantize_from="compute_dtype")), x, dy)["input"][1]
    ref_input = fp8train.quantize(x, base.input)
    ref_bf16 = fp8train.quantize(x.to(torch.bfloat16), base.input)
    _assert_bitwise(from_input.data, ref_input.data, "quantize_from='input' payload")
    _assert_bitwise(from_bf16.data, ref_bf16.data, "quantize_from='compute_dtype' payload")
    # The payloads differ only where the bf16 rounding moved x to another FP8 code, and
    # there by one code (bf16 keeps 8 significand bits, E4M3 3: a rounding of x by half a
    # bf16 ulp moves x * scale by far less than one E4M3 step, but can carry it across
    # the midpoint between two codes).
    a = from_input.dequantize(torch.float32)
    b = from_bf16.dequantize(torch.float32)
    differ = a != b
    assert 0 < int(differ.sum()) < 0.05 * x.numel(), int(differ.sum())
    step = (a - b).abs()[differ] / a.abs()[differ].clamp_min(1e-30)
    assert bool((step <= 2.0**-2).all()), step.max()


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise", "mxfp8"])
def test_quantize_from_is_a_no_op_for_inputs_already_in_the_compute_dtype(name: str) -> None:
    x, dy = _inputs()
    x = x.to(torch.bfloat16)
    base = Recipe.from_name(name)
    a = _run(_layer(base), x, dy)
    b = _run(_layer(replace(base, quantize_from="compute_dtype")), x, dy)
    for key in a:
        _assert_bitwise(a[key], b[key], f"{name} {key}")


def test_tensorwise_high_precision_save_is_bitwise_the_fp8_save() -> None:
    # Tensorwise scales do not depend on the axis, and the saved copy is the tensor the
    # forward quantised: grad_weight re-quantises it with the same amax, hence the same
    # scale and payload as the FP8 copy the default keeps.
    x, dy = _inputs()
    base = Recipe.from_name("tensorwise")
    a = _run(_layer(base), x, dy)
    b = _run(_layer(replace(base, save_fp8_activations=False)), x, dy)
    for key in a:
        _assert_bitwise(a[key], b[key], f"tensorwise hp save {key}")


def test_high_precision_save_keeps_the_tensor_quantize_from_names() -> None:
    x, _ = _inputs()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    for qfrom, dtype in (("input", torch.float32), ("compute_dtype", torch.bfloat16)):
        saved.clear()
        recipe = replace(
            Recipe.from_name("rowwise"), save_fp8_activations=False, quantize_from=qfrom
        )
        layer = _layer(recipe)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x.clone().requires_grad_(True))
        assert any(t.shape == (M, K) and t.dtype == dtype for t in saved), [
            (tuple(t.shape), t.dtype) for t in saved
        ]


def test_e4m3_gradients_quantise_dy_in_e4m3() -> None:
    x, dy = _inputs()
    base = Recipe.from_name("tensorwise")
    recipe = replace(base, grad_output=replace(base.grad_output, fmt=E4M3))
    _, q = _observed(_layer(recipe), x, dy)["grad_output"]
    assert q.data.dtype == torch.float8_e4m3fn
    assert "e4m3 tensorwise" in recipe.gemms().splitlines()[1]
