"""Recipe migration: a recipe state saved under one recipe resumes under another, or in
bf16, through ``load_recipe_state_dict(model, state, migrate=True)``
(``fp8train.migrate_recipe_state``); without it a mismatch raises, pointing at it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import fp8train
from fp8train import Recipe
from fp8train.nn import fp8_layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


def _trained(recipe: Recipe | str, steps: int) -> nn.Module:
    """A converted model after ``steps`` forward+backward steps of growing inputs, so that
    each amax history holds distinct values in order."""
    model = fp8train.convert(_model(), recipe, kernels="eager")
    for step in range(steps):
        x = torch.randn(4, 32) * (1.0 + step)
        model(x).sum().backward()
    return model


def _recorded(history: fp8train.AmaxHistory) -> list[float]:
    """The amaxes a history holds, oldest first."""
    assert history.window is not None
    n = len(history)
    return [float(history.window[(history.count - n + i) % history.length]) for i in range(n)]


def test_tensorwise_to_delayed_starts_histories_empty(caplog: pytest.LogCaptureFixture) -> None:
    state = fp8train.recipe_state_dict(_trained("tensorwise", 2))
    model = fp8train.convert(_model(), "delayed", kernels="eager")
    with pytest.raises(ValueError, match=r"checkpoint recipe 'tensorwise' != .*migrate=True"):
        fp8train.load_recipe_state_dict(model, state)
    with caplog.at_level(logging.INFO, logger="fp8train"):
        fp8train.load_recipe_state_dict(model, state, migrate=True)
    for _, layer in fp8_layers(model):
        assert set(layer.fp8_state.histories) == {"input", "weight", "grad_output"}
        assert all(h.empty for h in layer.fp8_state.histories.values())
    lines = [r.getMessage() for r in caplog.records if r.name == "fp8train"]
    assert len(lines) == 1
    assert "tensorwise -> delayed: started grad_output, input, weight empty (0, 2)" in lines[0]
    # The model trains on from there.
    model(torch.randn(4, 32)).sum().backward()


def test_delayed_16_to_8_keeps_the_most_recent_8(caplog: pytest.LogCaptureFixture) -> None:
    delayed = Recipe.from_name("delayed")
    old = _trained(delayed, 20)  # the ring of 16 has wrapped
    state = fp8train.recipe_state_dict(old)
    short = dataclasses.replace(delayed, history_len=8)
    model = fp8train.convert(_model(), short, kernels="eager")
    with pytest.raises(ValueError, match=r"history_len: checkpoint 16, model 8.*migrate=True"):
        fp8train.load_recipe_state_dict(model, state)
    with caplog.at_level(logging.INFO, logger="fp8train"):
        fp8train.load_recipe_state_dict(model, state, migrate=True)
    old_layers, new_layers = dict(fp8_layers(old)), dict(fp8_layers(model))
    for name, layer in new_layers.items():
        for role, history in layer.fp8_state.histories.items():
            before = old_layers[name].fp8_state.histories[role]
            assert history.length == 8 and history.count == 8
            assert _recorded(history) == _recorded(before)[-8:]
            assert torch.equal(history.reduced(), torch.tensor(max(_recorded(before)[-8:])))
        assert layer.fp8_state.nonfinite == old_layers[name].fp8_state.nonfinite
    lines = [r.getMessage() for r in caplog.records if r.name == "fp8train"]
    assert len(lines) == 1
    assert (
        "delayed(history_len=16) -> delayed(history_len=8): seeded input, weight, "
        "grad_output with the last 8 amaxes (0, 2)"
    ) in lines[0]
    # Migrated state round-trips exactly, and the model trains on from there.
    again = fp8train.convert(_model(), short, kernels="eager")
    fp8train.load_recipe_state_dict(again, fp8train.recipe_state_dict(model))
    model(torch.randn(4, 32)).sum().backward()


def test_delayed_8_to_16_keeps_what_was_recorded() -> None:
    delayed = Recipe.from_name("delayed")
    old = _trained(dataclasses.replace(delayed, history_len=8), 5)
    model = fp8train.convert(_model(), delayed, kernels="eager")
    fp8train.load_recipe_state_dict(model, fp8train.recipe_state_dict(old), migrate=True)
    for name, layer in fp8_layers(model):
        for role, history in layer.fp8_state.histories.items():
            before = dict(fp8_layers(old))[name].fp8_state.histories[role]
            assert history.count == 5 and _recorded(history) == _recorded(before)


def test_delayed_to_bf16_drops_everything(caplog: pytest.LogCaptureFixture) -> None:
    state = fp8train.recipe_state_dict(_trained("delayed", 3))
    plain = _model()
    with pytest.raises(ValueError, match=r"unexpected \['0', '2'\].*migrate=True"):
        fp8train.load_recipe_state_dict(plain, state)
    with caplog.at_level(logging.INFO, logger="fp8train"):
        fp8train.load_recipe_state_dict(plain, state, migrate=True)
    assert fp8train.migrate_recipe_state(state, plain) == {"version": 2, "layers": {}}
    lines = [r.getMessage() for r in caplog.records if r.name == "fp8train"]
    assert len(lines) == 1 and "dropped layers no longer FP8 (0, 2)" in lines[0]


def test_fewer_fp8_layers_drops_the_others() -> None:
    state = fp8train.recipe_state_dict(_trained("delayed", 3))
    model = fp8train.convert(_model(), "delayed", skip="2", kernels="eager")
    fp8train.load_recipe_state_dict(model, state, migrate=True)
    assert [n for n, _ in fp8_layers(model)] == ["0"]
    assert model[0].fp8_state.histories["input"].count == 3


def test_migrate_does_not_change_the_state_and_same_recipe_is_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _trained("delayed", 3)
    state = fp8train.recipe_state_dict(model)
    with caplog.at_level(logging.INFO, logger="fp8train"):
        migrated = fp8train.migrate_recipe_state(state, model)
    assert migrated["layers"] == state["layers"]
    assert not [r for r in caplog.records if r.name == "fp8train"]


def test_migrate_refuses_another_model_shape() -> None:
    state = fp8train.recipe_state_dict(_trained("delayed", 1))
    other = fp8train.convert(
        nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)), "tensorwise"
    )
    before = {n: dict(m.fp8_state.nonfinite) for n, m in fp8_layers(other)}
    with pytest.raises(ValueError, match=r"layer '0': 'features' .* \[32, 32\]|\(32, 32\)"):
        fp8train.load_recipe_state_dict(other, state, migrate=True)
    assert {n: dict(m.fp8_state.nonfinite) for n, m in fp8_layers(other)} == before


def test_migrate_must_be_a_bool() -> None:
    model = _trained("delayed", 1)
    with pytest.raises(TypeError, match=r"migrate must be a bool, got 'yes'"):
        fp8train.load_recipe_state_dict(
            model,
            fp8train.recipe_state_dict(model),
            migrate="yes",  # type: ignore[arg-type]
        )
