"""The CPU-checkable parts of benchmarks/gpu.py: options, shape lists, the section runner
(failures recorded, time budget), the GEMM comparison on CPU tensors, the timing
sections at tiny sizes, the results file, the performance page's CUDA section, and the
script's refusal without a GPU.

Tests never import benchmark scripts: the parts live in ``benchmarks/_gpu_bench.py``, a
helper like ``_common.py``, loaded here by its path (``benchmarks/`` is no package), the
way tests/test_docs.py loads the docs scripts. ``gpu.py`` itself only runs as a child
process, to see it refuse.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fp8train import cuda_gemm

ROOT = Path(__file__).resolve().parents[1]
HOPPER, BLACKWELL, ADA, AMPERE = (9, 0), (10, 0), (8, 9), (8, 0)
CPU = torch.device("cpu")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load(ROOT / "benchmarks" / "_gpu_bench.py", "_gpu_bench")


@pytest.fixture(scope="module")
def gen_performance() -> ModuleType:
    return _load(ROOT / "docs" / "gen_performance.py", "gen_performance")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- options and shapes
def test_options_default_to_every_section_and_the_full_run(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert args.sections == ("tests", "gemm", "linear", "train")
    assert args.quick is False and args.name == "gpu"
    assert args.budget_s == bench.DEFAULT_BUDGET_S < 8 * 60
    assert args.results_dir == ROOT / "benchmarks" / "results"


def test_options_quick_sections_budget_and_name(bench: ModuleType, tmp_path: Path) -> None:
    args = bench.parse_args(
        ["--quick", "--sections", "train, gemm", "--budget-s", "90", "--results-dir", str(tmp_path)]
    )
    assert args.quick and args.name == "gpu-quick"
    assert args.sections == ("gemm", "train")  # the run's order, whatever the option's
    assert args.budget_s == 90.0 and args.results_dir == tmp_path
    assert bench.parse_args(["--quick", "--name", "gpu-h200"]).name == "gpu-h200"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "tests,benchmarks"], "unknown section"),
        (["--sections", ""], "unknown section"),
        (["--budget-s", "0"], "must be > 0"),
        (["--budget-s", "-5"], "must be > 0"),
    ],
)
def test_bad_options_exit_2_naming_the_choices(
    bench: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "section" in message:
        assert "tests,gemm,linear,train" in err


def test_shape_lists(bench: ModuleType) -> None:
    # issue 28's shapes, (M, K, N)
    assert bench.LINEAR_SHAPES == (
        (1024, 2048, 1024),
        (4096, 4096, 4096),
        (4096, 8192, 16384),
        (16384, 4096, 14336),
    )
    assert bench.sizes(False).linear_shapes == bench.LINEAR_SHAPES
    quick = bench.sizes(True)
    assert quick.linear_shapes == bench.QUICK_LINEAR_SHAPES
    biggest = max(m * k * n for m, k, n in bench.LINEAR_SHAPES)
    assert all(m * k * n < biggest / 8 for m, k, n in quick.linear_shapes)
    assert quick.linear_repeats <= bench.FULL.linear_repeats
    assert quick.llama.seq * quick.llama.batch < bench.FULL.llama.seq * bench.FULL.llama.batch
    # the model widths, at both sizes
    for s in (bench.FULL, quick):
        assert s.gpt.d_model == 1024 and s.llama.hidden == 4096
        assert s.gemm_cases["exact"][1] == 256  # the exactness argument's K
        _, k, n = s.gemm_cases["padded"]
        assert k % 16 and n % 16  # padding in the product


def test_device_recipes_follow_the_route_table(bench: ModuleType) -> None:
    hopper, not_hopper = bench.device_recipes(HOPPER)
    assert hopper == ["tensorwise", "delayed", "rowwise", "blockwise"]
    # FP4 GEMMs emulate on every GPU (no FP4 route built): never timed as hardware.
    assert set(not_hopper) == {"mxfp8", "int8", "int8_rowwise", "mxfp4", "nvfp4"}
    assert "9.0 has no BlockWise1x32" in not_hopper["mxfp8"]
    assert "no FP4 route built" in not_hopper["nvfp4"]
    blackwell, _ = bench.device_recipes(BLACKWELL)
    assert blackwell == ["tensorwise", "delayed", "rowwise", "mxfp8"]
    assert bench.device_recipes(ADA)[0] == ["tensorwise", "delayed", "rowwise"]
    ampere, why = bench.device_recipes(AMPERE)
    assert ampere == [] and all(why.values())


# ---------------------------------------------------------------- sections and budget
def test_a_failing_section_is_recorded_and_the_run_goes_on(bench: ModuleType) -> None:
    ran: list[str] = []

    def ok(name: str) -> Any:
        def section() -> dict[str, Any]:
            ran.append(name)
            return {"value": name}

        return section

    def broken() -> dict[str, Any]:
        ran.append("gemm")
        raise RuntimeError("CUDA error: an illegal memory access")

    cleanups: list[int] = []
    out = bench.run_sections(
        [("tests", ok("tests")), ("gemm", broken), ("linear", ok("linear"))],
        bench.Budget(100),
        after=lambda: cleanups.append(1),
        log=lambda line: None,
    )
    assert ran == ["tests", "gemm", "linear"] and len(cleanups) == 3
    assert out["tests"]["status"] == "ok" and out["tests"]["value"] == "tests"
    assert out["gemm"]["status"] == "error"
    assert out["gemm"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert "in broken" in out["gemm"]["traceback"]
    assert out["linear"]["status"] == "ok"
    assert bench.problems(out) == [
        "section gemm: RuntimeError: CUDA error: an illegal memory access"
    ]


def test_sections_past_the_budget_are_skipped(bench: ModuleType) -> None:
    clock = FakeClock()
    budget = bench.Budget(60, clock=clock)

    def slow() -> dict[str, Any]:
        clock.now += 61
        return {}

    out = bench.run_sections(
        [("tests", slow), ("gemm", lambda: {}), ("train", lambda: {})], budget, log=lambda s: None
    )
    assert out["tests"]["status"] == "ok"
    for name in ("gemm", "train"):
        assert out[name]["status"] == "skipped"
        assert "time budget of 60 s spent (61 s elapsed)" in out[name]["reason"]
    assert bench.problems(out) == []  # skipping for time is reported, not a failure
    assert budget.left() == -1 and budget.exceeded()


def test_time_on_device_on_the_cpu(bench: ModuleType) -> None:
    calls: list[int] = []
    timing = bench.time_on_device(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and len(timing["times_s"]) == 5
    assert timing["min_s"] <= timing["median_s"]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.time_on_device(lambda: None, CPU, warmup=0, repeats=0)


# ---------------------------------------------------------------- tests section
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.numerics.test_cuda_route" name="test_a[x]" />
<testcase classname="tests.numerics.test_cuda_route" name="test_b"><failure message="x"/>
</testcase>
<testcase classname="tests.test_kernels_cuda" name="test_c"><skipped message="no cuda"/></testcase>
<testcase classname="tests.test_kernels_cuda.TestK" name="test_d"><error message="boom"/></testcase>
<testcase classname="tests.test_other" name="test_e" />
</testsuite></testsuites>
"""


