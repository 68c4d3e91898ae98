"""plan_model: the walk, the step estimate, calibration, recommendations and the filter."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fp8train
from fp8train.nn import Fp8Linear
from fp8train.planner import build, get_gpu, plan_model
from fp8train.planner.advice import Numerics, OperandNumerics, recommend
from fp8train.planner.walk import NON_GEMM_FRACTION, LayerRow


class _Twice(nn.Module):
    """One Linear called twice per forward, one called once, on 3-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(64, 64)
        self.out = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.shared(self.shared(x)))
        return out


def test_walk_counts_real_tokens_and_calls() -> None:
    x = torch.randn(3, 5, 64)  # 15 tokens
    plan = plan_model(_Twice(), x, gpu="h100", recipe="tensorwise", non_gemm_fraction=0.5)
    shared, out = plan.rows
    assert (shared.name, shared.m, shared.k, shared.n, shared.calls) == ("shared", 30, 64, 64, 2)
    assert (out.name, out.m, out.k, out.n, out.calls) == ("out", 15, 64, 32, 1)
    assert shared.saved_act_bf16 == 2 * 30 * 64 and shared.saved_act_fp8 == 30 * 64
    assert shared.ag_bytes_saved == 0  # no FSDP
    # small layers lose on an H100: every one is advised to stay bf16, and says why
    assert all(r.recommendation == "bf16" for r in plan.rows)
    assert shared.reason == f"too small: predicted {shared.speedup:.2f}x"
    assert plan.selected == [] and plan.step.speedup == 1.0
    assert plan.step_all.speedup < 1.0
    # a fraction of 0.5: the rest of the step equals the Linear GEMMs
    assert plan.step.non_gemm_ms == pytest.approx(plan.step.linear_bf16_ms)


def test_step_estimate_sources_and_fsdp_bytes() -> None:
    model = build("qwen2.5-0.5b")  # meta: shapes only
    ids = torch.zeros((2, 4096), dtype=torch.long, device="meta")
    plan = plan_model(model, ids, gpu="h100", recipe="tensorwise", world_size=4, fsdp=True)
    assert plan.step.non_gemm_source == f"fraction {NON_GEMM_FRACTION:.2f}"
    q = plan.row("model.layers.0.self_attn.q_proj")
    assert (q.m, q.k, q.n) == (8192, 896, 896)
    # two gathers a step, (world - 1) / world of the weight each, one byte saved each
    assert q.ag_bytes_saved == 2 * 896 * 896 * 3 // 4
    assert len(plan.rows) == 24 * 7 + 1
    # rowwise weights cannot be gathered in FP8
    rowwise = plan_model(model, ids, gpu="h100", recipe="rowwise", world_size=4, fsdp=True)
    assert all(r.ag_bytes_saved == 0 for r in rowwise.rows)
    # a measured bf16 step fixes the non-GEMM time; exposed comm adds the all-gather saving
    measured = plan_model(
        model,
        ids,
        gpu="h100",
        recipe="tensorwise",
        world_size=4,
        fsdp=True,
        bf16_step_ms=400.0,
        exposed_comm=1.0,
    )
    assert measured.step.bf16_ms == pytest.approx(400.0)
    assert measured.step.ag_saved_ms > 0
    with pytest.raises(ValueError, match="less than the predicted bf16 Linear GEMMs"):
        plan_model(model, ids, gpu="h100", recipe="tensorwise", bf16_step_ms=1.0)


def test_the_cpu_profile_gives_a_positive_non_gemm_time() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))
    plan = plan_model(model, torch.randn(256, 32), gpu="l40s", recipe="tensorwise")
    assert plan.step.non_gemm_source == "CPU profile scaled by bandwidth"
    assert plan.step.non_gemm_ms > 0


def test_the_filter_keeps_layers_out() -> None:
    model = build("llama3.2-1b")
    ids = torch.zeros((1, 8192), dtype=torch.long, device="meta")
    plan = plan_model(model, ids, gpu="h100", recipe="tensorwise", filter=lambda _m, n: "mlp" in n)
    kept = [r for r in plan.rows if r.recommendation == "fp8"]
    assert kept and all("mlp" in r.name for r in kept)
    assert plan.row("lm_head").reason == "not converted: excluded by the filter"
    assert plan.step.speedup < plan.step_all.speedup or plan.step_all == plan.step


