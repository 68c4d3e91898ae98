"""A one-step outlier under delayed scaling (fp8train/autograd.py): an amax jump beyond
what the format's range holds alongside the history window warns once
(:class:`~fp8train.autograd.AmaxJumpWarning`, naming layer, operand and values) and
the monitor records it (``amax_jump``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from fp8train import E4M3, E5M2, Fp8Linear
from fp8train.autograd import AmaxJumpWarning, amax_jump_limit
from fp8train.monitor import HealthWarning, Monitor

D = 64
OUTLIER_STEP = 5


def _layer(name: str = "fc") -> Fp8Linear:
    g = torch.Generator().manual_seed(2)
    layer = Fp8Linear(D, D, recipe="delayed", name=name, kernels="eager")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(D, D, generator=g) / math.sqrt(D))
    return layer


def _inputs(steps: int, outlier: float | None) -> list[torch.Tensor]:
    """Inputs growing 1.5x per step (ordinary drift must not warn); with ``outlier``,
    one entry of step OUTLIER_STEP's batch is that value."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(8, D, generator=g) * 1.5**s for s in range(steps)]
    if outlier is not None:
        xs[OUTLIER_STEP][3, 7] = outlier
    return xs


def _train(layer: Fp8Linear, xs: list[torch.Tensor], mon: Monitor | None = None) -> None:
    for x in xs:
        layer.zero_grad()
        # The mean: its gradient does not depend on the output, so only the input jumps.
        layer(x).mean().backward()
        if mon is not None:
            mon.step()


def test_jump_limit_is_the_formats_dynamic_range() -> None:
    assert amax_jump_limit(E4M3) == 448 * 2**9  # max over the smallest subnormal 2^-9
    assert amax_jump_limit(E5M2) == 57344 * 2**16
    assert math.log2(amax_jump_limit(E4M3)) == pytest.approx(E4M3.binades)


def test_ordinary_training_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmaxJumpWarning)
        _train(_layer(), _inputs(20, None))


def test_a_one_step_outlier_warns_once_naming_layer_operand_and_values() -> None:
    layer = _layer("blocks.0.fc")
    xs = _inputs(20, 1e30)
    with pytest.warns(AmaxJumpWarning) as caught:
        _train(layer, xs)
    jumps = [w for w in caught if issubclass(w.category, AmaxJumpWarning)]
    assert len(jumps) == 1, [str(w.message) for w in jumps]
    msg = str(jumps[0].message)
    assert "'blocks.0.fc'" in msg and "input" in msg and "1e+30" in msg
    assert f"history step {OUTLIER_STEP}" in msg
    state = layer.fp8_state
    assert state.amax_jump_count == 1
    (event,) = state.amax_jumps
    assert (event.role, event.history_step) == ("input", OUTLIER_STEP)
    assert event.amax == float(torch.tensor(1e30))  # as the fp32 amax holds it
    assert event.window_amax == max(float(x.abs().max()) for x in xs[:OUTLIER_STEP])


def test_a_jump_just_inside_the_limit_does_not_warn() -> None:
    layer = _layer()
    xs = _inputs(OUTLIER_STEP + 1, None)
    window = max(float(x.abs().max()) for x in xs[:OUTLIER_STEP])
    xs[OUTLIER_STEP][3, 7] = window * amax_jump_limit(E4M3) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmaxJumpWarning)
        _train(layer, xs)


def test_the_monitor_records_the_jump(tmp_path: Path) -> None:
    layer = _layer()
    model = torch.nn.Sequential(layer)  # the monitor names it by its qualified name, "0"
    log = tmp_path / "m.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # every=4: the outlier step is not an observed one; the event is seen anyway.
        with Monitor(model, every=4, jsonl=log) as mon:
            _train(layer, _inputs(12, 1e30), mon)
    health = [w for w in caught if issubclass(w.category, HealthWarning)]
    jump_msgs = [str(w.message) for w in health if "history window" in str(w.message)]
    assert len(jump_msgs) == 1
    assert f"step {OUTLIER_STEP}" in jump_msgs[0] and "layer '0'" in jump_msgs[0]
    assert "'input'" in jump_msgs[0]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    jumps = [r for r in records if r["kind"] == "warning" and r["type"] == "amax_jump"]
    assert len(jumps) == 1
    (rec,) = jumps
    assert (rec["step"], rec["layer"], rec["operand"]) == (OUTLIER_STEP, "0", "input")
    assert rec["amax"] == float(torch.tensor(1e30)) and rec["history_step"] == OUTLIER_STEP
    assert [w for w in mon.warnings if w["type"] == "amax_jump"] == jumps
