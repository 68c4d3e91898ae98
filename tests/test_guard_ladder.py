"""The guard's demotion ladder (issue 32): a culprit moves to a finer FP8 recipe first,
then to high precision; the layer's recipe is recipe state (saved, loaded, migrated,
validated); bad ladders are refused with what to fix."""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import replace
from typing import Any

import pytest
import torch
from guard_helpers import TH, Batches, Fault, make_model, train
from torch import nn

import fp8train
from fp8train.guard import Guard
from fp8train.monitor import HealthWarning
from fp8train.recipes import Recipe
from fp8train.testing import assert_bitwise_equal

pytestmark = [
    pytest.mark.filterwarnings("ignore::fp8train.autograd.NonFiniteWarning"),
    pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning"),
]

ROWWISE = Recipe.from_name("rowwise")


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_a_culprit_moves_down_the_ladder_one_rung_per_trigger() -> None:
    """First trigger: rowwise; second (NaN in its input): high precision; the events,
    demotions and recipe state say so."""
    model = make_model()
    guard = Guard(
        model,
        _adam(model),
        thresholds=TH,
        policy="demote",
        demote_to=("rowwise", "high"),
        every=10**6,
        start=1,
    )
    first = Fault(model, "2", at=12, kind="grad_output")
    second = Fault(model, "2", at=18, kind="nan")

    def before(step: int) -> None:
        first.before(step)
        second.before(step)

    with guard:
        train(guard, Batches(), 22, before)
    assert [(e["action"], e["layer"], e["to"]) for e in guard.events] == [
        ("demote", "2", "rowwise"),
        ("demote", "2", "high"),
    ]
    assert "to rowwise" in guard.events[0]["message"]
    assert guard.demotions == {"2": "high"} and guard.demoted == ["2"]
    layer = model.get_submodule("2").fp8_state
    assert layer.recipe == ROWWISE and layer.high_precision
    entry = fp8train.recipe_state_dict(model)["layers"]["2"]
    assert entry["high_precision"] is True
    assert entry["demoted_to"] == {"recipe": "rowwise", "recipe_config": ROWWISE.canonical()}
    # Nothing left below high precision: a third trigger on the layer skips the batch.
    more, _ = guard.next_rung("2")
    assert not more


