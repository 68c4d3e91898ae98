"""Bad arguments raise TypeError/ValueError saying what was expected, what arrived and how
to fix it, before anything changes. Each case here used to be accepted with a wrong
result, or failed later (AttributeError, deep inside torch)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import fp8train
from fp8train import E4M3, AmaxHistory, Granularity, Recipe, ScaleSpec, cast, quantize
from fp8train.matmul import scaled_mm
from fp8train.nn import Fp8Linear, fp8_layers


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


# ------------------------------------------------------------------------------ cast
@pytest.mark.parametrize("saturate", ["False", "True", None, 0, 1.0])
def test_cast_saturate_must_be_a_bool(saturate: Any) -> None:
    """ "False" used to saturate (a truthy string) and None not to."""
    x = torch.tensor([1e6, -1.0])
    with pytest.raises(TypeError, match=r"saturate must be a bool, got .*pass saturate=True"):
        cast(x, E4M3, saturate=saturate)


def test_cast_saturate_bools_still_work() -> None:
    x = torch.tensor([1e6])
    assert cast(x, E4M3, saturate=True).float().item() == 448.0
    assert math.isnan(cast(x, E4M3, saturate=False).float().item())


@pytest.mark.parametrize("field", ["saturate", "power_of_two"])
def test_spec_flags_must_be_bools(field: str) -> None:
    with pytest.raises(TypeError, match=rf"{field} must be a bool, got 'False'"):
        ScaleSpec(**{field: "False"})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ convert
def test_convert_to_another_recipe_raises_and_keeps_the_model() -> None:
    """Used to keep tensorwise silently."""
    model = fp8train.convert(_model(), "tensorwise", kernels="eager")
    with pytest.raises(
        ValueError,
        match=r"already converted to recipe 'tensorwise'; .* to 'delayed': convert a fresh",
    ):
        fp8train.convert(model, "delayed", kernels="eager")
    assert {m.recipe.name for _, m in fp8_layers(model)} == {"tensorwise"}


def test_convert_again_with_the_same_recipe_is_allowed() -> None:
    model = fp8train.convert(_model(), "tensorwise", kernels="eager")
    model.add_module("extra", nn.Linear(16, 16))
    fp8train.convert(model, "tensorwise", kernels="eager")
    assert isinstance(model.extra, Fp8Linear)


@pytest.mark.parametrize("recipe", [None, 3, 1.5])
def test_recipe_must_be_a_recipe_or_name(recipe: Any) -> None:
    """None used to raise AttributeError ('NoneType' has no attribute 'lower')."""
    with pytest.raises(TypeError, match=r"a recipe is a Recipe or one of the names .*got"):
        Recipe.from_name(recipe)
    model = _model()
    with pytest.raises(TypeError, match=r"a recipe is a Recipe or one of the names"):
        fp8train.convert(model, recipe)
    assert not list(fp8_layers(model))


def test_filter_must_be_callable() -> None:
    """A string filter used to fail only when called, halfway through the model."""
    model = _model()
    with pytest.raises(TypeError, match=r"filter must be a callable .*got str.*skip="):
        fp8train.convert(model, "tensorwise", filter="0")  # type: ignore[arg-type]
    assert not list(fp8_layers(model))


@pytest.mark.parametrize("skip", [None, 3, ["0", 2]])
def test_skip_must_be_patterns(skip: Any) -> None:
    """None used to raise "'NoneType' object is not iterable"."""
    with pytest.raises(TypeError, match=r"skip must be an fnmatch pattern or an iterable"):
        fp8train.convert(_model(), "tensorwise", skip=skip)


def test_skip_accepts_a_generator() -> None:
    model = fp8train.convert(_model(), "tensorwise", skip=(p for p in ["0"]), kernels="eager")
    assert [n for n, _ in fp8_layers(model)] == ["2"]


# ------------------------------------------------------------------------------ quantize
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_quantize_scale_must_be_finite_and_positive(value: float) -> None:
    """scale=0 used to give all-NaN dequantised values; NaN was accepted."""
    with pytest.raises(ValueError, match=r"scale must be finite and > 0 .*got 1 of 1"):
        quantize(torch.randn(4, 4), E4M3, scale=torch.tensor(value))


def test_quantize_scale_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"scale must be a floating tensor .*got float"):
        quantize(torch.randn(4, 4), E4M3, scale=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("block", [(1, 2.5), 128, (128,), (1, True), "1x128"])
def test_block_must_be_a_pair_of_ints(block: Any) -> None:
    """(1, 2.5) and 128 used to fail deep inside torch, at the first quantize."""
    with pytest.raises(TypeError, match=r"block must be a \(rows, cols\) pair of ints"):
        ScaleSpec(granularity=Granularity.BLOCK, block=block)
    with pytest.raises(TypeError, match=r"block must be a \(rows, cols\) pair of ints"):
        quantize(torch.randn(4, 256), E4M3, "block", block=block)


def test_block_given_as_a_list_becomes_a_tuple() -> None:
    spec = ScaleSpec(granularity=Granularity.BLOCK, block=[1, 64])  # type: ignore[arg-type]
    assert spec.block == (1, 64)
    hash(spec)


# ------------------------------------------------------------------------------ history
@pytest.mark.parametrize("length", [2.5, 0, "8", None])
def test_amax_history_length_must_be_a_positive_int(length: Any) -> None:
    with pytest.raises(ValueError, match=r"length must be an int >= 1, got"):
        AmaxHistory(length)


# ------------------------------------------------------------------------------ scaled_mm
def test_scaled_mm_needs_scaled_tensors() -> None:
    """Plain tensors used to raise AttributeError ('Tensor' has no attribute 'fmt'...)."""
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    with pytest.raises(TypeError, match=r"expects ScaledTensor operands, got Tensor for a"):
        scaled_mm(a, b)  # type: ignore[arg-type]
    qa = quantize(a, E4M3)
    with pytest.raises(TypeError, match=r"got Tensor for b; quantize it first"):
        scaled_mm(qa, b)  # type: ignore[arg-type]
