"""The GEMM check and the guard's diagnosis: a fault injected into a known layer's
operand is named by layer, GEMM and operand (issue 32, item 1)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from guard_helpers import TH, Batches, Fault, make_model, train
from torch import nn

import fp8train
from fp8train.guard import GemmBaselines, Guard, GuardThresholds, agree
from fp8train.monitor import Monitor


def test_gemm_check_measures_every_gemm_of_every_layer() -> None:
    model = make_model()
    data = Batches()
    x, y = data.next()
    with Monitor(model, every=1, gemm_check=True) as mon:
        nn.functional.mse_loss(model(x), y).backward()
        errors = mon.gemm_errors()
        mon.step(0.0)
    names = [n for n, _ in fp8train.nn.fp8_layers(model)]
    assert set(errors) == {(n, g) for n in names for g in ("output", "grad_input", "grad_weight")}
    # E4M3 forward, E5M2 gradients: a few percent, never zero, far below the floor.
    for key, err in errors.items():
        assert 1e-4 < err < 0.15, (key, err)


def test_gemm_records_reach_the_health_log(tmp_path: Any) -> None:
    model = make_model()
    x, y = Batches().next()
    log = tmp_path / "health.jsonl"
    with Monitor(model, every=1, gemm_check=True, jsonl=log) as mon:
        nn.functional.mse_loss(model(x), y).backward()
        mon.step(0.0)
    from fp8train.lab.health import read_log

    roles = {r["role"] for r in read_log(log) if r["kind"] == "layer"}
    assert {"gemm.output", "gemm.grad_input", "gemm.grad_weight"} <= roles


@pytest.mark.parametrize(
    ("kind", "layer", "gemm", "operand"),
    [
        ("grad_output", "2", "grad_input", "grad_output"),
        ("nan", "2", "output", "input"),
        ("outlier", "0", "output", "input"),
    ],
)
@pytest.mark.parametrize("observed", [True, False], ids=["observed", "looked-again"])
def test_diagnosis_names_the_faulty_layer_gemm_and_operand(
    kind: str, layer: str, gemm: str, operand: str, observed: bool
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # observed: every step is observed; looked-again: none is, so the guard runs the
    # triggered step a second time, observed.
    guard = Guard(model, opt, thresholds=TH, policy="warn", every=1 if observed else 10**6, start=1)
    fault = Fault(model, layer, at=12, kind=kind)
    with guard:
        train(guard, Batches(), 14, fault.before)
    assert guard.diagnoses, "no trigger fired"
    d = guard.diagnoses[0]
    assert d.step == 12
    assert (d.layer, d.gemm, d.operand) == (layer, gemm, operand), d.message
    assert d.evidence["operands"][operand]["amax"] is not None
    if kind == "nan":
        assert "nonfinite" in d.triggers
    else:
        assert math.isfinite(d.evidence["rel_err"]) and d.evidence["rel_err"] > 0.5


def test_weight_outlier_is_named_in_the_output_gemm() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = Guard(model, opt, thresholds=TH, policy="warn", every=10**6, start=1)
    w = model.get_submodule("4").weight

    def before(step: int) -> None:
        if step == 12:
            with torch.no_grad():
                w[0, 0] = w.abs().max() * 1e6  # E4M3's tensorwise scale flushes the rest

    with guard:
        train(guard, Batches(), 13, before)
    d = guard.diagnoses[0]
    assert (d.step, d.layer, d.gemm, d.operand) == (12, "4", "output", "weight"), d.message
    assert d.evidence["operands"]["weight"]["underflow"] > 0.9


def test_gemm_error_leaving_its_baseline_triggers_alone() -> None:
    th = GuardThresholds(gemm_warmup=3, gemm_floor=0.15, gemm_cap=0.5)
    baselines = GemmBaselines(th)
    key = ("l", "output")
    for s in range(5):
        baselines.update(s, {key: 0.03 * (1 + 0.1 * (s % 2))})
    assert not baselines.out(key, 0.035)
    assert not baselines.out(key, 0.14)  # under the floor: never out
    assert baselines.out(key, 0.3)  # 10x its usual error
    assert baselines.out(key, math.nan)
    fresh = GemmBaselines(th)
    assert not fresh.out(key, 0.3) and fresh.out(key, 0.6)  # before warm-up: the cap
    with pytest.raises(ValueError, match="gemm_floor < gemm_cap"):
        GuardThresholds(gemm_floor=0.9)
    assert baselines.describe(key)["observations"] == 5


def test_diagnosis_reaches_the_health_log(tmp_path: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "health.jsonl"
    fault = Fault(model, "2", at=10, kind="nan")
    with Guard(model, opt, thresholds=TH, policy="warn", every=5, jsonl=log, start=1) as guard:
        train(guard, Batches(), 12, fault.before)
    from fp8train.lab.health import read_log

    records = read_log(log)
    diag = [r for r in records if r["kind"] == "diagnosis"]
    acts = [r for r in records if r["kind"] == "guard"]
    assert diag and diag[0]["layer"] == "2" and diag[0]["step"] == 10
    assert acts and acts[0]["action"] == "warn" and "layer '2'" in acts[0]["message"]


def test_ranks_agree_on_the_most_severe_action_and_earliest_culprit() -> None:
    """agree() through a fake two-rank group: the other rank's vector is maxed in."""
    other = torch.tensor([3, 5])

    def fake_reduce_max(t: torch.Tensor) -> torch.Tensor:
        return torch.maximum(t, other)

    assert agree([1, 2], fake_reduce_max) == [3, 5]
    assert agree([4, 7], fake_reduce_max) == [4, 7]
    assert agree([4, 7], None) == [4, 7]


def test_an_amax_jump_from_an_all_zero_window_is_reported_not_a_crash() -> None:
    """An operand all zero for a whole delayed window, then not: the jump's ratio is inf
    (the message divided by the zero window amax, a ZeroDivisionError mid-training)."""
    from fp8train.autograd import AmaxJumpWarning

    layer = fp8train.Fp8Linear(8, 4, recipe="delayed", kernels="eager")
    for _ in range(3):
        layer(torch.zeros(2, 8)).sum().backward()
    with pytest.warns(AmaxJumpWarning, match="inf times"):
        layer(torch.ones(2, 8)).sum().backward()
    jump = layer.fp8_state.amax_jumps[-1]
    assert (jump.role, jump.ratio) == ("input", math.inf)


def test_a_guard_can_share_the_callers_monitor(tmp_path: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "health.jsonl"
    monitor = Monitor(model, every=4, jsonl=log).attach()
    with pytest.raises(ValueError, match="with monitor= the guard writes"):
        Guard(model, opt, monitor=monitor, jsonl=tmp_path / "other.jsonl")
    guard = Guard(model, opt, thresholds=TH, policy="warn", monitor=monitor)
    fault = Fault(model, "2", at=10, kind="nan")
    train(guard, Batches(), 12, fault.before)
    guard.close()
    assert monitor.attached  # the caller's monitor stays open
    monitor.close()
    from fp8train.lab.health import read_log

    records = read_log(log)
    assert {"gemm.output", "gemm.grad_weight"} <= {r.get("role") for r in records}
    # "warn" stepped on NaN gradients: from step 11 on the first layer meets NaN weights.
    assert [r["layer"] for r in records if r["kind"] == "diagnosis"] == ["2", "0"]
    assert max(r["step"] for r in records if r["kind"] == "step") == 11