def test_a_layer_moved_to_rowwise_computes_what_rowwise_from_the_start_computes() -> None:
    """From the step the guard demotes it on (that step's re-run included), the run is
    bit for bit one whose culprit was converted with rowwise from the start, from the
    same weights, optimizer state and batches."""
    model = make_model()
    opt = _adam(model)
    guard = Guard(
        model, opt, thresholds=TH, policy="demote", demote_to=("rowwise",), every=10**6, start=1
    )
    data = Batches()
    fault = Fault(model, "2", at=12, kind="grad_output")
    at: dict[str, Any] = {}

    def before(step: int) -> None:
        fault.before(step)
        if step == 12:  # what the reference starts from
            at["model"], at["opt"] = copy.deepcopy((model, opt))
            at["data"] = copy.deepcopy(data.state_dict())

    with guard:
        losses = train(guard, data, 16, before)
    assert [(e["action"], e["to"]) for e in guard.events] == [("demote", "rowwise")]

    # The reference: layer "2" converted with rowwise from step 12 on (its own Parameters,
    # so the optimizer state carries over), the same fault at step 12.
    ref, ref_opt = at["model"], at["opt"]
    old = ref.get_submodule("2")
    ref[2] = fp8train.Fp8Linear.from_linear(old, ROWWISE, "2", kernels=old.fp8_state.kernels.mode)
    ref_data = Batches()
    ref_data.load_state_dict(at["data"])
    ref_fault = Fault(ref, "2", at=12, kind="grad_output")
    ref_losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for step in range(12, 16):
            ref_fault.before(step)
            x, y = ref_data.next()
            loss = nn.functional.mse_loss(ref(x), y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_losses.append(float(loss.detach()))
    assert losses[-4:] == ref_losses
    for (k, v), (k_ref, v_ref) in zip(
        model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert k == k_ref
        assert_bitwise_equal(v, v_ref)


@pytest.mark.slow  # delayed scaling's kernels compile on first use
def test_a_demotion_is_recipe_state_saved_loaded_and_migrated() -> None:
    """Delayed -> rowwise: the entry names rowwise and holds rowwise's (no) histories;
    a fresh delayed model loads it back (through torch.save with weights_only) and then
    computes bitwise what the demoted model computes; migration keeps the demotion, or
    drops it where the model's recipe is the demoted one."""
    model = make_model("delayed")
    x = torch.randn(8, 32)
    model(x).sum().backward()  # histories hold something
    model.get_submodule("2").fp8_state.demote(ROWWISE)
    state = fp8train.recipe_state_dict(model)
    entry = state["layers"]["2"]
    assert entry["recipe"] == "delayed" and entry["histories"] == {}
    assert entry["demoted_to"]["recipe"] == "rowwise"
    assert "demoted_to" not in state["layers"]["0"]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = make_model("delayed")
    fresh.load_state_dict(model.state_dict())
    fp8train.load_recipe_state_dict(fresh, loaded)
    assert fresh.get_submodule("2").fp8_state.recipe == ROWWISE
    assert fresh.get_submodule("0").fp8_state.recipe.name == "delayed"
    x2 = torch.randn(8, 32)
    assert_bitwise_equal(fresh(x2), model(x2))
    again = fp8train.recipe_state_dict(fresh)["layers"]["2"]
    assert again["demoted_to"] == entry["demoted_to"] and again["histories"] == {}

    tensorwise = make_model("tensorwise")
    fp8train.load_recipe_state_dict(tensorwise, copy.deepcopy(state), migrate=True)
    assert tensorwise.get_submodule("2").fp8_state.recipe == ROWWISE
    rowwise = make_model("rowwise")
    migrated = fp8train.migrate_recipe_state(copy.deepcopy(state), rowwise)
    assert "demoted_to" not in migrated["layers"]["2"]  # rowwise is that model's own
    fp8train.load_recipe_state_dict(rowwise, migrated)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"demoted_to": {"recipe": "nope", "recipe_config": {}}}, "unknown recipe 'nope'"),
        ({"demoted_to": "rowwise"}, "'demoted_to' must be a dict"),
        (
            {"demoted_to": {"recipe": "rowwise", "recipe_config": {"name": "'rowwise'"}}},
            "other parameters",
        ),
        (
            {
                "demoted_to": {
                    "recipe": "tensorwise",
                    "recipe_config": Recipe.from_name("tensorwise").canonical(),
                }
            },
            "names the layer's own recipe",
        ),
        ({"histories": "delayed"}, "'histories' must hold one amax history for each of"),
    ],
)
def test_bad_demotions_in_a_recipe_state_are_refused(change: dict[str, Any], match: str) -> None:
    model = make_model()
    model.get_submodule("2").fp8_state.demote(ROWWISE)
    state = fp8train.recipe_state_dict(model)
    if change.get("histories") == "delayed":  # rowwise keeps no histories
        delayed = make_model("delayed")
        change = {"histories": fp8train.recipe_state_dict(delayed)["layers"]["2"]["histories"]}
    state["layers"]["2"].update(change)
    fresh = make_model()
    with pytest.raises(ValueError, match=match) as info:
        fp8train.load_recipe_state_dict(fresh, state)
    assert "layer '2'" in str(info.value)
    # Checked before anything changed: the model runs its own recipe still.
    assert fresh.get_submodule("2").fp8_state.recipe.name == "tensorwise"


@pytest.mark.parametrize(
    ("demote_to", "error", "match"),
    [
        ("rowwise", TypeError, "must be a sequence of recipes"),
        ((), ValueError, "demote_to is empty"),
        (("high", "rowwise"), ValueError, "must be the last rung"),
        (("bf16",), ValueError, "spelled 'high'"),
        (("nope",), ValueError, "unknown recipe 'nope'"),
        (("rowwise", "rowwise"), ValueError, "names recipe 'rowwise' twice"),
        (("tensorwise", "high"), ValueError, "is the recipe layer '0' was converted with"),
        ((replace(ROWWISE, fp8_wgrad=False),), ValueError, "is a variant"),
    ],
)
def test_bad_ladders_are_refused(demote_to: Any, error: type[Exception], match: str) -> None:
    model = make_model()
    with pytest.raises(error, match=match):
        Guard(model, _adam(model), policy="demote", demote_to=demote_to)


def test_a_ladder_needs_a_policy_that_demotes() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="ladder of policies 'demote' and 'rollback'"):
        Guard(model, _adam(model), policy="skip", demote_to=("rowwise",))


def test_a_rung_that_cannot_take_a_layer_is_refused() -> None:
    model = make_model()
    narrow = replace(ROWWISE, min_multiple=128)  # min_multiple is not numerics: same recipe
    with pytest.raises(ValueError, match=r"cannot run layer '0' of weight shape \(64, 32\)"):
        Guard(model, _adam(model), policy="demote", demote_to=(narrow,))
