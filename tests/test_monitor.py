"""The training-health monitor: statistics against hand-computed values, warnings that
name the culprit, the observation interval, the sinks, and untouched numerics."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train.autograd import NonFiniteWarning
from fp8train.formats import E4M3
from fp8train.monitor import (
    HealthWarning,
    Monitor,
    TensorBoardSink,
    Thresholds,
    operand_stats,
)
from fp8train.monitor.detectors import FractionDetector, ScaleChangeDetector
from fp8train.scaling import Granularity, ScaleSpec
from fp8train.testing import assert_bitwise_equal

# Tests that provoke warnings assert on them with pytest.warns or the returned records;
# the rest of the HealthWarnings they raise along the way are expected noise.
pytestmark = pytest.mark.filterwarnings("ignore::fp8train.monitor.HealthWarning")

E4M3_SCALE_1 = ScaleSpec(fmt=E4M3)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class ThreeLayer(nn.Module):
    """Three Linear layers with nested qualified names: encoder, blocks.0.fc, head."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Linear(d, d)
        self.blocks = nn.ModuleList([_Block(d)])
        self.head = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # type: ignore[no-any-return]


def _model(recipe: str = "tensorwise", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model: nn.Module = fp8train.convert(ThreeLayer(), recipe)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 32, generator=g), torch.randint(0, 16, (8,), generator=g)