def _row(recipe: str = "tensorwise", gpu: str = "h100") -> LayerRow:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096))
    plan = plan_model(
        model,
        torch.zeros((8192, 4096), device="meta"),
        gpu=gpu,
        recipe=recipe,
    )
    return plan.rows[0]


def test_recommendations_from_numerics() -> None:
    h100 = get_gpu("h100")
    recipe = fp8train.Recipe.from_name("tensorwise")
    row = _row()
    assert row.recommendation == "fp8" and row.reason.endswith("numerics not measured")
    row.numerics = Numerics({"grad_output": OperandNumerics(underflow=0.46, sqnr_db=12.0)})
    recommend(row, h100, recipe)
    assert row.recommendation == "finer" and row.suggested_recipe == "rowwise"
    assert row.reason.startswith("grad_output underflow 46%; rowwise predicted 1.")
    assert row.risk == "high"
    row.numerics = Numerics({"input": OperandNumerics(clipped=0.01, sqnr_db=25.0)})
    recommend(row, h100, recipe)
    assert row.reason.startswith("input clipped 1.00%")
    row.numerics = Numerics({"input": OperandNumerics(underflow=0.02, sqnr_db=30.0)})
    recommend(row, h100, recipe)
    assert row.recommendation == "fp8" and row.risk == "medium"
    row.numerics = Numerics({"input": OperandNumerics(underflow=0.0, sqnr_db=30.0)})
    assert row.risk == "low"
    # no finer recipe on L40S (tensorwise only): keep bf16
    l40s_row = _row(gpu="l40s")
    l40s_row.numerics = Numerics({"weight": OperandNumerics(underflow=0.2)})
    recommend(l40s_row, get_gpu("l40s"), recipe)
    assert l40s_row.recommendation == "bf16"
    assert l40s_row.reason == "weight underflow 20%; no finer recipe on L40S beats bf16 here"


class _Outliers(nn.Module):
    """``fc1`` sees an input whose few huge rows flush the rest to zero under
    tensorwise E4M3; the LayerNorm gives ``fc2`` a well-scaled input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 256)
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.norm(self.fc1(x)))
        return out


def test_calibration_recommends_and_convert_takes_the_filter() -> None:
    x = torch.randn(512, 128)
    x[:4] *= 1e6  # amax ~4e6: values near 1 scale below E4M3's smallest subnormal
    model = _Outliers()
    before = copy.deepcopy(model.state_dict())
    # A GPU whose bf16 tensor cores are 20x slower than its FP8 ones, so these small
    # layers are worth converting and the numerics decide.
    gpu = dataclasses.replace(get_gpu("h100"), bf16=100.0)
    plan = plan_model(model, x, gpu=gpu, recipe="tensorwise", calibrate_steps=2)
    assert plan.calibrated
    fc1, fc2 = plan.row("fc1"), plan.row("fc2")
    assert fc1.numerics is not None and fc2.numerics is not None
    assert fc1.numerics.operands["input"].underflow > 0.9
    assert fc1.recommendation == "finer" and fc1.suggested_recipe == "rowwise"
    assert fc1.reason.startswith("input underflow 9")
    assert fc2.recommendation == "fp8" and fc2.risk in ("low", "medium")
    assert plan.selected == ["fc2"]
    # the model itself is untouched, and convert takes the plan's filter
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    fp8train.convert(model, "tensorwise", filter=plan.filter)
    assert isinstance(model.fc2, Fp8Linear) and not isinstance(model.fc1, Fp8Linear)


def test_plan_model_rejects_bad_requests() -> None:
    meta = build("qwen2.5-0.5b")
    ids = torch.zeros((1, 16), dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="calibrate_steps needs real weights"):
        plan_model(meta, ids, gpu="h100", recipe="tensorwise", calibrate_steps=1)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        plan_model(meta, ids, gpu="h100", recipe="tensorwise", world_size=0)
    with pytest.raises(ValueError, match="non_gemm_fraction must be in"):
        plan_model(meta, ids, gpu="h100", recipe="tensorwise", non_gemm_fraction=1.0)