def test_junit_counts_per_file(bench: ModuleType, tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(JUNIT, encoding="utf-8")
    counts = bench.junit_counts(xml, bench.CUDA_TESTS)
    route, kernels = bench.CUDA_TESTS
    assert counts["per_file"][route] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}
    assert counts["per_file"][kernels] == {"passed": 0, "failed": 0, "errors": 1, "skipped": 1}
    assert counts["per_file"]["other"]["passed"] == 1
    assert counts["totals"] == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    assert counts["failures"] == [
        "tests.numerics.test_cuda_route::test_b",
        "tests.test_kernels_cuda.TestK::test_d",
    ]


def test_tests_section_runs_pytest_and_counts(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_pass():\n    pass\n"
        "def test_fail():\n    assert False\n"
        "@pytest.mark.skip(reason='no gpu')\ndef test_skip():\n    pass\n",
        encoding="utf-8",
    )
    record = bench.tests_section(["test_sample.py"], root=tmp_path, timeout_s=120, workers=0)
    assert record["returncode"] == 1, record["output_tail"]
    assert record["totals"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert record["failures"] == ["test_sample::test_fail"]
    assert "-n" not in record["command"].split()
    assert bench.problems({"tests": {"status": "ok", **record}}) == [
        "tests: 1 failed, 0 errors, pytest exit 1"
    ]


def test_tests_section_ends_pytest_at_its_timeout(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(
        "import time\ndef test_slow():\n    time.sleep(60)\n", encoding="utf-8"
    )
    record = bench.tests_section(["test_slow.py"], root=tmp_path, timeout_s=3, workers=0)
    assert record["returncode"] is None and record["timeout"] == "pytest killed after 3 s"
    assert record["totals"]["errors"] == 1  # no report: counted as an error
    assert bench.problems({"tests": {"status": "ok", **record}}) == [
        "tests: 0 failed, 1 errors, pytest exit None (pytest killed after 3 s)"
    ]


def test_the_cuda_tests_exist_and_skip_without_cuda(bench: ModuleType, tmp_path: Path) -> None:
    for path in bench.CUDA_TESTS:
        assert (ROOT / path).is_file(), path
    found = bench.cuda_test_files()
    assert found[:2] == list(bench.CUDA_TESTS)
    assert "tests/test_gpu_benchmark.py" not in found  # skips one test, not itself
    # a new file that skips itself without CUDA is picked up
    (tmp_path / "tests" / "sub").mkdir(parents=True)
    (tmp_path / "tests" / "sub" / "test_new_gpu.py").write_text(
        "pytestmark = pytest.mark.skipif(\n    not torch.cuda.is_available(), reason='gpu')\n",
        encoding="utf-8",
    )
    (tmp_path / "tests" / "test_cpu.py").write_text("def test_x():\n    pass\n", encoding="utf-8")
    assert bench.cuda_test_files(tmp_path) == [*bench.CUDA_TESTS, "tests/sub/test_new_gpu.py"]


# ---------------------------------------------------------------- gemm comparison
def test_relative_errors_and_bitwise(bench: ModuleType) -> None:
    ref = torch.tensor([[1.0, -2.0], [4.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    errors = bench.relative_errors(x, ref)
    assert errors["max_rel"] == pytest.approx(1.0 / 4.0)  # max |d| / max |ref|
    assert errors["mean_rel"] == pytest.approx((1.5 / 4) / (7.0 / 4))
    assert bench.relative_errors(ref, ref) == {"max_rel": 0.0, "mean_rel": 0.0}
    same = bench.bitwise(x, x.clone())
    assert same == {"bitwise": True, "equal_fraction": 1.0}
    zeros = torch.zeros(4, dtype=torch.bfloat16)
    signed = zeros.clone()
    signed[0] = -0.0
    assert bench.bitwise(zeros, signed) == {"bitwise": False, "equal_fraction": 0.75}
    assert bench.bitwise(x, x.double())["bitwise"] is False  # dtypes differ


def _cpu_scaled_mm(capability: tuple[int, int]) -> Any:
    """The CUDA route's own operand preparation and F.scaled_mm call, run by torch's CPU
    scaled GEMM (which takes tensorwise and rowwise scales)."""

    def hardware(qa: Any, qb: Any, out_dtype: torch.dtype) -> torch.Tensor:
        chosen = cuda_gemm.route(qa.spec, qb.spec, out_dtype, capability)
        assert chosen.hardware, chosen.reason
        return cuda_gemm.hardware_mm(qa, qb, None, out_dtype, chosen)

    return hardware


CPU_CASES = {"random": (48, 96, 40), "padded": (30, 50, 20), "exact": (20, 256, 24)}


def test_gemm_section_on_cpu_tensors(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison code on the CPU: torch's CPU scaled GEMM stands in for the GPU's,
    through the CUDA route's padding and layouts."""
    calls: list[int] = []
    real = F.scaled_mm

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda_gemm.F, "scaled_mm", spy)
    flags = torch.backends.cuda.matmul
    before = (flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32)
    out = bench.gemm_section(
        CPU, HOPPER, CPU_CASES, hardware=_cpu_scaled_mm(HOPPER), recipes=("tensorwise", "rowwise")
    )
    assert (flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32) == before
    assert out["violations"] == []
    rows = out["rows"]
    # rowwise with fp32 outputs has no kernel: listed with its route, not compared
    skipped = [r for r in rows if not r["hardware"]]
    assert {(r["recipe"], r["out_dtype"]) for r in skipped} == {("rowwise", "float32")}
    assert all(r["route"].startswith("emulated: ") for r in skipped)
    compared = [r for r in rows if r["hardware"]]
    assert len(compared) == (3 * 2 + 3 * 1) * len(CPU_CASES) == len(calls)
    for r in compared:
        what = (r["recipe"], r["gemm"], r["out_dtype"], r["case"])
        # one rounding to the output dtype, normwise: bf16's half ulp is 2^-9
        bound = 2**-8 if r["out_dtype"] == "bfloat16" else 1e-5
        assert r["hardware_vs_float64"]["max_rel"] < bound, what
        assert r["emulation_vs_float64"]["max_rel"] < bound, what
        if r["case"] == "exact":
            assert r["must_be_bitwise"] and r["hardware_vs_emulation"]["bitwise"], what
            assert r["hardware_vs_float64_rounded"]["bitwise"], what
            if r["out_dtype"] == "float32":  # the sums themselves, unrounded
                assert r["hardware_vs_float64"]["max_rel"] == 0.0, what


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "blockwise", "mxfp8"])
def test_exact_case_operands_are_integers(bench: ModuleType, name: str) -> None:
    """The exact case's premise for every recipe with a hardware route: the quantised
    operands dequantise to the integers drawn (else gemm_operands raises)."""
    from fp8train.recipes import Recipe

    for gemm, (spec_a, spec_b) in cuda_gemm.gemm_specs(Recipe.from_name(name)).items():
        qa, qb = bench.gemm_operands(spec_a, spec_b, (200, 256, 72), exact=True, device=CPU)
        assert qa.shape == (200, 256) and qb.shape == (256, 72), gemm
        exact = qa.dequantize(torch.float64) @ qb.dequantize(torch.float64)
        assert float(exact.abs().max()) <= 16 * 256


def test_a_broken_exact_case_is_a_violation(bench: ModuleType) -> None:
    right = _cpu_scaled_mm(HOPPER)

    def off_by_one(qa: Any, qb: Any, out_dtype: torch.dtype) -> torch.Tensor:
        out = right(qa, qb, out_dtype)
        out[0, 0] += 1
        return out

    out = bench.gemm_section(
        CPU,
        HOPPER,
        {"exact": (20, 256, 24)},
        hardware=off_by_one,
        recipes=("tensorwise",),
        out_dtypes=(torch.float32,),
    )
    assert len(out["violations"]) == 3  # each GEMM
    assert out["violations"][0].startswith("tensorwise output float32 exact case")
    found = bench.problems({"gemm": {"status": "ok", **out}})
    assert len(found) == 3 and found[0].startswith("gemm: tensorwise output")


def test_the_hardware_gemm_refuses_to_emulate(bench: ModuleType) -> None:
    """On the GPU the hardware side is fp8train.scaled_mm(backend="scaled_mm"), which
    raises where the route has no kernel instead of quietly emulating."""
    from fp8train.recipes import Recipe

    spec_a, spec_b = cuda_gemm.gemm_specs(Recipe.from_name("blockwise"))["output"]
    qa, qb = bench.gemm_operands(spec_a, spec_b, (16, 128, 16), exact=False, device=CPU)
    with pytest.raises(ValueError, match=r"torch\._scaled_mm takes"):
        bench.scaled_mm_on_device(qa, qb, torch.bfloat16)


# ---------------------------------------------------------------- timing sections
def test_linear_section_on_cpu(bench: ModuleType) -> None:
    out = bench.linear_section(
        CPU,
        ["tensorwise", "no_such_recipe"],
        [(32, 64, 48), (16, 32, 16)],
        bench.Budget(600),
        warmup=1,
        repeats=2,
        compile=False,
        torchao=False,
        kernels="eager",
    )
    assert out["torchao"] == "not requested"
    assert out["variants"] == ["bf16", "tensorwise", "no_such_recipe"]
    assert [r["shape"] for r in out["results"]] == [[32, 64, 48], [16, 32, 16]]
    for row in out["results"]:
        bf16, fp8 = row["variants"]["bf16"], row["variants"]["tensorwise"]
        assert bf16["vs_bf16"] == 1.0 and fp8["median_s"] > 0 and fp8["tflops"] > 0
        assert fp8["kernels"] == "eager" and bf16["kernels"] == "-"
        assert fp8["setting"] == "fp32 weights, bf16 autocast"
        assert (
            "unknown recipe"
            in row["variants"]["no_such_recipe"]["failed_settings"]["fp32 weights, bf16 autocast"]
        )
    assert len(out["errors"]) == 2 and "no_such_recipe at (32, 64, 48)" in out["errors"][0]
    assert out["skipped_for_budget"] == []


def test_linear_section_stops_at_the_budget(bench: ModuleType) -> None:
    clock = FakeClock()
    clock.now = 0.0
    budget = bench.Budget(10, clock=clock)
    clock.now = 11.0
    out = bench.linear_section(
        CPU, [], [(16, 32, 16)], budget, warmup=0, repeats=1, compile=False, torchao=False
    )
    assert out["results"] == [] and out["skipped_for_budget"] == [[16, 32, 16]]


def test_linear_variants_pair_each_recipe_with_torchao(bench: ModuleType) -> None:
    recipes = ["tensorwise", "delayed", "rowwise", "blockwise"]
    assert bench.linear_variants(recipes, torchao=True) == [
        "bf16",
        "tensorwise",
        "torchao tensorwise",
        "delayed",
        "rowwise",
        "torchao rowwise",
        "blockwise",
    ]
    assert bench.linear_variants(recipes, torchao=False) == ["bf16", *recipes]


def test_the_budget_can_cut_a_shape_short(bench: ModuleType) -> None:
    """Checked before every variant: one that would start past the budget is marked
    skipped, and what ran keeps its numbers."""
    times = iter([0.0, 0.0, 0.0] + [100.0] * 20)  # start, the shape, bf16; then past it
    budget = bench.Budget(10, clock=lambda: next(times))
    out = bench.linear_section(
        CPU,
        ["tensorwise"],
        [(16, 32, 16)],
        budget,
        warmup=0,
        repeats=1,
        compile=False,
        torchao=False,
        kernels="eager",
    )
    variants = out["results"][0]["variants"]
    assert variants["bf16"]["median_s"] > 0
    assert "time budget of 10 s spent" in variants["tensorwise"]["skipped"]
    assert out["errors"] == []


def test_torchao_status_says_installed_or_not(bench: ModuleType) -> None:
    ok, what = bench.torchao_status()
    if importlib.util.find_spec("torchao") is None:
        assert (ok, what) == (False, "not installed")
    else:
        assert isinstance(what, str) and what


# ---------------------------------------------------------------- planner vs measured
@pytest.mark.parametrize(
    "name, capability, key",
    [
        ("NVIDIA H100 80GB HBM3", "9.0", "h100-sxm"),
        ("NVIDIA H100 SXM5 80GB", "9.0", "h100-sxm"),
        ("NVIDIA H100 PCIe", "9.0", "h100-pcie"),
        ("NVIDIA H200", "9.0", "h200"),
        ("NVIDIA B200", "10.0", "b200"),
        ("NVIDIA GB200", "10.0", "gb200"),
        ("NVIDIA B300 SXM6 AC", "10.3", "b300"),
        ("NVIDIA L40S", "8.9", "l40s"),
        ("AMD Instinct MI300X", "9.4", "mi300x"),
        ("AMD Instinct MI325X", "9.4", "mi325x"),
        # Parts no row describes: their rates differ from the nearest one's.
        ("NVIDIA H100 NVL", "9.0", None),
        ("NVIDIA H200 NVL", "9.0", None),
        ("NVIDIA GH200 480GB", "9.0", None),
        ("NVIDIA H20", "9.0", None),
        ("NVIDIA A100-SXM4-80GB", "8.0", None),
        ("NVIDIA H200", "8.0", None),  # a name that does not match its capability
    ],
)
def test_planner_target_maps_the_gpu_name(
    bench: ModuleType, name: str, capability: str, key: str | None
) -> None:
    from fp8train.planner import GPUS

    target = bench.planner_target(name, capability)
    assert target["gpu"] == key
    if key is None:
        assert target["note"].startswith("no planner entry") and name in target["note"]
    else:
        assert key in GPUS and GPUS[key].label in target["note"]


def test_every_mapped_gpu_is_in_the_planner_table(bench: ModuleType) -> None:
    from fp8train.planner import GPUS

    assert {key for _, key, _ in bench.PLANNER_GPUS} == set(GPUS)


def test_planner_error_is_predicted_over_measured_minus_one(bench: ModuleType) -> None:
    assert bench.planner_error(1.1, 1.0) == pytest.approx(0.1)
    assert bench.planner_error(0.75, 1.5) == pytest.approx(-0.5)
    assert bench.planner_error(2.0, 2.0) == 0.0
    with pytest.raises(ValueError, match="must be > 0"):
        bench.planner_error(1.0, 0.0)


def _fake_linear(bench: ModuleType) -> dict[str, Any]:
    """A linear section's record as a GPU would write it: bf16 1 ms, tensorwise 0.8 ms,
    torchao's rowwise skipped for the budget."""
    return {
        "status": "ok",
        "results": [
            {
                "shape": [4096, 4096, 4096],
                "variants": {
                    "bf16": {"median_s": 1e-3},
                    "tensorwise": {"median_s": 0.8e-3},
                    "torchao rowwise": {"skipped": "time budget of 400 s spent"},
                },
            }
        ],
    }


def test_planner_vs_linear_fields_from_a_fake_measurement(
    bench: ModuleType, tmp_path: Path
) -> None:
    from fp8train.planner import plan_linear

    target = bench.planner_target("NVIDIA H100 80GB HBM3", "9.0")
    out = bench.planner_vs_linear(_fake_linear(bench), target)
    assert out["gpu"] == "h100-sxm" and out["note"] == target["note"]
    timed, skipped = out["rows"]
    plan = plan_linear(4096, 4096, 4096, gpu="h100-sxm", recipe="tensorwise")
    assert timed["shape"] == [4096, 4096, 4096] and timed["layer"] == timed["recipe"]
    assert timed["predicted_bf16_ms"] == plan.bf16_ms
    assert timed["predicted_fp8_ms"] == plan.fp8_ms
    assert timed["predicted_speedup"] == pytest.approx(plan.speedup)
    assert (timed["measured_bf16_ms"], timed["measured_fp8_ms"]) == (1.0, 0.8)
    assert timed["measured_speedup"] == pytest.approx(1.25)
    assert timed["error"] == pytest.approx(plan.speedup / 1.25 - 1)
    assert timed["bf16_ms_error"] == pytest.approx(plan.bf16_ms / 1.0 - 1)
    assert timed["fp8_ms_error"] == pytest.approx(plan.fp8_ms / 0.8 - 1)
    assert "note" not in timed
    # torchao's variant is predicted under the recipe of its name; not measured here.
    assert skipped["layer"] == "torchao rowwise" and skipped["recipe"] == "rowwise"
    assert skipped["predicted_speedup"] == pytest.approx(
        plan_linear(4096, 4096, 4096, gpu="h100-sxm", recipe="rowwise").speedup
    )
    assert skipped["measured_speedup"] is None and skipped["error"] is None
    assert skipped["note"] == "not measured (skipped or failed)"
    # The fields survive the results file.
    data = json.loads(bench.write("gpu", {"planner": out}, tmp_path).read_text(encoding="utf-8"))
    assert data["planner"]["rows"][0]["error"] == pytest.approx(timed["error"])
    assert data["planner"]["rows"][1]["error"] is None


def test_planner_vs_linear_without_a_planner_entry(bench: ModuleType) -> None:
    target = bench.planner_target("NVIDIA A100-SXM4-80GB", "8.0")
    out = bench.planner_vs_linear(_fake_linear(bench), target)
    assert out["gpu"] is None and out["rows"] == []
    assert out["note"].startswith("no planner entry for 'NVIDIA A100-SXM4-80GB'")


def _tiny_models(bench: ModuleType) -> dict[str, Any]:
    gpt = bench.GptSize(d_model=32, layers=1, heads=2, seq=16, batch=2)

    def broken() -> torch.nn.Module:
        raise ImportError("No module named 'transformers'")

    return {"tiny GPT": (lambda: bench.build_gpt(gpt), 256, 2, 16), "broken": (broken, 8, 1, 4)}


def test_train_section_on_cpu(bench: ModuleType) -> None:
    out = bench.train_section(
        CPU,
        ["tensorwise"],
        _tiny_models(bench),
        bench.Budget(600),
        warmup=1,
        repeats=2,
        kernels="eager",
    )
    gpt, broken = out["results"]
    assert gpt["model"] == "tiny GPT" and gpt["tokens_per_step"] == 32
    assert gpt["variants"]["bf16"]["fp8_linears"] == "0/5"
    assert gpt["variants"]["tensorwise"]["fp8_linears"] == "5/5"
    assert gpt["variants"]["tensorwise"]["vs_bf16"] > 0
    assert gpt["variants"]["tensorwise"]["peak_memory_gib"] is None  # CPU
    assert "ImportError" in broken["error"] and out["errors"] == [broken["error"]]


def test_llama_block_builds_from_its_config(bench: ModuleType) -> None:
    pytest.importorskip("transformers")
    size = bench.LlamaSize(64, 128, 4, 2, layers=1, seq=8, batch=1, vocab=32)
    model = bench.build_llama(size)
    logits = bench._logits(model, torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 32)
    assert bench.FULL.llama.intermediate == 14336 and bench.FULL.llama.kv_heads == 8


# ---------------------------------------------------------------- results and docs
GPU = {
    "name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "memory_gib": 79.1,
    "multiprocessors": 132,
    "driver": "580.00",
    "cuda": "13.0",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "torchao": "not installed",
    "transformers": "5.17.0",
}


def _tests_record() -> dict[str, Any]:
    counts = {"passed": 3, "failed": 0, "errors": 0, "skipped": 0}
    return {
        "returncode": 0,
        "totals": counts,
        "per_file": {"tests/numerics/test_cuda_route.py": counts},
    }


def _tiny_sizes(bench: ModuleType) -> Any:
    return bench.Sizes(
        linear_shapes=((32, 64, 48),),
        linear_warmup=0,
        linear_repeats=1,
        gemm_cases=CPU_CASES,
        gpt=bench.GptSize(d_model=32, layers=1, heads=2, seq=16, batch=2),
        llama=bench.LlamaSize(64, 128, 4, 2, layers=1, seq=8, batch=1, vocab=32),
        train_warmup=0,
        train_repeats=1,
    )


@pytest.fixture(scope="module")
def cpu_run(bench: ModuleType) -> dict[str, Any]:
    """gpu.py's run on the CPU at tiny sizes: an Ada GPU's recipes (tensorwise, delayed,
    rowwise: torch's CPU scaled GEMM takes their scales), every section but the tests
    (their record stands in), no compilation."""
    args = bench.parse_args(["--sections", "gemm,linear,train"])
    body = bench.run_benchmark(
        args,
        CPU,
        ADA,
        GPU,
        chosen=_tiny_sizes(bench),
        hardware=_cpu_scaled_mm(ADA),
        compile=False,
        kernels="eager",
        log=lambda line: None,
    )
    assert body["sections"]["tests"] == {"status": "not requested"}
    body["sections"]["tests"] = {"status": "ok", **_tests_record()}
    return dict(body)


def test_the_whole_run_on_the_cpu(bench: ModuleType, cpu_run: dict[str, Any]) -> None:
    assert cpu_run["problems"] == []
    assert cpu_run["recipes"]["run"] == ["tensorwise", "delayed", "rowwise"]
    assert set(cpu_run["recipes"]["not_on_this_gpu"]) == {
        "blockwise",
        "mxfp8",
        "int8",
        "int8_rowwise",
        "mxfp4",
        "nvfp4",
    }
    sections = cpu_run["sections"]
    assert [sections[s]["status"] for s in ("gemm", "linear", "train")] == ["ok"] * 3
    assert {r["recipe"] for r in sections["gemm"]["rows"]} == set(cpu_run["recipes"]["run"]) | {
        "blockwise",
        "mxfp8",
        "int8",
        "int8_rowwise",
        "mxfp4",
        "nvfp4",
    }
    linear = sections["linear"]["results"][0]["variants"]
    assert set(linear) >= {"bf16", "tensorwise", "delayed", "rowwise"}
    models = [r["model"] for r in sections["train"]["results"]]
    assert models == ["lab GPT d_model 32, 1 layers", "Llama-style block, hidden 64, 1 layer(s)"]
    for row in sections["train"]["results"]:
        assert set(row["variants"]) == {"bf16", "tensorwise", "delayed", "rowwise"}, row
    assert cpu_run["config"]["sizes"]["linear_shapes"] == ((32, 64, 48),)


def test_the_run_compares_the_planner_with_the_measurement(cpu_run: dict[str, Any]) -> None:
    """The fake GPU is an H100 SXM: every timed shape and recipe, and every model and
    recipe of the train section, gets the planner's prediction and its error."""
    linear = cpu_run["sections"]["linear"]["planner"]
    assert linear["gpu"] == "h100-sxm"
    # torchao's variants too, where it imports, predicted under their recipe's name.
    variants = cpu_run["sections"]["linear"]["variants"]
    assert [(r["shape"], r["layer"]) for r in linear["rows"]] == [
        ([32, 64, 48], variant) for variant in variants if variant != "bf16"
    ]
    assert {"tensorwise", "delayed", "rowwise"} <= {r["layer"] for r in linear["rows"]}
    train = cpu_run["sections"]["train"]["planner"]
    assert train["gpu"] == "h100-sxm"
    assert [(r["model"], r["recipe"]) for r in train["rows"]] == [
        (model["model"], recipe)
        for model in cpu_run["sections"]["train"]["results"]
        for recipe in ("tensorwise", "delayed", "rowwise")
    ]
    for row in linear["rows"] + train["rows"]:
        if row["layer" if "layer" in row else "recipe"].startswith("torchao "):
            continue  # torchao may not run on a CPU; its rows then carry a note
        assert row["predicted_speedup"] > 0 and row["measured_speedup"] > 0, row
        assert row["error"] == pytest.approx(row["predicted_speedup"] / row["measured_speedup"] - 1)
    for row in train["rows"]:  # the measured bf16 step is the planner's bf16 step
        assert row["predicted_bf16_ms"] == pytest.approx(row["measured_bf16_ms"])


def test_results_file(bench: ModuleType, cpu_run: dict[str, Any], tmp_path: Path) -> None:
    path = bench.write("gpu", cpu_run, tmp_path)
    assert path == tmp_path / "gpu.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["environment"]["versions"]["torch"] == torch.__version__
    assert data["gpu"]["compute_capability"] == "9.0" and data["gpu"]["driver"] == "580.00"
    assert data["config"]["sections"] == ["gemm", "linear", "train"]
    assert data["config"]["sizes"]["linear_shapes"] == [[32, 64, 48]]
    assert data["problems"] == [] and "mxfp8" in data["recipes"]["not_on_this_gpu"]
    text = bench.summary(cpu_run)
    assert "tests: ok" in text and "train: ok" in text
    assert "32x64x48  tensorwise" in text and "lab GPT d_model 32, 1 layers" in text


def test_results_name_the_commit_given_without_git(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench._common, "_git_commit", lambda: None)
    monkeypatch.setenv("FP8TRAIN_COMMIT", "abc1234")
    data = json.loads(bench.write("gpu", {"x": 1}, tmp_path).read_text(encoding="utf-8"))
    assert data["environment"]["versions"]["git_commit"] == "abc1234 (FP8TRAIN_COMMIT)"
    assert data["x"] == 1


def test_performance_page_shows_the_cuda_results(
    bench: ModuleType, gen_performance: ModuleType, cpu_run: dict[str, Any], tmp_path: Path
) -> None:
    bench.write("gpu", cpu_run, tmp_path)
    page = gen_performance.render(tmp_path)
    cuda = page[page.index("## CUDA") :]
    assert "NVIDIA H100 80GB HBM3" in cuda and "compute capability 9.0" in cuda
    assert "driver 580.00" in cuda and "torchao not installed" in cuda
    assert "| 32x64x48 | bf16 |" in cuda and "| 32x64x48 | tensorwise |" in cuda
    assert "test_cuda_route.py` | 3 | 0 | 0 | 0 |" in cuda
    assert "tensorwise | random |" in cuda
    assert "not yet timed" not in page
    assert cuda.count("**Planner vs measured**") == 2  # linear and train
    assert "planner row h100-sxm (H100 SXM)" in cuda
    row = cpu_run["sections"]["linear"]["planner"]["rows"][0]
    assert f"| 32x64x48 | tensorwise | {row['predicted_bf16_ms']:.3g} ms |" in cuda
    assert f"| {100 * row['error']:+.1f}% |" in cuda


def test_performance_page_without_planner_data(
    bench: ModuleType, gen_performance: ModuleType, cpu_run: dict[str, Any], tmp_path: Path
) -> None:
    """Results from before the planner comparison render without its table; a GPU the
    planner does not know shows the note, no table."""
    body = json.loads(json.dumps(cpu_run))
    for name in ("linear", "train"):
        del body["sections"][name]["planner"]
    bench.write("gpu", body, tmp_path)
    page = gen_performance.render(tmp_path)
    assert "| 32x64x48 | tensorwise |" in page and "Planner vs measured" not in page
    unknown = bench.planner_target("NVIDIA A100-SXM4-80GB", "8.0")
    body["sections"]["linear"]["planner"] = bench.planner_vs_linear(
        body["sections"]["linear"], unknown
    )
    bench.write("gpu", body, tmp_path)
    cuda = gen_performance.render(tmp_path)
    assert "**Planner vs measured** (`plan_linear` per shape; no planner entry for" in cuda
    assert "predicted speed-up" not in cuda


def test_performance_page_without_gpu_results(gen_performance: ModuleType, tmp_path: Path) -> None:
    page = gen_performance.render(tmp_path)
    assert "## CUDA" in page
    assert "tests/numerics/test_cuda_route.py" in page and "not yet timed on a GPU" in page


# ---------------------------------------------------------------- the script itself
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_script_refuses_without_cuda(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "benchmarks/gpu.py needs a CUDA GPU: torch" in proc.stderr
    assert "sees no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
