"""The FP8 linear's autograd function (fp8train/autograd.py): which operands each GEMM
quantises and in what order, the step-wise NaN/inf rule, and the distributed interface
(:class:`fp8train.autograd.DistributedHooks`) exercised on one process with fakes."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

import fp8train
from fp8train import Fp8Linear, Recipe, ScaledTensor, quantize
from fp8train.autograd import DistributedHooks, NonFiniteWarning, operand_scale
from fp8train.testing import assert_bitwise_equal, assert_nested_bitwise_equal

M, K, N = 40, 256, 128  # K, N: whole 1x128, 128x128 and MX tiles


def _layer(recipe: Recipe | str, kernels: str = "eager") -> Fp8Linear:
    g = torch.Generator().manual_seed(5)
    layer = Fp8Linear(K, N, recipe=recipe, name="fc", kernels=kernels)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=g) / math.sqrt(K))
        layer.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return layer


def _calls(layer: Fp8Linear) -> list[tuple[str, bool]]:
    """The observer's calls on ``layer``: (role, whether it got a scaled tensor)."""
    calls: list[tuple[str, bool]] = []

    def observe(state: Any, role: str, t: torch.Tensor, q: ScaledTensor | None) -> None:
        calls.append((role, q is not None))

    layer.fp8_state.observer = observe
    return calls


def _step(layer: Fp8Linear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(dy.to(y.dtype))
    assert x.grad is not None and layer.weight.grad is not None
    return y.detach(), x.grad, layer.weight.grad


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)


# Per recipe, the roles the backward quantises after dy: the weight and the input again
# where their scales change with the contracted axis, dy along M likewise.
BACKWARD_ROLES = {
    "tensorwise": ["grad_output"],
    "delayed": ["grad_output"],
    "rowwise": ["grad_output", "weight.t", "grad_output.t", "input.t"],
    "blockwise": ["grad_output", "grad_output.t", "input.t"],  # W: 128x128, reused
    "mxfp8": ["grad_output", "weight.t", "grad_output.t", "input.t"],
    "int8": ["grad_output"],
    "int8_rowwise": ["grad_output", "weight.t", "grad_output.t", "input.t"],
    "mxfp4": ["grad_output", "weight.t", "grad_output.t", "input.t"],
    # W: 16x16, reused; dy^T and x Hadamard-transformed along the tokens, then quantised
    "nvfp4": ["grad_output", "grad_output.t", "input.t"],
}


def test_backward_roles_cover_every_recipe() -> None:
    assert set(BACKWARD_ROLES) == set(fp8train.RECIPE_NAMES)


@pytest.mark.parametrize("name", fp8train.RECIPE_NAMES)
def test_each_operand_is_quantised_once_in_gemm_order(name: str) -> None:
    """The observer sees the forward's x and W, then the backward's operands in the
    order their GEMMs read them (grad_input's, then grad_weight's); saved FP8 copies
    reused as they are are not quantised again."""
    layer = _layer(name)
    calls = _calls(layer)
    x, dy = _data()
    _step(layer, x, dy)
    expected = ["input", "weight", *BACKWARD_ROLES[name]]
    assert calls == [(role, True) for role in expected]


@pytest.mark.parametrize("name", ["rowwise", "blockwise"])
def test_bad_dy_is_reported_once_and_observed_once(name: str) -> None:
    """dy and dy^T are one tensor: a NaN in it is one report and one observer call, and
    no other backward operand is shown or quantised."""
    layer = _layer(name)
    calls = _calls(layer)
    x, dy = _data()
    dy[3, 4] = math.nan
    _, dx, dw = _step(layer, x, dy)
    assert calls == [("input", True), ("weight", True), ("grad_output", False)]
    assert layer.fp8_state.nonfinite == {"input": 0, "weight": 0, "grad_output": 1}
    assert not bool(torch.isfinite(dx).all()) and not bool(torch.isfinite(dw).all())


def test_bad_input_keeps_the_good_weight_from_history_and_observer() -> None:
    """A step records nothing and shows the observer only its bad operand when one of
    its amaxes is NaN/inf, though the weight's own amax was finite."""
    layer = _layer("delayed")
    x, dy = _data()
    _step(layer, x, dy)
    before = layer.fp8_state.state_dict()["histories"]
    calls = _calls(layer)
    x[0, 0] = math.inf
    with pytest.warns(NonFiniteWarning, match="'fc': input of shape"):
        y = layer(x)
    assert calls == [("input", False)]
    assert not bool(torch.isfinite(y).all())
    assert_nested_bitwise_equal(
        layer.fp8_state.state_dict()["histories"], before, "histories after a bad input"
    )


@dataclass
class FakeHooks:
    """A stand-in for fp8train.distributed: ``reduce_amax`` scales every amax by
    ``factor`` (as if another rank saw a larger one); ``gathered`` hands out ``weight``'s
    quantisation when set."""

    factor: float = 1.0
    gather: tuple[ScaledTensor, torch.Tensor] | None = None
    stream_rank: int = 0
    reduced: list[torch.Tensor] = field(default_factory=list)
    asked: list[torch.Tensor] = field(default_factory=list)

    def reduce_amax(self, amax: torch.Tensor) -> torch.Tensor:
        out = amax * self.factor
        self.reduced.append(out)
        return out

    def gathered(self, weight: torch.Tensor) -> tuple[ScaledTensor, torch.Tensor] | None:
        self.asked.append(weight)
        return self.gather


def test_fake_hooks_meet_the_protocol() -> None:
    hooks: DistributedHooks = FakeHooks()  # mypy checks the structural match
    assert hooks.gathered(torch.zeros(1)) is None


