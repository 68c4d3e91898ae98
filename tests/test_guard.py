"""fp8train.Guard's policies (issue 32, item 2): warn, skip, demote and rollback, the
last bit for bit against a run that had the culprit in high precision from the
snapshot on; the demoted layer in the recipe state."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from guard_helpers import TH, Batches, Fault, make_model, train
from torch import nn

import fp8train
from fp8train.guard import Guard
from fp8train.monitor import HealthWarning
from fp8train.testing import assert_bitwise_equal

pytestmark = [
    pytest.mark.filterwarnings("ignore::fp8train.autograd.NonFiniteWarning"),
    pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning"),
]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_arguments_are_checked() -> None:
    model = make_model()
    opt = _adam(model)
    with pytest.raises(ValueError, match="policy must be one of"):
        Guard(model, opt, thresholds=TH, policy="panic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="snapshot_every"):
        Guard(model, opt, thresholds=TH, policy="rollback", data=Batches())
    with pytest.raises(ValueError, match="data="):
        Guard(model, opt, thresholds=TH, policy="rollback", snapshot_every=4)
    with pytest.raises(ValueError, match="snapshot_every is for policy 'rollback'"):
        Guard(model, opt, thresholds=TH, policy="skip", snapshot_every=4)


def test_a_healthy_run_takes_no_action() -> None:
    model = make_model()
    with Guard(
        model,
        _adam(model),
        thresholds=TH,
        policy="rollback",
        snapshot_every=4,
        data=Batches(),
        every=2,
    ) as g:
        losses = train(g, g.data, 20)  # type: ignore[arg-type]
    assert g.events == [] and g.diagnoses == [] and g.demoted == []
    assert len(losses) == 20


def test_warn_logs_and_steps_on() -> None:
    model = make_model()
    guard = Guard(model, _adam(model), thresholds=TH, policy="warn", every=10**6, start=1)
    fault = Fault(model, "2", at=12, kind="grad_output")
    before: dict[str, torch.Tensor] = {}

    def snap(step: int) -> None:
        fault.before(step)
        if step == 12:
            before.update(_params(model))

    with guard:
        train(guard, Batches(), 13, snap)
    assert [e["action"] for e in guard.events] == ["warn"]
    assert guard.events[0]["layer"] == "2" and "grad_input" in guard.events[0]["reason"]
    assert not torch.equal(before["2.weight"], model.get_submodule("2").weight)  # it stepped
    assert guard.demoted == []


@pytest.mark.slow  # about 10 s: delayed scaling's kernels compile on first use
def test_skip_drops_the_batch_and_its_history_records() -> None:
    """Delayed scaling: an outlier batch would enter the amax history and flush the next
    batches to zero; skip leaves the weights and every history as they were."""
    model = make_model("delayed")
    guard = Guard(model, _adam(model), thresholds=TH, policy="skip", every=10**6, start=1)
    fault = Fault(model, "0", at=12, kind="outlier")
    seen: dict[str, Any] = {}

    def before(step: int) -> None:
        fault.before(step)
        if step == 12:
            seen["params"] = _params(model)
            seen["recipe"] = copy.deepcopy(fp8train.recipe_state_dict(model))

    with guard:
        train(guard, Batches(), 13, before)
    assert [e["action"] for e in guard.events] == ["skip"]
    assert "amax_jump" in guard.events[0]["triggers"]
    for k, v in _params(model).items():
        assert_bitwise_equal(v, seen["params"][k])
    after = fp8train.recipe_state_dict(model)
    for name, entry in seen["recipe"]["layers"].items():
        for role, h in entry["histories"].items():
            now = after["layers"][name]["histories"][role]
            assert now["count"] == h["count"], (name, role)
            assert_bitwise_equal(now["window"], h["window"])


def test_demote_moves_the_culprit_to_high_precision_and_keeps_it_in_the_recipe_state() -> None:
    model = make_model()
    guard = Guard(model, _adam(model), thresholds=TH, policy="demote", every=10**6, start=1)
    fault = Fault(model, "2", at=12, kind="grad_output")
    with guard:
        train(guard, Batches(), 16, fault.before)
    assert [(e["action"], e["layer"]) for e in guard.events] == [("demote", "2")]
    assert guard.demoted == ["2"]
    state = fp8train.recipe_state_dict(model)
    assert state["layers"]["2"]["high_precision"] is True
    assert "high_precision" not in state["layers"]["0"]
    # A checkpoint keeps it: a fresh model loads the flag back.
    fresh = make_model()
    fp8train.load_recipe_state_dict(fresh, copy.deepcopy(state))
    assert fresh.get_submodule("2").fp8_state.high_precision
    assert not fresh.get_submodule("0").fp8_state.high_precision
    # ... and migrating to another recipe keeps the layer demoted.
    rowwise = make_model("rowwise")
    fp8train.load_recipe_state_dict(rowwise, copy.deepcopy(state), migrate=True)
    assert rowwise.get_submodule("2").fp8_state.high_precision
    # A demoted layer is nn.Linear under the same autocast: no quantisation at all.
    layer = model.get_submodule("2")
    x = torch.randn(4, 64)
    ref = nn.functional.linear(x, layer.weight, layer.bias)
    assert_bitwise_equal(layer(x), ref)
    bad = copy.deepcopy(state)
    bad["layers"]["2"]["high_precision"] = "yes"
    with pytest.raises(ValueError, match="'high_precision' must be a bool"):
        fp8train.load_recipe_state_dict(fresh, bad)


@pytest.mark.parametrize("every", [3, 10**6], ids=["observed", "looked-again"])
def test_rollback_replays_bit_for_bit_like_a_run_with_the_culprit_in_high_precision(
    every: int,
) -> None:
    """Run A: guarded (rollback, snapshot every 4 steps), a fault hits layer "2" at step
    10 while it runs in FP8 (a fault high precision does not suffer, so the replay does
    not meet it). Run B: unguarded, same seeds and data, layer "2" in high precision
    from step 8 (the snapshot) on. Every weight and optimizer state agrees bit for bit."""
    steps, at, snapshot = 16, 10, 8

    model_a = make_model()
    opt_a = _adam(model_a)
    data_a = Batches()
    guard = Guard(
        model_a,
        opt_a,
        thresholds=TH,
        policy="rollback",
        snapshot_every=4,
        data=data_a,
        every=every,
        start=0,
    )
    fault = Fault(model_a, "2", at=at, kind="grad_output")
    with guard:
        train(guard, data_a, steps, fault.before)
    assert [(e["action"], e["layer"], e.get("to_step")) for e in guard.events] == [
        ("rollback", "2", snapshot)
    ]
    assert guard.diagnoses[0].gemm == "grad_input"

    model_b = make_model()
    opt_b = _adam(model_b)
    data_b = Batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        for step in range(steps):
            if step == snapshot:
                model_b.get_submodule("2").fp8_state.high_precision = True
            x, y = data_b.next()
            nn.functional.mse_loss(model_b(x), y).backward()
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)

    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert_bitwise_equal(a, b), k
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in state_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_bitwise_equal(state_a[i][key], state_b[i][key])
    assert fp8train.recipe_state_dict(model_a) == fp8train.recipe_state_dict(model_b)


def test_rollback_with_a_loss_scaler_and_clipping() -> None:
    model = make_model()
    opt = _adam(model)
    scaler = fp8train.LossScaler(mode="dynamic", init_scale=2.0**8)
    data = Batches()
    guard = Guard(
        model,
        opt,
        thresholds=TH,
        policy="rollback",
        snapshot_every=4,
        data=data,
        scaler=scaler,
        max_grad_norm=1.0,
        every=10**6,
        start=1,
    )
    fault = Fault(model, "2", at=12, kind="grad_output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        while guard.step_count < 15:
            fault.before(guard.step_count)
            x, y = data.next()

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = nn.functional.mse_loss(model(x), y)
                scaler.scale(loss).backward()
                return loss

            guard.step(closure)
    guard.close()
    # The first snapshot falls on step 4 (start=1): the rollback goes back to step 12's.
    assert [(e["action"], e.get("to_step")) for e in guard.events] == [("rollback", 12)]
    assert guard.demoted == ["2"]


def test_state_dict_round_trip_and_malformed_states_are_refused() -> None:
    """What the triggers learnt (windows, GEMM baselines, amax evidence) survives a
    round trip through torch.save (weights_only); a state of another step, or a
    malformed one, is refused before the guard changes."""
    import io

    model = make_model()
    with Guard(model, _adam(model), thresholds=TH, policy="demote", every=2) as g:
        train(g, Batches(), 12)
    state = g.state_dict()
    assert state["step_count"] == 12
    assert len(state["scalars"]["losses"]) == 12 and state["baselines"] and state["evidence"]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    with Guard(model, _adam(model), thresholds=TH, policy="demote", every=2, start=12) as h:
        h.load_state_dict(loaded)
        assert h.state_dict() == state
        for layer, gemm, *_ in state["baselines"]:  # the evidence a diagnosis quotes
            assert g._baselines.describe((layer, gemm)) == h._baselines.describe((layer, gemm))
        before = h.state_dict()
        bad = [
            ({**state, "step_count": 11}, "of step 11, this guard is at step 12"),
            ({**state, "format": 99}, "format 1"),
            ({**state, "scalars": {"losses": [1.0, float("nan")], "norms": []}}, "losses"),
            ({**state, "scalars": None}, "losses window is malformed"),
            ({**state, "baselines": [["0", "output", 3]]}, "GEMM baseline 0 is malformed"),
            ({**state, "baselines": {"a": 1}}, "GEMM baselines are malformed"),
            ({**state, "evidence": [["0", "input", [[1, 2.0]]]]}, "amax evidence"),
        ]
        for wrong, fragment in bad:
            with pytest.raises(ValueError, match=fragment):
                h.load_state_dict(wrong)
            assert h.state_dict() == before, fragment