def _train(
    model: nn.Module, steps: int, monitor: Monitor | None = None, *, autocast: bool = False
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for s in range(steps):
        x, y = _batch(s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()  # type: ignore[no-untyped-call]
        if monitor is not None:
            monitor.step(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _read(path: Path) -> list[dict[str, Any]]:
    def strict(name: str) -> float:
        raise ValueError(f"non-standard JSON constant {name} in the log")

    return [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------- statistics


def test_stats_hand_computed_underflow_overflow() -> None:
    # Scale 1 on E4M3 (max 448, smallest subnormal 2^-9, so 2^-10 and below flush):
    # 3 of 16 elements are at or beyond 448 (1000, -500, and 448 itself; 2 strictly
    # beyond) and 2 of the
    # 8 nonzero elements flush (2^-11, -2^-12); the 8 zeros count in neither numerator
    # and only in the overflow denominator.
    vals = [1000.0, -500.0, 448.0, 1.0, 2.0**-11, -(2.0**-12), 0.25, 3.0] + [0.0] * 8
    x = torch.tensor(vals).reshape(2, 8)
    q = fp8train.quantize(x, E4M3_SCALE_1, scale=torch.tensor(1.0))
    st = operand_stats(x, q)
    assert st.overflow == 3 / 16
    assert st.clipped_fraction == 2 / 16  # 448 itself is at max, not beyond
    assert st.underflow == 2 / 8
    assert st.amax == 1000.0
    assert (st.scale_min, st.scale_max) == (1.0, 1.0)
    assert (st.numel, st.nonzero, st.flushed, st.saturated) == (16, 8, 2, 3)


def test_stats_hand_computed_sqnr() -> None:
    # 1.0625 is a tie between E4M3's 1.0 and 1.125 and rounds to even (1.0): error
    # 2^-4, noise 2^-8. Every other value is exact in E4M3, and the squares sum to
    # 3.90625 = 1000 * 2^-8, so the SQNR is exactly 10 log10(1000) = 30 dB.
    x = torch.tensor([[1.0625, 1.5, 0.5, 0.5, 0.125, 0.0625, 0.0625, 0.0625]])
    q = fp8train.quantize(x, E4M3_SCALE_1, scale=torch.tensor(1.0))
    st = operand_stats(x, q)
    assert st.signal == 3.90625 and st.noise == 2.0**-8
    assert st.sqnr_db == pytest.approx(30.0, abs=1e-12)
    assert st.underflow == 0.0 and st.overflow == 0.0

    exact = x.clone()
    exact[0, 0] = 1.0
    st_exact = operand_stats(exact, fp8train.quantize(exact, E4M3_SCALE_1, scale=torch.tensor(1.0)))
    assert st_exact.sqnr_db == math.inf


def test_stats_match_bf16_input_and_block_scales() -> None:
    # A bf16 operand and a block scale grid give the same counts as a direct check.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 256, generator=g) * torch.logspace(-12, 2, 256)).bfloat16()
    spec = ScaleSpec(fmt=E4M3, granularity=Granularity.BLOCK, block=(1, 128))
    q = fp8train.quantize(x, spec)
    st = operand_stats(x, q)
    flushed = int(((x != 0) & (q.data.float() == 0)).sum())
    assert st.flushed == flushed and st.flushed > 0
    assert st.nonzero == int((x != 0).sum())
    deq = q.dequantize(torch.float32).double()
    noise = float(((x.double() - deq) ** 2).sum())
    assert st.noise == pytest.approx(noise, rel=1e-12)
    # Without power-of-two rounding each block's amax element lands on (or within an
    # fp32 rounding of) 448, and "at or beyond max" counts it: about one per block.
    scaled = x.float() * q.scale.repeat_interleave(128, dim=1)
    assert st.saturated == int((scaled.abs() >= 448).sum())
    assert st.clipped == int((scaled.abs() > 464).sum()) == 0  # 464 rounds past 448
    assert 0 < st.saturated <= q.scale.numel()


def test_current_int8_scale_clips_nothing() -> None:
    # 127 / amax in fp32 can put amax a rounding error above 127: "at or beyond max"
    # counts it, "clipped" (would round past 127) does not.
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        x = torch.randn(4, 64, generator=g) * 3.0
        st = operand_stats(x, fp8train.quantize(x, ScaleSpec(fmt=fp8train.INT8)))
        assert st.clipped == 0 and st.saturated <= 1


def test_stats_nonfinite_operand() -> None:
    x = torch.tensor([[1.0, math.nan]])
    st = operand_stats(x, None)
    assert st.nonfinite_calls == 1 and st.calls == 1
    assert st.as_record()["sqnr_db"] is None


def test_layer_records_delayed_staleness_and_fractions(tmp_path: Path) -> None:
    # Delayed scaling: step 0's input has amax 1, so step 1 quantises with the scale of
    # amax 1 (pow2 floor of 448/1 = 256) while its own amax is 4: staleness 4. At scale
    # 256, |x| >= 1.75 saturates (3 of 16) and |x| <= 2^-18 flushes (2 of 8 nonzero).
    model = fp8train.convert(nn.Sequential(nn.Linear(16, 16, bias=False)), "delayed")
    x0 = torch.zeros(1, 16)
    x0[0, 0] = 1.0
    x1 = torch.tensor([[4.0, -2.0, 1.75, 1.0, 2.0**-19, -(2.0**-20), 0.5, 0.25] + [0.0] * 8])
    log = tmp_path / "m.jsonl"
    with Monitor(model, every=1, jsonl=log) as mon:
        for x in (x0, x1):
            model(x).sum().backward()
            mon.step(1.0)
    rec = {(r["step"], r["layer"], r["role"]): r for r in _read(log) if r["kind"] == "layer"}
    r0, r1 = rec[(0, "0", "input")], rec[(1, "0", "input")]
    assert r0["staleness"] == 1.0 and r0["scale_max"] == 256.0
    assert r1["amax"] == 4.0 and r1["scale_min"] == r1["scale_max"] == 256.0
    assert r1["staleness"] == 4.0
    assert r1["overflow"] == 3 / 16  # 4, -2 and 1.75 (exactly at 448)
    assert r1["clipped"] == 2 / 16
    assert r1["underflow"] == 2 / 8
    assert r1["fmt"] == "e4m3" and r1["calls"] == 1
    assert {r for (_, _, r) in rec} == {"input", "weight", "grad_output"}


# --------------------------------------------------------------------------- warnings


def test_loss_spike_warning_names_suspect_operand(tmp_path: Path) -> None:
    model = _model()
    head = model.get_submodule("head")
    spike_step = 9
    log = tmp_path / "m.jsonl"
    boost = {"on": False}

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        return (args[0] * 200.0,) if boost["on"] else args

    head.register_forward_pre_hook(pre_hook)
    with Monitor(model, every=1, jsonl=log, thresholds=Thresholds(loss_min_history=4)) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for s in range(spike_step + 1):
            boost["on"] = s == spike_step
            x, y = _batch(s)
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            if s == spike_step:
                with pytest.warns(HealthWarning, match=f"step {spike_step}.*loss"):
                    raised = mon.step(loss)
            else:
                assert mon.step(loss) == []
            opt.step()
            opt.zero_grad(set_to_none=True)
    spikes = [w for w in raised if w["type"] == "loss_spike"]
    assert len(spikes) == 1
    assert spikes[0]["step"] == spike_step
    assert (spikes[0]["layer"], spikes[0]["operand"]) == ("head", "input")
    assert "head" in spikes[0]["message"]
    logged = [r for r in _read(log) if r["kind"] == "warning"]
    assert [r["type"] for r in logged] == [w["type"] for w in raised]


def test_loss_spike_edge_triggered_and_threshold() -> None:
    mon = Monitor(
        nn.Linear(4, 4),
        every=10**6,
        start=1,
        thresholds=Thresholds(loss_spike_factor=2.0, loss_min_history=3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing below may warn
        for loss in (1.0, 1.0, 1.0, 1.9, 1.0):
            assert mon.step(loss) == []
    with pytest.warns(HealthWarning):
        assert [w["type"] for w in mon.step(2.5)] == ["loss_spike"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.step(2.6) == []  # still spiking: no repeat
    assert mon.step(1.0) == []  # re-armed
    with pytest.warns(HealthWarning):
        assert len(mon.step(3.0)) == 1


@pytest.mark.parametrize("every", [1, 1000])
def test_nan_warning_names_the_layer_it_entered(every: int, tmp_path: Path) -> None:
    # NaN enters blocks.0.fc's input; the head's input and every layer's grad_output
    # see it downstream. The warning must name blocks.0.fc / input, on observed and on
    # off-interval steps alike (the latter from the layers' non-finite counters).
    model = _model()
    fc = model.get_submodule("blocks.0.fc")
    bad_step = 3
    inject = {"on": False}

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        if not inject["on"]:
            return args
        x = args[0].clone()
        x[0, 0] = math.nan
        return (x,)

    fc.register_forward_pre_hook(pre_hook)
    log = tmp_path / "m.jsonl"
    mon = Monitor(model, every=every, start=1, jsonl=log)
    mon.attach()
    for s in range(1, bad_step + 2):
        inject["on"] = s == bad_step
        x, y = _batch(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
        if s == bad_step:
            with pytest.warns(HealthWarning, match="'blocks.0.fc' operand 'input'"):
                raised = mon.step(loss)
        else:
            assert mon.step(loss) == []
        model.zero_grad(set_to_none=True)
        if s == bad_step and every == 1000:
            assert mon.observing  # an event on an off step makes the next step observed
    mon.close()
    nonfinite = [w for w in raised if w["type"] == "nonfinite"]
    first = nonfinite[0]
    assert (first["step"], first["layer"], first["operand"]) == (bad_step, "blocks.0.fc", "input")
    downstream = {(a["layer"], a["operand"]) for a in first["affected"]}
    assert ("head", "input") in downstream and ("encoder", "grad_output") in downstream
    assert ("encoder", "input") not in downstream
    assert any(w["operand"] == "loss" for w in nonfinite)  # the loss is NaN too
    assert any(r["kind"] == "warning" and r["layer"] == "blocks.0.fc" for r in _read(log))


def test_underflow_and_scale_warnings_name_layer_and_operand() -> None:
    # The input decays 2^-12 at step 4: its scale rises 2^12 against the running
    # median (scale_explode). At step 6 one outlier of 2^12 sits among values of about
    # 2^-30: the scale falls 2^10 (scale_collapse) and the rest flush (underflow).
    model = fp8train.convert(nn.Sequential(nn.Linear(16, 16)), "tensorwise")
    mon = Monitor(model, every=1)
    mon.attach()
    g = torch.Generator().manual_seed(0)
    raised: list[dict[str, Any]] = []
    for s in range(7):
        x = torch.randn(4, 16, generator=g)
        if s == 4:
            x = x * 2.0**-12
        if s == 6:
            x = x * 2.0**-30
            x[0, 0] = 2.0**12
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HealthWarning)
            model(x).sum().backward()
            raised += mon.step(1.0)
    mon.close()
    kinds = {(w["step"], w["type"], w["layer"], w["operand"]) for w in raised}
    assert (4, "scale_explode", "0", "input") in kinds
    assert (6, "scale_collapse", "0", "input") in kinds
    assert (6, "underflow", "0", "input") in kinds
    assert all(
        w["message"].startswith(f"fp8train monitor: step {w['step']}: layer '0'") for w in raised
    )


# --------------------------------------------------------------------- interval, hooks


def test_off_interval_steps_record_nothing_and_install_nothing(tmp_path: Path) -> None:
    model = _model()
    log = tmp_path / "m.jsonl"
    layers = list(fp8train.nn.fp8_layers(model))
    with Monitor(model, every=3, jsonl=log) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(7):
            on = s % 3 == 0
            assert mon.observing == on
            assert all((m.fp8_state.observer is not None) == on for _, m in layers)
            assert all(not m._forward_pre_hooks for _, m in layers) or on
            x, y = _batch(s)
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            mon.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    records = _read(log)
    assert {r["step"] for r in records} == {0, 3, 6}
    per_step = [r for r in records if r["kind"] == "layer" and r["step"] == 3]
    assert len(per_step) == 3 * 3  # three layers x input, weight, grad_output
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 3, 6]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in steps)
    assert all(m.fp8_state.observer is None and not m._forward_pre_hooks for _, m in layers)


class ListSink:
    """A custom sink: keeps the records in a list."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def test_grad_norm_computed_from_params_when_not_given() -> None:
    model = _model()
    sink = ListSink()
    with Monitor(model, every=1, sinks=[sink]) as mon:
        x, y = _batch(0)
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        expected = float(nn.utils.get_total_norm(grads))
        mon.step(loss, loss_scale=8.0, skipped=True)
    assert sink.closed
    (step,) = [r for r in sink.records if r["kind"] == "step"]
    assert step["grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert step["loss"] == loss.item()
    assert (step["loss_scale"], step["skipped"], step["skipped_total"]) == (8.0, True, 1)


def test_eval_forward_under_no_grad_is_not_recorded() -> None:
    model = _model()
    mon = Monitor(model, every=1).attach()
    x, y = _batch(0)
    with torch.no_grad():
        model(x * 1000.0)  # an evaluation pass inside an observed step
    F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
    mon.step(1.0)
    mon.close()
    rec = mon.latest[("encoder", "input")]
    assert rec["calls"] == 1
    assert rec["amax"] == float(x.abs().max())


def test_two_monitors_cannot_share_a_layer() -> None:
    model = _model()
    with Monitor(model, every=1), pytest.raises(ValueError, match="already has an observer"):
        Monitor(model, every=1).attach()
    assert all(m.fp8_state.observer is None for _, m in fp8train.nn.fp8_layers(model))


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="every"):
        Monitor(nn.Linear(2, 2), every=0)
    with pytest.raises(ValueError, match="shadow_every"):
        Monitor(nn.Linear(2, 2), shadow_every=0)
    with pytest.raises(ValueError, match="loss_spike_factor"):
        Thresholds(loss_spike_factor=1.0)


def test_layer_detectors_work_alone_on_records() -> None:
    # The detectors need no model: they read layer records and keep their own state.
    th = Thresholds(scale_min_history=2)
    fractions, scales = FractionDetector(th), ScaleChangeDetector(th)

    def rec(underflow: float, scale: float) -> dict[str, Any]:
        return {
            "layer": "fc",
            "role": "input",
            "fmt": "e4m3",
            "amax": 1.0,
            "underflow": underflow,
            "clipped": 0.0,
            "scale_min": scale,
            "scale_max": scale,
            "staleness": None,
        }

    steps = [(0.0, 1.0), (0.0, 1.0), (0.5, 2.0**10), (0.5, 2.0**10), (0.0, 1.0), (0.5, 1.0)]
    kinds = []
    for s, (u, scale) in enumerate(steps):
        kinds += [(s, w["type"]) for w in fractions.check(s, rec(u, scale))]
        kinds += [(s, w["type"]) for w in scales.check(s, rec(u, scale))]
    # Edge triggered: no repeat at step 3, re-armed at step 4, fires again at step 5.
    assert kinds == [(2, "underflow"), (2, "scale_explode"), (5, "underflow")]
    assert fractions.check(6, {"role": "output", "bf16_rel_err": 0.1}) == []


def test_bf16_shadow_check_records_relative_error(tmp_path: Path) -> None:
    model = _model()
    log = tmp_path / "m.jsonl"
    with Monitor(model, every=100, shadow_every=2, jsonl=log) as mon:
        _train(model, 3, mon, autocast=True)
    shadow = [r for r in _read(log) if r.get("role") == "output"]
    assert sorted({r["step"] for r in shadow}) == [0, 2]
    assert {r["layer"] for r in shadow} == {"encoder", "blocks.0.fc", "head"}
    # E4M3 operands: a few percent relative error against bf16, not zero, not large.
    assert all(0.0 < r["bf16_rel_err"] < 0.15 for r in shadow)


# ------------------------------------------------------------------------------ sinks


def test_jsonl_lines_parse_and_carry_the_schema(tmp_path: Path) -> None:
    model = _model("rowwise")  # rowwise adds the re-quantised ".t" roles
    log = tmp_path / "sub" / "m.jsonl"
    with Monitor(model, every=2, jsonl=log) as mon:
        _train(model, 3, mon)
    records = _read(log)
    assert records and all({"step", "kind"} <= set(r) for r in records)
    assert {r["kind"] for r in records} == {"layer", "step"}
    roles = {r["role"] for r in records if r["kind"] == "layer"}
    assert {"input", "weight", "grad_output"} <= roles and any(r.endswith(".t") for r in roles)
    for r in records:
        if r["kind"] == "layer":
            assert {
                "layer",
                "role",
                "amax",
                "scale_min",
                "scale_max",
                "underflow",
                "overflow",
                "sqnr_db",
                "staleness",
                "fmt",
            } <= set(r)
            assert isinstance(float(r["sqnr_db"]), float)  # "inf" strings read back


def test_tensorboard_sink_skipped_cleanly_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(TensorBoardSink, "available", staticmethod(lambda: False))
    model = _model()
    with (
        caplog.at_level(logging.INFO, logger="fp8train"),
        Monitor(model, every=1, jsonl=tmp_path / "m.jsonl", tensorboard=tmp_path / "tb") as mon,
    ):
        _train(model, 1, mon)
    assert "tensorboard is not installed" in caplog.text
    assert not (tmp_path / "tb").exists()
    assert _read(tmp_path / "m.jsonl")


def test_tensorboard_sink_writes_events_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    model = _model()
    with Monitor(model, every=1, tensorboard=tmp_path / "tb") as mon:
        _train(model, 2, mon)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_monitor_does_not_change_training_numerics(recipe: str) -> None:
    plain = _model(recipe)
    watched = _model(recipe)
    base = _train(plain, 4, autocast=True)
    with Monitor(watched, every=1, shadow_every=1) as mon:
        seen = _train(watched, 4, mon, autocast=True)
    assert base == seen  # bitwise: Python floats compare exactly
    for (name, p), (_, q) in zip(
        plain.named_parameters(), watched.named_parameters(), strict=False
    ):
        assert_bitwise_equal(p.detach(), q.detach(), name)
    assert fp8train.recipe_state_dict(plain).keys() == fp8train.recipe_state_dict(watched).keys()


def test_stats_reuse_the_gemm_operand_bit_for_bit() -> None:
    # A cast that also produced the GEMM operand (fp32, or bf16 with power-of-two
    # scales) gives the same statistics as one that did not.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 64, generator=g) * torch.logspace(-14, 1, 64)
    for pow2, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        q = fp8train.quantize(x, ScaleSpec(fmt=E4M3, power_of_two=pow2))
        with_operand = dataclasses.replace(q, operand=q.dequantize(dtype))
        assert operand_stats(x, with_operand) == operand_stats(x, q)
        assert operand_stats(x, q).flushed > 0


# --------------------------------------------------- the lab's health report reads the log


def test_health_report_reads_a_monitor_log(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fp8train.lab import health

    model = _model("delayed")
    log = tmp_path / "m.jsonl"
    with Monitor(model, every=2, shadow_every=2, jsonl=log) as mon:
        _train(model, 5, mon)
        model.get_submodule("head").register_forward_pre_hook(lambda m, a: (a[0] * math.nan,))
        x, y = _batch(9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            mon.step(1.0)
    records = health.read_log(log)
    assert all(
        isinstance(r.get("sqnr_db", 0.0), float) or r.get("sqnr_db") is None for r in records
    )
    md = health.write_health(log, tmp_path / "report")
    png = tmp_path / "report" / health.HEATMAP
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert md.startswith("## Health") and f"]({health.HEATMAP})" in md
    for name in ("encoder", "blocks.0.fc", "head"):
        assert f"| `{name}` | grad_output | e5m2 |" in md
    assert "staleness" in md  # delayed scaling
    assert "BF16 shadow check" in md
    assert "nonfinite, `head` input" in md  # the warning names the layer and operand