def test_each_rank_draws_its_own_random_streams() -> None:
    """nvfp4 rounds dy stochastically and signs its Hadamard transform from the layer's
    streams: rank 0 of a data-parallel group draws the single process's numbers, rank 1
    others (ranks quantising different rows must not repeat each other's draws)."""
    x, dy = _data()
    alone = _step(_layer("nvfp4"), x, dy)
    grads = {}
    for rank in (0, 1):
        layer = _layer("nvfp4")
        layer.fp8_state.distributed = FakeHooks(stream_rank=rank)
        grads[rank] = _step(layer, x, dy)
    for got, want in zip(grads[0], alone, strict=True):
        assert_bitwise_equal(got, want, "rank 0")
    assert torch.equal(grads[1][0], alone[0])  # the forward draws nothing
    assert not torch.equal(grads[1][1], alone[1]) and not torch.equal(grads[1][2], alone[2])


def test_reduce_amax_feeds_the_delayed_histories() -> None:
    """Every operand with a history has its amax reduced before the check and the record,
    in the order of its GEMM: input, weight, then grad_output."""
    layer = _layer("delayed")
    hooks = FakeHooks(factor=2.0)
    layer.fp8_state.distributed = hooks
    x, dy = _data()
    _step(layer, x, dy)
    want = [2 * x.abs().amax(), 2 * layer.weight.detach().abs().amax(), 2 * dy.abs().amax()]
    assert len(hooks.reduced) == 3
    for got, w, role in zip(hooks.reduced, want, ("input", "weight", "grad_output"), strict=True):
        assert_bitwise_equal(got, w, f"{role} reduced amax")
        assert_bitwise_equal(layer.fp8_state.histories[role].reduced(), w, f"{role} history")


def test_reduce_amax_is_not_called_for_current_scaling() -> None:
    layer = _layer("tensorwise")
    hooks = FakeHooks(factor=2.0)
    layer.fp8_state.distributed = hooks
    _step(layer, *_data())
    assert hooks.reduced == []


def test_an_inf_from_another_rank_skips_every_record() -> None:
    """A rank whose own amaxes are finite still skips the step's records when the
    reduction brings in another rank's inf, and runs that GEMM in high precision."""
    layer = _layer("delayed")
    x, dy = _data()
    _step(layer, x, dy)
    before = layer.fp8_state.state_dict()["histories"]
    layer.fp8_state.distributed = FakeHooks(factor=math.inf)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _step(layer, x, dy)
    assert_nested_bitwise_equal(layer.fp8_state.state_dict()["histories"], before, "histories")
    assert layer.fp8_state.nonfinite == {"input": 1, "weight": 1, "grad_output": 1}


@pytest.mark.parametrize("name", ["tensorwise", "delayed", "blockwise"])
def test_gathered_weight_is_the_forward_operand_and_reused_by_grad_input(name: str) -> None:
    """A weight FSDP2 all-gathered in FP8 enters both GEMMs as handed over (no second
    cast, no second record); with it equal to the layer's own quantisation, the results
    are bitwise those of a layer without hooks."""
    x, dy = _data()
    plain = _layer(name)
    plain_out = [_step(plain, x, dy) for _ in range(2)]

    layer = _layer(name)
    seen: list[ScaledTensor | None] = []
    layer.fp8_state.observer = lambda s, role, t, q: seen.append(q) if role == "weight" else None
    hooks = FakeHooks()
    layer.fp8_state.distributed = hooks
    for step in range(2):
        # What fp8train.distributed does before the gather: amax, scale (delayed: from
        # the history, then record), cast.
        w = layer.weight.detach()
        amax = layer.fp8_state.kernels.amax(w, layer.recipe.weight)
        scale = operand_scale(amax, layer.recipe.weight, "weight", layer.fp8_state)
        hooks.gather = (quantize(w, layer.recipe.weight, scale=scale), amax)
        out = _step(layer, x, dy)
        assert seen[-1] is hooks.gather[0], "the gathered weight was not used as is"
        for got, want, what in zip(out, plain_out[step], ("y", "dx", "dW"), strict=True):
            assert_bitwise_equal(got, want, f"{name} step {step} {what}")
    assert all(a is layer.weight for a in hooks.asked)
    assert_nested_bitwise_equal(
        layer.fp8_state.state_dict(), plain.fp8_state.state_dict(), "layer state"
    )


def test_stochastic_rounding_takes_the_eager_cast_after_the_check() -> None:
    """Stochastic rounding (dy here) is quantised after its amax is checked, with the
    scale current scaling gives; each value lands on one of its two FP8 neighbours."""
    base = Recipe.from_name("tensorwise")
    recipe = replace(base, grad_output=replace(base.grad_output, rounding="stochastic"))
    layer = _layer(recipe)
    got: dict[str, ScaledTensor | None] = {}
    layer.fp8_state.observer = lambda s, role, t, q: got.__setitem__(role, q)
    x, dy = _data()
    _step(layer, x, dy)
    q = got["grad_output"]
    assert q is not None
    nearest = quantize(dy, base.grad_output)
    assert_bitwise_equal(q.scale, nearest.scale, "stochastic dy scale")
    assert not torch.equal(q.data.float(), nearest.data.float()), "rounded as nearest"
    # E5M2 keeps 2 mantissa bits: a neighbour is within 2^-2 of the magnitude, or within
    # the smallest subnormal 2^-16 near zero.
    scaled = dy * q.scale
    err = (q.data.float() - scaled).abs()
    assert bool((err <= scaled.abs() * 2.0**-2 + 2.0**-16).all())
