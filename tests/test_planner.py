"""The planner's cost model: sane properties of one Linear, the GPU table, the passes."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from fp8train.planner import GPUS, get_gpu, plan_linear, quant_passes
from fp8train.planner.gpus import HBM_EFFICIENCY, KERNEL_OVERHEAD_US, gemm_efficiency_curve
from fp8train.recipes import Recipe

FP8_RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8")


def test_the_table_has_every_gpu_the_issue_names() -> None:
    names = {"h100-sxm", "h100-pcie", "h200", "b200", "b300", "gb200", "l40s", "mi300x", "mi325x"}
    assert set(GPUS) == names
    for gpu in GPUS.values():
        # dense FP8 is twice dense bf16 on every one of them
        assert gpu.fp8 == pytest.approx(2 * gpu.bf16, rel=0.02), gpu.name
        assert gpu.scaling_factor("tensor") == 1.0, gpu.name
        assert gpu.hbm_tbs > 0 and gpu.link_gbs > 0 and gpu.sms > 0
        assert 0 < gpu.gemm_efficiency["fp8"] <= gpu.gemm_efficiency["bf16"] <= 1
    fp4 = {g.name for g in GPUS.values() if g.fp4 is not None}
    assert fp4 == {"b200", "b300", "gb200"}  # FP4 tensor cores: Blackwell only
    mx = {g.name for g in GPUS.values() if g.scaling_factor("mx") is not None}
    assert mx == {"b200", "b300", "gb200"}


def test_get_gpu_names_and_errors() -> None:
    assert get_gpu("H100") is GPUS["h100-sxm"]
    assert get_gpu("h100_pcie") is GPUS["h100-pcie"]
    assert get_gpu(GPUS["b200"]) is GPUS["b200"]
    with pytest.raises(ValueError, match="unknown gpu 'a100'; known: h100-sxm"):
        get_gpu("a100")
    with pytest.raises(TypeError, match="gpu must be a name"):
        get_gpu(3)  # type: ignore[arg-type]


def test_wave_quantisation_and_split_k() -> None:
    h100 = GPUS["h100-sxm"]  # 132 SMs
    assert gemm_efficiency_curve(h100, 128 * 132, 128, 128) == 1.0  # one full wave
    assert gemm_efficiency_curve(h100, 128 * 133, 128, 128) == pytest.approx(133 / 264)
    # one output tile and a long contraction: split-K spreads it over the SMs
    assert gemm_efficiency_curve(h100, 128, 128, 2**20) == 1.0
    assert gemm_efficiency_curve(h100, 128, 128, 128) == pytest.approx(1 / 132)


@pytest.mark.parametrize("recipe", FP8_RECIPES)
@pytest.mark.parametrize("gpu", ["h100-sxm", "b200", "mi300x"])
def test_plan_linear_is_sane(gpu: str, recipe: str) -> None:
    """Times positive and growing with every dimension; FP8 never beats its peak ratio;
    large layers gain, small ones lose."""
    sizes = (256, 1024, 4096, 16384)
    plans = {
        (m, k, n): plan_linear(m, k, n, gpu=gpu, recipe=recipe)
        for m, k, n in itertools.product(sizes, repeat=3)
    }
    first = next(iter(plans.values()))
    if not first.supported:  # e.g. MX on Hopper: bf16 throughout, and says why
        assert all(p.speedup == 1.0 and p.reason for p in plans.values())
        return
    g = get_gpu(gpu)
    for (m, k, n), p in plans.items():
        assert p.bf16_ms > 0 and p.fp8_gemm_ms > 0 and p.quant_ms > 0
        assert p.fp8_ms == pytest.approx(p.fp8_gemm_ms + p.quant_ms)
        assert p.speedup < g.fp8 / g.bf16 * g.gemm_efficiency["fp8"] / g.gemm_efficiency["bf16"]
        for bigger in ((4 * m, k, n), (m, 4 * k, n), (m, k, 4 * n)):
            if bigger in plans:
                assert plans[bigger].bf16_ms >= p.bf16_ms  # equal within one wave
                assert plans[bigger].fp8_ms >= p.fp8_ms
    assert plans[(256, 256, 256)].speedup < 1.0
    assert plans[(16384, 16384, 16384)].speedup > 1.2
    # along the diagonal the speed-up rises with size
    diag = [plans[(s, s, s)].speedup for s in sizes]
    assert diag == sorted(diag)


def test_delayed_scaling_saves_exactly_the_amax_pass() -> None:
    """Delayed and tensorwise differ only by the amax pass over x, W and dy: read 2
    bytes per element, plus one kernel launch each."""
    m, k, n = 8192, 4096, 4096
    cur = plan_linear(m, k, n, gpu="h100", recipe="tensorwise")
    dly = plan_linear(m, k, n, gpu="h100", recipe="delayed")
    assert cur.bf16_ms == dly.bf16_ms and cur.fp8_gemm_ms == dly.fp8_gemm_ms
    bw = 3.35e12 * HBM_EFFICIENCY
    amax_ms = 2 * (m * k + n * k + m * n) / bw * 1e3 + 3 * KERNEL_OVERHEAD_US / 1e3
    assert cur.quant_ms - dly.quant_ms == pytest.approx(amax_ms)


@pytest.mark.parametrize(
    ("recipe", "bytes_per_element"),
    [
        ("delayed", 4.0),  # fused cast + transpose
        ("tensorwise", 6.0),  # + amax pass
        ("rowwise", 8.0),  # row cast; column amax + column cast
        ("blockwise", 4.0 + 2 * 4 / 128),  # both orientations, fp32 scale per 128
        ("mxfp8", 4.0 + 2 / 32),  # both orientations, E8M0 scale per 32
    ],
)
def test_quant_passes_per_recipe(recipe: str, bytes_per_element: float) -> None:
    passes = quant_passes(recipe)
    for tensor in ("x", "W", "dy"):
        assert sum(p.bytes_per_element for p in passes[tensor]) == pytest.approx(bytes_per_element)


def test_fp8_all_gather_casts_the_weight_on_its_shard() -> None:
    passes = quant_passes("tensorwise", sharded_weight_world=8)
    assert sum(p.bytes_per_element for p in passes["W"]) == pytest.approx(6 / 8 + 2)
    assert passes["x"] == quant_passes("tensorwise")["x"]


def test_high_precision_backward_gemms_are_priced_in_bf16() -> None:
    full = Recipe.from_name("tensorwise")
    no_wgrad = dataclasses.replace(full, fp8_wgrad=False)
    a = plan_linear(8192, 4096, 4096, gpu="h100", recipe=full)
    b = plan_linear(8192, 4096, 4096, gpu="h100", recipe=no_wgrad)
    assert b.fp8_gemm_ms > a.fp8_gemm_ms and b.quant_ms < a.quant_ms
    assert 1.0 < b.speedup < a.speedup
    # x and dy lose their second orientation: one byte less each
    assert sum(p.bytes_per_element for p in quant_passes(no_wgrad)["dy"]) == 5.0


def test_a_scaling_the_gpu_cannot_take_stays_bf16() -> None:
    p = plan_linear(8192, 4096, 4096, gpu="h100", recipe="mxfp8")
    assert not p.supported and p.speedup == 1.0
    assert p.reason == "H100 SXM's GEMM cannot take mx scaling"
    assert plan_linear(8192, 4096, 4096, gpu="b200", recipe="mxfp8").supported


def test_plan_linear_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        plan_linear(16, 0, 16, gpu="h100", recipe="tensorwise")
    with pytest.raises(ValueError, match="unknown recipe"):
        plan_linear(16, 16, 16, gpu="h100", recipe="fp7")
    with pytest.raises(ValueError, match="unknown gpu"):
        plan_linear(16, 16, 16, gpu="tpu", recipe="tensorwise")


def test_the_docs_table_lists_every_gpu() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "planner.md").read_text()
    for gpu in GPUS.values():
        row = f"| {gpu.label} | {gpu.bf16:.0f} | {gpu.fp8:.0f} |"
        assert row in text, f"docs/planner.md's GPU table lacks or misstates {row}"
