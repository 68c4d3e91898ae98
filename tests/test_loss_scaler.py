"""LossScaler: skipping, backoff/growth, unscaling, state_dict, and exactness vs no scaler."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

from fp8train.loss_scaler import LossScaler, LossScalerConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _model_and_adam() -> tuple[nn.Linear, torch.optim.Adam]:
    model = nn.Linear(4, 3)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, f"parameter of shape {tuple(p.shape)} has no grad"
    return p.grad


def _backward(model: nn.Linear, scaler: LossScaler, poison: float | None = None) -> None:
    """One scaled backward on fixed data; ``poison`` overwrites one weight-grad entry."""
    x = torch.randn(8, model.in_features)
    scaler.scale(model(x).square().mean()).backward()
    if poison is not None:
        _grad(model.weight)[0, 0] = poison


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"tensor {i} (shape {tuple(x.shape)}): max |diff| " + str(
            (x - y).abs().max().item()
        )


# ----------------------------------------------------------------------------- scale()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_multiplies_and_keeps_dtype(dtype: torch.dtype) -> None:
    scaler = LossScaler(init_scale=2.0**10)
    loss = torch.tensor(1.5, dtype=dtype, requires_grad=True)
    scaled = scaler.scale(loss)
    assert scaled.dtype == dtype
    assert scaled.item() == 1.5 * 2**10
    scaled.backward()
    assert loss.grad is not None and loss.grad.item() == 2**10


def test_scale_fp16_overflow_becomes_inf() -> None:
    # The product is formed in fp32 and only the cast back overflows.
    scaled = LossScaler(init_scale=2.0**10).scale(torch.tensor(100.0, dtype=torch.float16))
    assert math.isinf(scaled.item())


def test_scale_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        LossScaler().scale(1.0)  # type: ignore[arg-type,unused-ignore]


# ------------------------------------------------------------------ non-finite skipping


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
def test_non_finite_grad_skips_step_and_backs_off(poison: float) -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(init_scale=2.0**8, growth_interval=100)
    # One clean step first, so Adam has state whose non-change we can check.
    opt.zero_grad()
    _backward(model, scaler)
    scaler.step(opt)
    scaler.update()
    params, opt_state = _snapshot(model), copy.deepcopy(opt.state_dict())
    assert scaler.growth_tracker == 1

    opt.zero_grad()
    _backward(model, scaler, poison=poison)
    assert scaler.step(opt) is None
    scaler.update()

    _assert_bitwise(_snapshot(model), params)
    after = opt.state_dict()["state"]
    for idx, before in opt_state["state"].items():
        assert after[idx]["step"].item() == before["step"].item() == 1
        assert torch.equal(after[idx]["exp_avg"], before["exp_avg"])
    assert scaler.get_scale() == 2.0**7
    assert scaler.skipped_steps == 1
    assert scaler.last_step_skipped is True
    assert scaler.growth_tracker == 0


def test_backoff_floors_at_min_scale() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(init_scale=4.0, min_scale=2.0)
    for _ in range(3):
        opt.zero_grad()
        _backward(model, scaler, poison=math.inf)
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0
    assert scaler.skipped_steps == 3


def test_clean_step_returns_optimizer_result_and_passes_args() -> None:
    class Recording(torch.optim.SGD):
        def step(self, *args: Any, **kwargs: Any) -> Any:
            super().step()
            return ("ran", args, kwargs)

    model = nn.Linear(2, 1)
    opt = Recording(model.parameters(), lr=0.1)
    scaler = LossScaler()
    _backward(model, scaler)
    assert scaler.step(opt, 7, flag=True) == ("ran", (7,), {"flag": True})
    assert scaler.last_step_skipped is False


# ----------------------------------------------------------------------- growth rule


def test_growth_after_interval_then_capped() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(init_scale=2.0**4, growth_interval=3, max_scale=2.0**5)
    scales, trackers = [], []
    for _ in range(7):
        opt.zero_grad()
        _backward(model, scaler)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler.growth_tracker)
    assert scales == [16.0, 16.0, 32.0, 32.0, 32.0, 32.0, 32.0]  # capped at max_scale
    assert trackers == [1, 2, 0, 1, 2, 0, 1]
    assert scaler.skipped_steps == 0


def test_skip_resets_growth_tracker() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(init_scale=2.0**4, growth_interval=2)
    for poison in (None, math.nan, None, None):
        opt.zero_grad()
        _backward(model, scaler, poison=poison)
        scaler.step(opt)
        scaler.update()
    # 16 -> clean (tracker 1) -> skip: 8 -> two clean steps: 16
    assert scaler.get_scale() == 16.0
    assert scaler.growth_tracker == 0


def test_static_mode_never_changes_scale_but_skips() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler("static", init_scale=128.0, growth_interval=1)
    for poison in (None, None, math.inf, None, math.nan):
        opt.zero_grad()
        _backward(model, scaler, poison=poison)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 128.0
    assert scaler.skipped_steps == 2
    assert opt.state_dict()["state"][0]["step"].item() == 3


# --------------------------------------------------------------------- unscale_ rules


def test_unscale_then_clip_is_not_unscaled_again() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = LossScaler(init_scale=2.0**12)
    w0 = model.weight.detach().clone()
    _backward(model, scaler)
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    clipped = _grad(model.weight).clone()
    assert clipped.norm().item() == pytest.approx(1e-3, rel=1e-5)
    scaler.step(opt)
    # SGD with lr=1 subtracts the clipped gradient; a second unscale would shrink it 2**12x.
    assert torch.equal(model.weight.detach(), w0 - clipped)


def test_unscale_twice_raises() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler()
    _backward(model, scaler)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(opt)


def test_step_twice_raises_and_update_resets() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler()
    _backward(model, scaler)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="call update"):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _backward(model, scaler)
    scaler.unscale_(opt)  # allowed again after update()


def test_update_without_step_raises() -> None:
    with pytest.raises(RuntimeError, match="before update"):
        LossScaler().update()


def test_closure_rejected() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler()
    _backward(model, scaler)
    with pytest.raises(ValueError, match="closure"):
        scaler.step(opt, closure=lambda: 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unscale_low_precision_grads_exact(dtype: torch.dtype) -> None:
    p = nn.Parameter(torch.zeros(5, dtype=dtype))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler(init_scale=2.0**6)
    g = torch.tensor([1.0, -0.5, 3.0, 1e-3, 0.0], dtype=dtype)
    p.grad = g * 2**6
    scaler.unscale_(opt)
    assert p.grad.dtype == dtype
    assert torch.equal(p.grad, g)


def test_sparse_grad_rejected() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = LossScaler()
    scaler.scale(emb(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(TypeError, match="dense gradients"):
        scaler.unscale_(opt)


# -------------------------------------------------------------------- two optimizers


def test_two_optimizers_skip_independently_back_off_once() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**8)
    x = torch.randn(4, 3)
    scaler.scale(b(a(x)).square().mean()).backward()
    grad_a = [_grad(p).clone() / 2**8 for p in a.parameters()]
    _grad(b.weight)[0, 0] = math.inf
    a0, b0 = _snapshot(a), _snapshot(b)

    scaler.unscale_(opt_a)
    _assert_bitwise([_grad(p) for p in a.parameters()], grad_a)  # unscaled exactly once
    assert scaler.step(opt_a) is None  # SGD.step returns None either way
    assert scaler.last_step_skipped is False
    assert scaler.step(opt_b) is None
    assert scaler.last_step_skipped is True
    scaler.update()

    _assert_bitwise(_snapshot(b), b0)
    assert not torch.equal(a.weight.detach(), a0[0])
    assert scaler.get_scale() == 2.0**7  # one backoff per update, not per optimizer
    assert scaler.skipped_steps == 1


def test_shared_parameter_not_unscaled_twice() -> None:
    p = nn.Parameter(torch.ones(2))
    opt_a, opt_b = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler()
    p.grad = torch.ones(2)
    scaler.unscale_(opt_a)
    with pytest.raises(RuntimeError, match="two optimizers"):
        scaler.unscale_(opt_b)


# ------------------------------------------------------------------------ state_dict


def _run(
    model: nn.Linear, opt: torch.optim.Optimizer, scaler: LossScaler, poisons: list[Any]
) -> list[float]:
    scales = []
    for poison in poisons:
        opt.zero_grad()
        _backward(model, scaler, poison=poison)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_state_dict_round_trip_exact() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(
        init_scale=3.0 * 2**5, growth_factor=3.0, backoff_factor=0.25, growth_interval=3,
        min_scale=0.5, max_scale=1e6,
    )  # fmt: skip
    _run(model, opt, scaler, [None, math.inf, None, None])
    state = scaler.state_dict()
    assert state["version"] == 1
    fresh = LossScaler("static", enabled=False)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert (fresh.get_scale(), fresh.skipped_steps, fresh.growth_tracker) == (24.0, 1, 2)
    assert fresh.last_step_skipped is False


def test_loaded_scaler_continues_identically() -> None:
    poisons = [None, None, math.inf, None, None, math.nan, None, None, None]
    model, opt = _model_and_adam()
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)
    _run(model, opt, scaler, poisons[:4])

    # Fork mid-run: a fresh, default-configured scaler plus copies of model and optimizer.
    model2, opt2 = _model_and_adam()
    model2.load_state_dict(model.state_dict())
    # deepcopy: Optimizer.load_state_dict may share state tensors (Adam's "step") with
    # the source, and the two forks would then advance one counter.
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed = LossScaler()
    resumed.load_state_dict(scaler.state_dict())

    rng = torch.get_rng_state()
    scales = _run(model, opt, scaler, poisons[4:])
    torch.set_rng_state(rng)
    scales2 = _run(model2, opt2, resumed, poisons[4:])
    assert scales2 == scales
    assert len(set(scales)) > 1  # the continuation really exercises growth and backoff
    assert resumed.state_dict() == scaler.state_dict()
    _assert_bitwise(_snapshot(model2), _snapshot(model))


# A state_dict as the scaler wrote it before its settings became a LossScalerConfig:
# checkpoints written then must keep loading.
_STATE_V1 = {
    "version": 1,
    "mode": "dynamic",
    "enabled": True,
    "scale": 3072.0,
    "growth_factor": 3.0,
    "backoff_factor": 0.25,
    "growth_interval": 7,
    "min_scale": 0.5,
    "max_scale": 1e6,
    "growth_tracker": 4,
    "skipped_steps": 2,
    "last_step_skipped": True,
}


def test_loads_a_state_dict_written_before_the_config() -> None:
    scaler = LossScaler("static", enabled=False)
    scaler.load_state_dict(dict(_STATE_V1))
    assert scaler.state_dict() == _STATE_V1
    assert scaler.config == LossScalerConfig(
        "dynamic", init_scale=3072.0, growth_factor=3.0, backoff_factor=0.25,
        growth_interval=7, min_scale=0.5, max_scale=1e6,
    )  # fmt: skip
    assert (scaler.get_scale(), scaler.growth_tracker, scaler.skipped_steps) == (3072.0, 4, 2)


def test_load_invalid_config_raises_and_keeps_the_old_state() -> None:
    scaler = LossScaler(init_scale=2.0**10)
    before = scaler.state_dict()
    with pytest.raises(ValueError, match=r"invalid configuration.*backoff_factor"):
        scaler.load_state_dict({**_STATE_V1, "backoff_factor": 1.5})
    assert scaler.state_dict() == before


def test_load_unknown_version_raises() -> None:
    state = LossScaler().state_dict()
    state["version"] = 2
    with pytest.raises(ValueError, match="version"):
        LossScaler().load_state_dict(state)


def test_load_missing_key_raises() -> None:
    state = LossScaler().state_dict()
    del state["growth_tracker"]
    with pytest.raises(ValueError, match="growth_tracker"):
        LossScaler().load_state_dict(state)


def test_load_non_finite_scale_raises() -> None:
    state = LossScaler().state_dict()
    state["scale"] = math.inf
    with pytest.raises(ValueError, match="finite"):
        LossScaler().load_state_dict(state)


# --------------------------------------------------------- exactness vs no scaler


def _train(scaler: LossScaler | None, steps: int = 25) -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(1)
    model = nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 2) + 0.1 * torch.randn(64, 2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return _snapshot(model), losses


def test_training_with_scaler_bitwise_equals_without() -> None:
    # Power-of-two scales commute exactly with every rounding in backward and unscale_,
    # so without overflow the scaled run must match the plain run bit for bit.
    reference, ref_losses = _train(None)
    scaler = LossScaler(init_scale=2.0**12, growth_interval=5)
    params, losses = _train(scaler)
    assert scaler.get_scale() == 2.0**17  # grew 5 times: scaling really happened
    assert scaler.skipped_steps == 0
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # the loop actually trains
    assert losses == ref_losses
    _assert_bitwise(params, reference)


def test_disabled_is_pass_through() -> None:
    model, opt = _model_and_adam()
    scaler = LossScaler(enabled=False)
    loss = model(torch.randn(2, 4)).sum()
    assert scaler.scale(loss) is loss
    assert scaler.get_scale() == 1.0
    loss.backward()
    _grad(model.weight)[0, 0] = math.inf
    scaler.unscale_(opt)
    scaler.step(opt)  # runs despite the inf
    scaler.update()
    assert opt.state_dict()["state"][0]["step"].item() == 1
    assert scaler.skipped_steps == 0 and scaler.last_step_skipped is False


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "adaptive"}, "mode must be one of"),
        ({"init_scale": 0.0}, "init_scale must lie"),
        ({"init_scale": -4.0}, "init_scale must lie"),
        ({"init_scale": math.nan}, "init_scale must be finite"),
        ({"init_scale": math.inf}, "init_scale must be finite"),
        ({"init_scale": 2.0**30}, "init_scale must lie"),
        ({"growth_factor": 1.0}, "growth_factor must be > 1"),
        ({"growth_factor": 0.5}, "growth_factor must be > 1"),
        ({"backoff_factor": 1.0}, "backoff_factor must lie"),
        ({"backoff_factor": 0.0}, "backoff_factor must lie"),
        ({"growth_interval": 0}, "growth_interval must be >= 1"),
        ({"min_scale": 0.0}, "min_scale must be > 0"),
        ({"min_scale": 8.0, "max_scale": 4.0, "init_scale": 4.0}, "min_scale must be <="),
        ({"max_scale": 1e39}, "float32 maximum"),
    ],
)
def test_bad_args_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossScaler(**kwargs)
    with pytest.raises(ValueError, match=match):
        LossScalerConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(LossScalerConfig(), **kwargs)  # variants are validated too


@pytest.mark.parametrize(
    "kwargs",
    [{"growth_interval": 2.5}, {"init_scale": "1024"}, {"enabled": 1}, {"init_scale": True}],
)
def test_bad_arg_types_raise_type_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        LossScaler(**kwargs)
    with pytest.raises(TypeError):
        LossScalerConfig(**kwargs)


# -------------------------------------------------------------------------- config


def test_config_is_frozen_and_normalised() -> None:
    config = LossScalerConfig(init_scale=1024, min_scale=1, max_scale=2**20)
    assert (config.init_scale, config.min_scale, config.max_scale) == (1024.0, 1.0, 2.0**20)
    assert all(type(v) is float for v in (config.init_scale, config.min_scale, config.max_scale))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.init_scale = 2.0  # type: ignore[misc]


def test_defaults_agree_between_config_and_constructor() -> None:
    assert LossScaler().config == LossScalerConfig()


def test_from_config_round_trips_the_settings() -> None:
    config = dataclasses.replace(LossScalerConfig(), mode="static", init_scale=128.0)
    scaler = LossScaler.from_config(config)
    assert scaler.config == config
    assert (scaler.mode, scaler.get_scale()) == ("static", 128.0)
    assert scaler.state_dict() == LossScaler("static", init_scale=128.0).state_dict()
    with pytest.raises(TypeError, match="LossScalerConfig"):
        LossScaler.from_config({"mode": "static"})  # type: ignore[arg-type]


def test_state_dict_holds_floats_for_int_arguments() -> None:
    state = LossScaler(init_scale=1024, growth_factor=4, min_scale=2).state_dict()
    assert all(
        type(state[k]) is float
        for k in ("scale", "growth_factor", "backoff_factor", "min_scale", "max_scale")
    )
