"""The parts of the GPU benchmark (``benchmarks/gpu.py`` runs them): its options, shape
lists and sizes, the sections with their failure handling and time budget, the GEMM
comparison, device timing and the results file.

A helper module like ``_common.py``, not a timing script: every section takes its device
(and, for the GEMM comparison, the hardware GEMM) as arguments, so that
``tests/test_gpu_benchmark.py`` runs them on the CPU at tiny sizes. Tests load this file
by its path (``benchmarks/`` is not a package), as ``tests/test_docs.py`` loads the docs
scripts; they never run ``gpu.py``'s timings, only its refusal without a GPU.

Sections (``--sections``, in this order):

* ``tests``: the CUDA tests (:data:`CUDA_TESTS`) run by pytest on the device, with
  pass/fail counts per file;
* ``gemm``: per recipe whose three GEMMs the GPU takes (``fp8train.cuda_gemm.route``),
  the hardware GEMM against the emulation and against float64 on the same quantised
  operands;
* ``linear``: forward + backward of one Linear per shape, bf16 against every recipe
  the GPU takes and torchao's float8 (where it imports), under ``torch.compile``;
* ``train``: a train step of the lab GPT and of a Llama-style block, bf16 and every
  recipe.

Both timing sections also carry the planner's prediction for the GPU they ran on
(``fp8train.planner``; :func:`planner_target` maps the GPU's name to its table row) and
its error against the measurement, per shape (or model) and recipe.

A section that raises is recorded with its error and the run goes on; once the time
budget is spent, the remaining sections (and the remaining shapes and models inside
``linear`` and ``train``) are recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fp8train
from fp8train import cuda_gemm
from fp8train._kernels import KernelChoice
from fp8train.planner import GPUS, plan_linear, plan_model
from fp8train.recipes import RECIPE_NAMES, Recipe
from fp8train.scaling import ScaleSpec
from fp8train.tensor import ScaledTensor


def _load_common() -> Any:
    """``benchmarks/_common.py``, loaded by its path (as gpu.py's neighbour, without
    putting ``benchmarks/`` on ``sys.path`` for whoever loads this module)."""
    if "_common" in sys.modules:
        return sys.modules["_common"]
    spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_common"] = module
    spec.loader.exec_module(module)
    return module


_common = _load_common()

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

SECTIONS = ("tests", "gemm", "linear", "train")

# The tests that need a GPU to mean anything: the CUDA route (fake CUDA tensors on a
# CPU; on a GPU the same checks) and the compiled kernels' bits against the eager ones
# (skipped without CUDA). cuda_test_files adds any other file marked like the latter.
CUDA_TESTS = ("tests/numerics/test_cuda_route.py", "tests/test_kernels_cuda.py")
_CUDA_ONLY = re.compile(
    r"pytestmark\s*=\s*pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\)"
)

# Exit codes of gpu.py: 2 is argparse's for a bad option.
EXIT_OK = 0
EXIT_PROBLEMS = 1  # results written, but a section failed, a test failed or a check broke
EXIT_NO_CUDA = 3

# Seconds of work after which no further section (or shape, or model) starts. gpu.py
# must finish within 8 minutes on one H100: this leaves room for the unit of work in
# flight when the budget runs out (a variant's compilation and timing, well under a
# minute) and for starting Python and writing the results.
DEFAULT_BUDGET_S = 400.0

Shape = tuple[int, int, int]  # (M, K, N): x (M, K) @ W^T (K, N)

LINEAR_SHAPES: tuple[Shape, ...] = (
    (1024, 2048, 1024),
    (4096, 4096, 4096),
    (4096, 8192, 16384),
    (16384, 4096, 14336),
)
QUICK_LINEAR_SHAPES: tuple[Shape, ...] = ((1024, 2048, 1024), (2048, 4096, 4096))


@dataclass(frozen=True)
class GptSize:
    d_model: int
    layers: int
    heads: int
    seq: int
    batch: int
    vocab: int = 256  # the lab's byte-level vocabulary


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    seq: int
    batch: int
    vocab: int  # small, so that the block, not the head, is what is timed


@dataclass(frozen=True)
class Sizes:
    """Everything ``--quick`` changes."""

    linear_shapes: tuple[Shape, ...]
    linear_warmup: int  # untimed calls after the first (compiling) one
    linear_repeats: int  # timed calls; the median is reported
    gemm_cases: dict[str, Shape]  # case -> (M, K, N) of the GEMM comparison
    gpt: GptSize
    llama: LlamaSize
    train_warmup: int
    train_repeats: int


# The GEMM comparison's operands (gemm_operands): "random" and "padded" are normal
# values spread over several binades per row; "padded" has K and N off every multiple
# the kernels need (16, 32, 128), so the zero padding is in the product. "exact" holds
# small integers with K = 256: see gemm_operands for why its result is exact.
_GEMM_CASES = {"random": (2048, 4096, 2048), "padded": (1000, 1000, 1000), "exact": (200, 256, 72)}

FULL = Sizes(
    linear_shapes=LINEAR_SHAPES,
    linear_warmup=3,
    linear_repeats=20,
    gemm_cases=_GEMM_CASES,
    gpt=GptSize(d_model=1024, layers=4, heads=16, seq=512, batch=8),
    # Llama-3-8B's block widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads).
    llama=LlamaSize(4096, 14336, 32, 8, layers=1, seq=1024, batch=4, vocab=1024),
    train_warmup=3,
    train_repeats=10,
)
QUICK = Sizes(
    linear_shapes=QUICK_LINEAR_SHAPES,
    linear_warmup=2,
    linear_repeats=10,
    gemm_cases={"random": (512, 1024, 512), "padded": (100, 200, 72), "exact": (200, 256, 72)},
    gpt=GptSize(d_model=1024, layers=2, heads=16, seq=256, batch=4),
    llama=LlamaSize(4096, 14336, 32, 8, layers=1, seq=256, batch=4, vocab=1024),
    train_warmup=2,
    train_repeats=5,
)


def sizes(quick: bool) -> Sizes:
    return QUICK if quick else FULL


# ---------------------------------------------------------------- options
def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {unknown or [text]}; choose from {','.join(SECTIONS)}"
        )
    return tuple(s for s in SECTIONS if s in names)  # always in the run's order


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the time budget must be > 0 seconds, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu.py",
        description="fp8train on a GPU: CUDA tests, hardware GEMM against the emulation, "
        "Linear and train-step timings against bf16 and torchao.",
    )
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    p.add_argument(
        "--sections",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all, in that order)",
    )
    p.add_argument(
        "--budget-s",
        type=_positive,
        default=DEFAULT_BUDGET_S,
        help="seconds after which no further section, shape or model starts "
        f"(default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--name",
        default=None,
        help="results file stem (default 'gpu', 'gpu-quick' with --quick)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.name is None:
        args.name = "gpu-quick" if args.quick else "gpu"
    return args


def cuda_blocker() -> str | None:
    """Why this process cannot run the GPU benchmark, or None if it can."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return (
            f"torch {torch.__version__} sees no CUDA device ("
            + (f"CUDA {build} build" if build else "a build without CUDA")
            + ")"
        )
    return None


# ---------------------------------------------------------------- budget and sections
class Budget:
    """Seconds of work allowed since it was made; ``clock`` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exceeded(self) -> bool:
        return self.left() <= 0

    def skip_reason(self, what: str) -> str:
        return (
            f"time budget of {self.seconds:.0f} s spent ({self.elapsed():.0f} s elapsed) "
            f"before {what} started"
        )


Section = Callable[[], dict[str, Any]]


def run_sections(
    plan: Sequence[tuple[str, Section]],
    budget: Budget,
    *,
    after: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run each ``(name, section)`` in order and return ``{name: record}``.

    A record is the section's own dict with ``"status": "ok"`` and ``"seconds"``; or
    ``{"status": "error", "error", "traceback", "seconds"}`` when it raised (the next
    section runs all the same); or ``{"status": "skipped", "reason"}`` once ``budget``
    is spent. ``after`` runs after every section that ran (freeing GPU memory)."""
    out: dict[str, dict[str, Any]] = {}
    for name, section in plan:
        if budget.exceeded():
            out[name] = {"status": "skipped", "reason": budget.skip_reason(f"section {name!r}")}
            log(f"[{name}] skipped: {out[name]['reason']}")
            continue
        log(f"[{name}] starting at {budget.elapsed():.0f} s")
        t0 = time.perf_counter()
        try:
            result = section()
        except Exception as e:  # a section's failure is a result; the run goes on
            out[name] = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
                "seconds": time.perf_counter() - t0,
            }
            log(f"[{name}] failed: {out[name]['error']}")
        else:
            out[name] = {"status": "ok", "seconds": time.perf_counter() - t0, **result}
            log(f"[{name}] done in {out[name]['seconds']:.1f} s")
        if after is not None:
            after()
    return out


def problems(sections: dict[str, dict[str, Any]]) -> list[str]:
    """What in a run's sections needs a person's attention (empty: all well). Sections
    skipped for the budget are not problems; the results say they were skipped."""
    found = []
    for name, record in sections.items():
        if record.get("status") == "error":
            found.append(f"section {name}: {record['error']}")
            continue
        if name == "tests":
            totals = record.get("totals", {})
            if (
                record.get("returncode") not in (0, None)
                or totals.get("failed")
                or totals.get("errors")
            ):
                found.append(
                    f"tests: {totals.get('failed', 0)} failed, {totals.get('errors', 0)} "
                    f"errors, pytest exit {record.get('returncode')}"
                    + (f" ({record['timeout']})" if record.get("timeout") else "")
                )
        for violation in record.get("violations", []):
            found.append(f"{name}: {violation}")
        for error in record.get("errors", []):
            found.append(f"{name}: {error}")
    return found


# ---------------------------------------------------------------- recipes on a device
def device_recipes(
    capability: cuda_gemm.Capability, out_dtype: torch.dtype = torch.bfloat16
) -> tuple[list[str], dict[str, str]]:
    """The recipes whose three GEMMs a GPU of ``capability`` runs on ``F.scaled_mm``
    with ``out_dtype`` outputs (bf16: the training path under autocast), and for the
    others the first reason the route gives."""
    taken, not_taken = [], {}
    for name in RECIPE_NAMES:
        for gemm, (a, b) in cuda_gemm.gemm_specs(Recipe.from_name(name)).items():
            chosen = cuda_gemm.route(a, b, out_dtype, capability)
            if not chosen.hardware:
                not_taken[name] = f"{gemm}: {chosen.reason}"
                break
        else:
            taken.append(name)
    return taken, not_taken


# ---------------------------------------------------------------- timing
def time_on_device(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> dict[str, Any]:
    """``fn`` run ``warmup`` times untimed, then ``repeats`` times timed; returns
    ``{"median_s", "min_s", "times_s"}`` as ``_common.time_median`` does. On CUDA each
    run is timed by a pair of CUDA events around it (GPU time from the first kernel
    queued to the last one done, without a synchronisation per run, which would time
    the launch latency too); elsewhere by ``time.perf_counter``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]  # ms -> s
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- section: tests
def junit_counts(xml_path: Path, files: Sequence[str]) -> dict[str, Any]:
    """Per test file and in total: passed, failed, errors and skipped test cases of a
    pytest ``--junitxml`` report, and the first failures' ids. A case belongs to the
    file whose dotted module path starts its ``classname``."""
    modules = {f: f.removesuffix(".py").replace("/", ".").replace("\\", ".") for f in files}
    zero = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    per_file: dict[str, dict[str, int]] = {f: dict(zero) for f in files}
    failures: list[str] = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        owner = next(
            (
                f
                for f, mod in modules.items()
                if classname == mod or classname.startswith(mod + ".")
            ),
            "other",
        )
        counts = per_file.setdefault(owner, dict(zero))
        tags = {child.tag for child in case}
        if "failure" in tags:
            counts["failed"] += 1
        elif "error" in tags:
            counts["errors"] += 1
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
        if tags & {"failure", "error"} and len(failures) < 20:
            failures.append(f"{classname}::{case.get('name')}")
    totals = {k: sum(c[k] for c in per_file.values()) for k in zero}
    return {"per_file": per_file, "totals": totals, "failures": failures}


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """:data:`CUDA_TESTS`, then every other test file under ``tests/`` that skips itself
    whole without CUDA (``pytestmark = pytest.mark.skipif(not torch.cuda.is_available()
    ...``): what only a GPU can check."""
    marked = [
        path.relative_to(root).as_posix()
        for path in sorted((root / "tests").rglob("test_*.py"))
        if _CUDA_ONLY.search(path.read_text(encoding="utf-8"))
    ]
    return list(dict.fromkeys([*CUDA_TESTS, *marked]))


def tests_section(
    files: Sequence[str] | None = None,
    *,
    root: Path = ROOT,
    timeout_s: float = 240.0,
    workers: int = 4,
) -> dict[str, Any]:
    """Run ``files`` with pytest in a child process (the repository's ``src`` on its
    path) and count the results. ``workers``: pytest-xdist processes where it is
    installed (0: none). Four share the one GPU, each with its own CUDA context, and
    compile the kernels of tests/test_kernels_cuda.py in parallel; the project's own
    ``-n auto`` (addopts, cleared here) would start one per CPU core. ``files``:
    :func:`cuda_test_files` by default."""
    files = cuda_test_files(root) if files is None else files
    env = dict(os.environ)
    src = str(root / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        parallel = ["-n", str(workers)] if workers and importlib.util.find_spec("xdist") else []
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-o",
            "addopts=",
            *parallel,
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            *files,
        ]
        record: dict[str, Any] = {"command": " ".join(command[1:]), "files": list(files)}
        # A session of its own, so that a timeout ends pytest's xdist workers too.
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            record["returncode"] = None
            record["timeout"] = f"pytest killed after {timeout_s:.0f} s"
        record["output_tail"] = output[-3000:]
        if xml.exists():
            record.update(junit_counts(xml, files))
        else:
            record["totals"] = {"passed": 0, "failed": 0, "errors": 1, "skipped": 0}
    return record


# ---------------------------------------------------------------- section: gemm
def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def bitwise(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Whether ``x`` and ``y`` hold the same bits (dtype and shape too), and the fraction
    of elements that do (``-0`` differs from ``+0``; NaNs are compared by bits too: no
    NaN is expected here)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return {"bitwise": False, "equal_fraction": 0.0}
    same = _int_view(x) == _int_view(y)
    return {"bitwise": bool(same.all()), "equal_fraction": float(same.double().mean())}


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Normwise relative errors of ``x`` against ``ref``, in float64: ``max_rel`` =
    max |x - ref| / max |ref| and ``mean_rel`` = mean |x - ref| / mean |ref| (an
    elementwise ratio would be dominated by outputs near zero, where cancellation, not
    the GEMM, decides). A zero ``ref`` gives the absolute errors."""
    diff = (x.double() - ref.double()).abs()
    mag = ref.double().abs()
    peak, mean = float(mag.max()), float(mag.mean())
    return {
        "max_rel": float(diff.max()) / (peak if peak > 0 else 1.0),
        "mean_rel": float(diff.mean()) / (mean if mean > 0 else 1.0),
    }


def gemm_operands(
    spec_a: ScaleSpec,
    spec_b: ScaleSpec,
    shape: Shape,
    *,
    exact: bool,
    device: torch.device,
    seed: int = 0,
) -> tuple[ScaledTensor, ScaledTensor]:
    """``a (M, K)`` quantised with ``spec_a`` and ``b (K, N)`` with ``spec_b`` (built as
    ``(N, K)`` with the transposed spec, the way the layers hold weights, then ``.t()``).

    ``exact``: integers in [-4, 4]. Every recipe that has a hardware route scales by
    powers of two, and a small integer times a power of two is an FP8 value (E4M3 and
    E5M2 hold 1, 2, 3, 4 at every binade the scale can choose), so the dequantised
    operands are the integers themselves (checked here). Every product is then an
    integer, and with K = 256 every partial sum is an integer of magnitude at most
    16 * 256 = 2^12 whatever the summation order: exact in an accumulator of 13
    significand bits or more (fp32 has 24; Hopper's FP8 tensor cores keep about 14,
    DeepSeek-V3 section 3.3.2), scaled by powers of two (exact), then rounded once to
    the output dtype. Hardware, emulation and float64 must then agree bit for bit.
    Otherwise: normal values whose rows span 2^-4 .. 2^4, so row, block and MX scales
    differ across the tensor."""
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(rows: int, cols: int) -> torch.Tensor:
        if exact:
            return torch.randint(-4, 5, (rows, cols), generator=gen, device=device).float()
        spread = torch.exp2(torch.randint(-4, 5, (rows, 1), generator=gen, device=device))
        return torch.randn(rows, cols, generator=gen, device=device) * spread

    a, b_t = draw(m, k), draw(n, k)
    qa = fp8train.quantize(a, spec_a, name="a")
    qb = fp8train.quantize(b_t, spec_b.transposed(), name="b").t()
    if qb.spec != spec_b:
        raise ValueError(f"b's spec after transposing is {qb.spec}, expected {spec_b}")
    if exact:
        for name, q, values in (("a", qa, a), ("b", qb, b_t.t())):
            if not torch.equal(q.dequantize(torch.float64), values.double()):
                raise AssertionError(
                    f"exact case: {name} ({q.spec.describe()}) does not dequantise to its "
                    "integers, so the exactness argument does not apply"
                )
    return qa, qb


Hardware = Callable[[ScaledTensor, ScaledTensor, torch.dtype], torch.Tensor]


def compare_gemm(
    qa: ScaledTensor, qb: ScaledTensor, out_dtype: torch.dtype, hardware: Hardware
) -> dict[str, Any]:
    """The hardware GEMM, the emulation and float64 on the same quantised operands:
    relative errors of each against float64, and of the hardware against the emulation
    with their bitwise comparison."""
    ref = qa.dequantize(torch.float64) @ qb.dequantize(torch.float64)
    hw = hardware(qa, qb, out_dtype)
    emu = fp8train.scaled_mm(qa, qb, out_dtype=out_dtype, backend="emulate")
    if hw.shape != ref.shape or hw.dtype != out_dtype:
        raise AssertionError(
            f"hardware GEMM gave {tuple(hw.shape)} {hw.dtype}, expected "
            f"{tuple(ref.shape)} {out_dtype}"
        )
    return {
        "hardware_vs_float64": relative_errors(hw, ref),
        "emulation_vs_float64": relative_errors(emu, ref),
        "hardware_vs_emulation": {**relative_errors(hw, emu), **bitwise(hw, emu)},
        # float64 rounded once to the output dtype (through fp32 when bf16: a second
        # rounding, except where the sums are exact, as in the exact case)
        "hardware_vs_float64_rounded": bitwise(hw, ref.to(out_dtype)),
    }


def scaled_mm_on_device(qa: ScaledTensor, qb: ScaledTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``fp8train.scaled_mm`` forced onto the hardware route (``backend="scaled_mm"``
    raises where the GPU cannot take the operands rather than emulating)."""
    return fp8train.scaled_mm(qa, qb, out_dtype=out_dtype, backend="scaled_mm", label="gpu.py")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gemm_section(
    device: torch.device,
    capability: cuda_gemm.Capability,
    cases: dict[str, Shape],
    *,
    hardware: Hardware = scaled_mm_on_device,
    recipes: Sequence[str] = RECIPE_NAMES,
    out_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32),
) -> dict[str, Any]:
    """Every GEMM (output, grad_input, grad_weight) of every recipe, each output dtype
    and each case of :func:`gemm_operands`, where ``capability`` routes it to the
    hardware; the others are listed with the route's reason. ``violations`` lists the
    exact cases where hardware, emulation and float64 are not bitwise equal."""
    # The emulation promises fp32 accumulation of exact operands. On CUDA it multiplies
    # with cuBLAS, which by default may reduce split-K partial sums of a bf16 GEMM in
    # bf16, and rounds fp32 operands to TF32 where TF32 is allowed: both off here.
    # Only on CUDA: on a CPU-only build, setting these flags (even back to their values)
    # leaves inductor unable to trace the compiled quantisation kernels afterwards.
    matmul_flags = torch.backends.cuda.matmul
    saved = (matmul_flags.allow_bf16_reduced_precision_reduction, matmul_flags.allow_tf32)
    on_cuda = device.type == "cuda"
    if on_cuda:
        matmul_flags.allow_bf16_reduced_precision_reduction = False
        matmul_flags.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    violations: list[str] = []
    try:
        for name in recipes:
            for gemm, (spec_a, spec_b) in cuda_gemm.gemm_specs(Recipe.from_name(name)).items():
                for out_dtype in out_dtypes:
                    chosen = cuda_gemm.route(spec_a, spec_b, out_dtype, capability)
                    head = {
                        "recipe": name,
                        "gemm": gemm,
                        "out_dtype": _dtype_name(out_dtype),
                        "route": chosen.describe(),
                    }
                    if not chosen.hardware:
                        rows.append({**head, "hardware": False})
                        continue
                    for case, shape in cases.items():
                        exact = case == "exact"
                        qa, qb = gemm_operands(spec_a, spec_b, shape, exact=exact, device=device)
                        result = compare_gemm(qa, qb, out_dtype, hardware)
                        row = {**head, "hardware": True, "case": case, "shape": list(shape)}
                        row.update(result)
                        if exact:
                            row["must_be_bitwise"] = True
                            held = (
                                result["hardware_vs_emulation"]["bitwise"]
                                and result["hardware_vs_float64_rounded"]["bitwise"]
                            )
                            if not held:
                                violations.append(
                                    f"{name} {gemm} {row['out_dtype']} exact case: hardware, "
                                    "emulation and float64 differ "
                                    f"(hardware vs emulation max_rel "
                                    f"{result['hardware_vs_emulation']['max_rel']:.3g})"
                                )
                        rows.append(row)
    finally:
        if on_cuda:
            matmul_flags.allow_bf16_reduced_precision_reduction, matmul_flags.allow_tf32 = saved
    return {
        "capability": list(capability),
        "cases": {c: list(s) for c, s in cases.items()},
        "rows": rows,
        "violations": violations,
    }


# ---------------------------------------------------------------- section: linear
TORCHAO_RECIPES = ("tensorwise", "rowwise")


def torchao_status() -> tuple[bool, str]:
    """Whether torchao's float8 training imports here, and its version or why not."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except ModuleNotFoundError:
        return False, "not installed"
    except Exception as e:  # installed but broken against this torch, say
        return False, f"import failed: {type(e).__name__}: {e}"
    try:
        return True, metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return True, "unknown version"


def _torchao_module(base: nn.Module, recipe: str) -> nn.Module:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    return convert_to_float8_training(
        copy.deepcopy(base), config=Float8LinearConfig.from_recipe_name(recipe)
    )


def variant_module(base: nn.Module, variant: str, kernels: KernelChoice = "auto") -> nn.Module:
    """A copy of ``base`` for one variant: ``"bf16"`` (as is, run under autocast), an
    fp8train recipe name (``fp8train.convert`` with its defaults; ``kernels`` for the
    CPU tests, which leave compilation out) or ``"torchao <recipe>"``
    (``torchao.float8.convert_to_float8_training``)."""
    if variant == "bf16":
        return copy.deepcopy(base)
    if variant.startswith("torchao "):
        return _torchao_module(base, variant.removeprefix("torchao "))
    return fp8train.convert(copy.deepcopy(base), variant, kernels=kernels)


def kernel_modes(model: nn.Module, device: torch.device) -> str:
    modes = {layer.fp8_state.kernels.resolved(device) for _, layer in fp8train.nn.fp8_layers(model)}
    return ",".join(sorted(modes)) or "-"


def linear_variants(recipes: Sequence[str], torchao: bool) -> list[str]:
    """bf16, then each recipe followed by torchao's of the same name where there is one:
    if the time budget cuts a shape short, the pairs timed so far are complete."""
    out = ["bf16"]
    for recipe in recipes:
        out.append(recipe)
        if torchao and recipe in TORCHAO_RECIPES:
            out.append(f"torchao {recipe}")
    return out


def time_linear(
    module: nn.Module,
    x: torch.Tensor,
    dy: torch.Tensor,
    *,
    autocast: bool,
    compile: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Forward + backward of ``module`` on ``x`` with output gradient ``dy``: the first
    call (compilation included) timed alone, then :func:`time_on_device`."""
    device = x.device
    if compile:
        # Each variant compiles afresh: no variant meets dynamo's recompile limit (the
        # variants share nn.Sequential.forward) or dims made dynamic by an earlier shape.
        torch._dynamo.reset()
    run = torch.compile(module, dynamic=False) if compile else module
    x = x.detach().requires_grad_()
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = run(x)
        y.backward(dy.to(y.dtype))

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    timing = time_on_device(step, device, warmup=warmup, repeats=repeats)
    return {"first_call_s": first, **timing}


def linear_section(
    device: torch.device,
    recipes: Sequence[str],
    shapes: Sequence[Shape],
    budget: Budget,
    *,
    warmup: int,
    repeats: int,
    compile: bool = True,
    torchao: bool = True,
    kernels: KernelChoice = "auto",
) -> dict[str, Any]:
    """One bias-free Linear (fp32 master weight, bf16 autocast, bf16 input and output
    gradient) per ``(M, K, N)``: bf16, each fp8train recipe and torchao's tensorwise
    and rowwise float8, forward + backward under ``torch.compile``. A variant that
    fails is recorded with its error; torchao's is retried with bf16 weights and no
    autocast (its own benchmarks' setting) before that."""
    has_torchao, torchao_version = torchao_status() if torchao else (False, "not requested")
    variants = linear_variants(recipes, has_torchao)
    results: list[dict[str, Any]] = []
    skipped: list[list[int]] = []
    errors: list[str] = []
    for shape in shapes:
        if budget.exceeded():
            skipped.append(list(shape))
            continue
        m, k, n = shape
        gen = torch.Generator(device=device).manual_seed(0)
        base = nn.Sequential(nn.Linear(k, n, bias=False, device=device))
        x = torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16)
        dy = torch.randn(m, n, generator=gen, device=device, dtype=torch.bfloat16)
        row: dict[str, Any] = {"shape": [m, k, n], "variants": {}}
        for variant in variants:
            if budget.exceeded():
                row["variants"][variant] = {"skipped": budget.skip_reason(variant)}
                continue
            record: dict[str, Any] = {}
            attempts = [("fp32 weights, bf16 autocast", False)]
            if variant.startswith("torchao "):
                attempts.append(("bf16 weights, no autocast", True))
            for setting, bf16_weights in attempts:
                try:
                    source = copy.deepcopy(base).to(torch.bfloat16) if bf16_weights else base
                    model = variant_module(source, variant, kernels)
                    timing = time_linear(
                        model,
                        x,
                        dy,
                        autocast=not bf16_weights,
                        compile=compile,
                        warmup=warmup,
                        repeats=repeats,
                    )
                    record.update(setting=setting, kernels=kernel_modes(model, device), **timing)
                    record["median_ms"] = 1e3 * timing["median_s"]
                    record["tflops"] = 6 * m * k * n / timing["median_s"] / 1e12
                    break
                except Exception as e:
                    record.setdefault("failed_settings", {})[setting] = f"{type(e).__name__}: {e}"
                finally:
                    source = model = None
                    free_memory()
            if "median_s" not in record:
                errors.append(f"{variant} at {shape}: {record['failed_settings']}")
            row["variants"][variant] = record
        bf16 = row["variants"]["bf16"].get("median_s")
        for record in row["variants"].values():
            if bf16 and "median_s" in record:
                record["vs_bf16"] = record["median_s"] / bf16
        results.append(row)
        del base, x, dy
        free_memory()
    return {
        "what": "one bias-free Linear, forward + backward; TFLOP/s count its 3 GEMMs "
        "(6*M*K*N); under torch.compile an fp8train layer is a graph break by design, "
        "running its own compiled quantisation kernels (fp8train/nn.py)",
        "compile": compile,
        "torchao": torchao_version,
        "variants": variants,
        "results": results,
        "skipped_for_budget": skipped,
        "errors": errors,
    }


# ---------------------------------------------------------------- planner vs measured
# torch.cuda.get_device_name -> the planner's GPU table key, with the compute capability
# major the part reports (ROCm reports gfx942 as 9.4). First match wins. Parts whose
# clocks, memory or links differ from every row (H100 NVL, H200 NVL, GH200, H800, A100)
# match nothing and get no planner entry: the nearest row would be a guess.
PLANNER_GPUS: tuple[tuple[str, str, int], ...] = (
    (r"\bH100\b.*\bPCIe\b", "h100-pcie", 9),
    (r"\bH100\b.*\b(SXM\d?|HBM3)\b", "h100-sxm", 9),  # "NVIDIA H100 80GB HBM3"
    (r"\bH200\b(?!.*\bNVL\b)", "h200", 9),
    (r"\bB200\b", "b200", 10),  # \b: "GB200" is not a B200
    (r"\bB300\b", "b300", 10),
    (r"\bGB200\b", "gb200", 10),
    (r"\bL40S\b", "l40s", 8),
    (r"\bMI300X\b", "mi300x", 9),
    (r"\bMI325X\b", "mi325x", 9),
)


def planner_target(name: str, capability: str) -> dict[str, Any]:
    """``{"gpu": key, "note": ...}``: the planner's table key (``fp8train.planner.GPUS``)
    for the GPU torch names ``name`` with compute capability ``capability`` ("9.0"), or
    ``"gpu": None`` and a note saying there is no planner entry (no pattern matches, or
    the capability is not the part's)."""
    for pattern, key, major in PLANNER_GPUS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if capability.split(".")[0] != str(major):
                return {
                    "gpu": None,
                    "note": f"no planner entry: {name!r} reads as {key} but reports compute "
                    f"capability {capability}, not {major}.x",
                }
            return {"gpu": key, "note": f"planner row {key} ({GPUS[key].label})"}
    return {
        "gpu": None,
        "note": f"no planner entry for {name!r} (compute capability {capability}); "
        f"the planner knows {', '.join(GPUS)}",
    }


def planner_error(predicted: float, measured: float) -> float:
    """``predicted / measured - 1``: +0.10 when the planner says 10% more than measured."""
    if not measured > 0:
        raise ValueError(f"a measured value must be > 0 to compare against, got {measured}")
    return predicted / measured - 1


def _comparison(
    predicted: tuple[float, float], measured: tuple[float | None, float | None]
) -> dict[str, Any]:
    """The fields of one planner row from predicted and measured (bf16, FP8) times in
    ms; the measured ones and the errors are None where a time is missing."""
    (p_bf16, p_fp8), (m_bf16, m_fp8) = predicted, measured
    speedup = m_bf16 / m_fp8 if m_bf16 is not None and m_fp8 is not None else None
    return {
        "predicted_bf16_ms": p_bf16,
        "predicted_fp8_ms": p_fp8,
        "predicted_speedup": p_bf16 / p_fp8,
        "measured_bf16_ms": m_bf16,
        "measured_fp8_ms": m_fp8,
        "measured_speedup": speedup,
        "error": planner_error(p_bf16 / p_fp8, speedup) if speedup is not None else None,
        "bf16_ms_error": planner_error(p_bf16, m_bf16) if m_bf16 is not None else None,
        "fp8_ms_error": planner_error(p_fp8, m_fp8) if m_fp8 is not None else None,
    }


def planner_vs_linear(linear: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The planner against the ``linear`` section's record: per shape and per FP8
    variant (an fp8train recipe, or torchao's of that recipe name),
    :func:`fp8train.planner.plan_linear` on ``target["gpu"]`` beside the measured
    medians, with ``error`` (speed-up) and the time errors; no rows without a planner
    entry. A variant not measured, or one the planner says this GPU cannot run, has its
    errors None and a ``note``."""
    rows: list[dict[str, Any]] = []
    if target["gpu"] is not None:
        for result in linear.get("results", []):
            m, k, n = result["shape"]
            bf16 = result["variants"].get("bf16", {}).get("median_s")
            for variant, record in result["variants"].items():
                if variant == "bf16":
                    continue
                recipe = variant.removeprefix("torchao ")
                row: dict[str, Any] = {"shape": [m, k, n], "layer": variant, "recipe": recipe}
                try:
                    plan = plan_linear(m, k, n, gpu=target["gpu"], recipe=recipe)
                except ValueError as e:  # a recipe the planner does not know
                    rows.append({**row, "note": f"no prediction: {e}"})
                    continue
                fp8 = record.get("median_s")
                row.update(
                    _comparison(
                        (plan.bf16_ms, plan.fp8_ms),
                        (
                            None if bf16 is None else 1e3 * bf16,
                            None if fp8 is None else 1e3 * fp8,
                        ),
                    )
                )
                if not plan.supported:
                    row.update(error=None, fp8_ms_error=None, note=f"planner: {plan.reason}")
                elif fp8 is None or bf16 is None:
                    row["note"] = "not measured (skipped or failed)"
                rows.append(row)
    return {
        **target,
        "what": "fp8train.planner.plan_linear for each shape and FP8 variant against the "
        "measured medians; error = predicted / measured - 1 (speed-up, and each time)",
        "rows": rows,
    }


def plan_train_step(
    model: nn.Module,
    tokens: torch.Tensor,
    gpu: str,
    recipe: str,
    bf16_ms: float,
    fp8_ms: float | None,
) -> dict[str, Any]:
    """One model's planner row: :func:`fp8train.planner.plan_model` with the measured
    bf16 step as ``bf16_step_ms`` (the time outside the Linears is then measured, not
    modelled) and every layer ``convert`` takes in FP8 (``step_all``), against the
    measured FP8 step."""
    step = plan_model(model, tokens, gpu=gpu, recipe=recipe, bf16_step_ms=bf16_ms).step_all
    row = {"recipe": recipe, **_comparison((step.bf16_ms, step.fp8_ms), (bf16_ms, fp8_ms))}
    if fp8_ms is None:
        row["note"] = "not measured (skipped or failed)"
    return row


# ---------------------------------------------------------------- section: train
def build_gpt(size: GptSize) -> nn.Module:
    from fp8train.lab.gpt import GPT

    return GPT(
        vocab=size.vocab, seq=size.seq, d_model=size.d_model, layers=size.layers, heads=size.heads
    )


def build_llama(size: LlamaSize) -> nn.Module:
    """A Llama-style decoder from its config, no download (as benchmarks/default_path.py
    builds its small Llama), at the block widths of ``size``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.seq,
    )
    return LlamaForCausalLM(config)


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def time_train_step(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """AdamW steps of ``model`` (fp32 master weights, bf16 autocast, cross-entropy on
    fp32 logits): the first step timed alone (the FP8 kernels compile in it), then
    :func:`time_on_device`, and the peak memory allocated over the timed steps."""
    device = tokens.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = _logits(model, tokens)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_on_device(step, device, warmup=warmup, repeats=repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"first_step_s": first, "peak_memory_gib": peak, **timing}


def train_section(
    device: torch.device,
    recipes: Sequence[str],
    models: dict[str, tuple[Callable[[], nn.Module], int, int, int]],
    budget: Budget,
    *,
    warmup: int,
    repeats: int,
    kernels: KernelChoice = "auto",
    planner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A train step of each model (``name: (build, vocab, batch, seq)``) for bf16 and
    each recipe (``fp8train.convert`` with its defaults), one after another on fresh
    copies of the same initial weights. ``planner`` (:func:`planner_target`'s record):
    the result's ``"planner"`` then holds, per model and recipe, the planner's step
    prediction from the measured bf16 step (:func:`plan_train_step`)."""
    results: list[dict[str, Any]] = []
    planned: list[dict[str, Any]] = []
    skipped: list[str] = []
    errors: list[str] = []
    for name, (build, vocab, batch, seq) in models.items():
        if budget.exceeded():
            skipped.append(name)
            continue
        torch.manual_seed(0)
        try:
            base = build().to(device)
        except Exception as e:
            errors.append(f"{name}: building the model failed: {type(e).__name__}: {e}")
            results.append({"model": name, "error": errors[-1]})
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
        targets = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
        n_linear = sum(isinstance(m, nn.Linear) for m in base.modules())
        row: dict[str, Any] = {
            "model": name,
            "tokens_per_step": batch * seq,
            "parameters": sum(p.numel() for p in base.parameters()),
            "variants": {},
        }
        for variant in ["bf16", *recipes]:
            if budget.exceeded():
                row["variants"][variant] = {"skipped": budget.skip_reason(variant)}
                continue
            try:
                model = variant_module(base, variant, kernels)
                timing = time_train_step(model, tokens, targets, warmup=warmup, repeats=repeats)
                n_fp8 = sum(1 for _ in fp8train.nn.fp8_layers(model))
                row["variants"][variant] = {
                    "fp8_linears": f"{n_fp8}/{n_linear}",
                    "kernels": kernel_modes(model, device),
                    "median_ms": 1e3 * timing["median_s"],
                    **timing,
                }
            except Exception as e:
                errors.append(f"{name} {variant}: {type(e).__name__}: {e}")
                row["variants"][variant] = {"error": errors[-1]}
            finally:
                model = None
                free_memory()
        bf16 = row["variants"]["bf16"].get("median_s")
        for record in row["variants"].values():
            if bf16 and "median_s" in record:
                record["vs_bf16"] = record["median_s"] / bf16
        results.append(row)
        gpu_key = planner["gpu"] if planner else None
        if gpu_key is not None:
            for recipe in recipes:
                fp8 = row["variants"].get(recipe, {}).get("median_s")
                fp8_ms = None if fp8 is None else 1e3 * fp8
                try:
                    if not bf16:
                        raise ValueError("the bf16 step was not measured")
                    p = plan_train_step(base, tokens, gpu_key, recipe, 1e3 * bf16, fp8_ms)
                except Exception as e:  # the planner's failure is a result too
                    p = {"recipe": recipe, "note": f"no prediction: {type(e).__name__}: {e}"}
                planned.append({"model": name, **p})
        del base
        free_memory()
    out: dict[str, Any] = {
        "what": "AdamW train step, fp32 master weights, bf16 autocast, eager model "
        "(the FP8 layers' quantisation kernels compiled: convert's default kernels='auto')",
        "results": results,
        "skipped_for_budget": skipped,
        "errors": errors,
    }
    if planner is not None:
        out["planner"] = {
            **planner,
            "what": "fp8train.planner.plan_model with the measured bf16 step as "
            "bf16_step_ms, every layer convert takes in FP8, against the measured step; "
            "error = predicted / measured - 1",
            "rows": planned,
        }
    return out


def train_models(s: Sizes) -> dict[str, tuple[Callable[[], nn.Module], int, int, int]]:
    g, ll = s.gpt, s.llama
    return {
        f"lab GPT d_model {g.d_model}, {g.layers} layers": (
            lambda: build_gpt(g),
            g.vocab,
            g.batch,
            g.seq,
        ),
        f"Llama-style block, hidden {ll.hidden}, {ll.layers} layer(s)": (
            lambda: build_llama(ll),
            ll.vocab,
            ll.batch,
            ll.seq,
        ),
    }


# ---------------------------------------------------------------- environment, results
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver(index: int) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def gpu_info(device: torch.device) -> dict[str, Any]:
    """The GPU and the CUDA stack under it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    _, torchao_version = torchao_status()
    return {
        "name": props.name,
        "compute_capability": f"{major}.{minor}",
        "memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_driver(index),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchao": torchao_version,
        "transformers": _version("transformers"),
    }


def run_benchmark(
    args: argparse.Namespace,
    device: torch.device,
    capability: cuda_gemm.Capability,
    gpu: dict[str, Any],
    *,
    chosen: Sizes | None = None,
    hardware: Hardware = scaled_mm_on_device,
    compile: bool = True,
    kernels: KernelChoice = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The sections ``args`` asks for on ``device``, and the results file's body.
    gpu.py passes the GPU; the CPU tests pass the CPU, tiny ``chosen`` sizes, torch's CPU
    scaled GEMM as ``hardware``, no compilation and the eager kernels."""
    budget = Budget(args.budget_s)
    recipes, not_taken = device_recipes(capability)
    target = planner_target(gpu["name"], gpu["compute_capability"])
    s = chosen or sizes(args.quick)
    log(f"recipes on F.scaled_mm here: {', '.join(recipes) or 'none'}")
    for name, reason in not_taken.items():
        log(f"  not here: {name}: {reason}")
    plan: dict[str, Section] = {
        "tests": lambda: tests_section(timeout_s=max(30.0, min(240.0, budget.left()))),
        "gemm": lambda: gemm_section(device, capability, s.gemm_cases, hardware=hardware),
        "linear": lambda: linear_section(
            device,
            recipes,
            s.linear_shapes,
            budget,
            warmup=s.linear_warmup,
            repeats=s.linear_repeats,
            compile=compile,
            kernels=kernels,
        ),
        "train": lambda: train_section(
            device,
            recipes,
            train_models(s),
            budget,
            warmup=s.train_warmup,
            repeats=s.train_repeats,
            kernels=kernels,
            planner=target,
        ),
    }
    sections = run_sections(
        [(name, plan[name]) for name in args.sections], budget, after=free_memory, log=log
    )
    log(f"planner: {target['note']}")
    linear = sections.get("linear", {})
    if linear.get("status") == "ok":
        try:  # after the timings: a failure here must not lose them
            linear["planner"] = planner_vs_linear(linear, target)
        except Exception as e:
            linear["planner"] = {**target, "error": f"{type(e).__name__}: {e}", "rows": []}
    return payload(args, s, gpu, recipes, not_taken, sections, budget.elapsed())


def payload(
    args: argparse.Namespace,
    chosen: Sizes,
    gpu: dict[str, Any],
    recipes: Sequence[str],
    not_taken: dict[str, str],
    sections: dict[str, dict[str, Any]],
    elapsed_s: float,
) -> dict[str, Any]:
    """The results file's body (``_common.write_results`` adds the environment)."""
    return {
        "config": {
            "quick": args.quick,
            "sections": list(args.sections),
            "budget_s": args.budget_s,
            "sizes": asdict(chosen),
        },
        "gpu": gpu,
        "recipes": {"run": list(recipes), "not_on_this_gpu": not_taken},
        "sections": {name: sections.get(name, {"status": "not requested"}) for name in SECTIONS},
        "problems": problems(sections),
        "elapsed_s": elapsed_s,
    }


def write(name: str, body: dict[str, Any], results_dir: Path) -> Path:
    """``results_dir/<name>.json`` with the environment (``_common.write_results``). A
    GPU machine may get the checkout without its git history: ``FP8TRAIN_COMMIT`` in
    the environment then names the commit."""
    env = _common.environment()
    if not env["versions"].get("git_commit") and os.environ.get("FP8TRAIN_COMMIT"):
        env["versions"]["git_commit"] = os.environ["FP8TRAIN_COMMIT"] + " (FP8TRAIN_COMMIT)"
    return _common.write_results(name, {"environment": env, **body}, results_dir)


def summary(body: dict[str, Any]) -> str:
    """The run in a few plain-text tables, for the console."""
    parts = []
    for name, record in body["sections"].items():
        status = record.get("status")
        line = f"{name}: {status}"
        if status == "ok" and name == "tests":
            line += f" {record.get('totals')}"
        elif status in ("error", "skipped"):
            line += f" ({record.get('error') or record.get('reason')})"
        parts.append(line)

    def ms(t: dict[str, Any]) -> object:
        if "median_s" in t:
            return 1e3 * t["median_s"]
        return "skipped" if "skipped" in t else "failed"

    linear = body["sections"].get("linear", {})
    rows = [
        [
            "x".join(map(str, r["shape"])),
            v,
            ms(t),
            t.get("vs_bf16", "-"),
        ]
        for r in linear.get("results", [])
        for v, t in r["variants"].items()
    ]
    if rows:
        parts.append("\n" + _common.format_table(["shape", "layer", "median ms", "vs bf16"], rows))
    train = body["sections"].get("train", {})
    rows = [
        [r["model"], v, ms(t), t.get("vs_bf16", "-")]
        for r in train.get("results", [])
        for v, t in r.get("variants", {}).items()
    ]
    if rows:
        parts.append(
            "\n" + _common.format_table(["model", "precision", "median ms", "vs bf16"], rows)
        )
    for name, first in (("linear", "shape"), ("train", "model")):
        planner = body["sections"].get(name, {}).get("planner")
        if not planner:
            continue
        rows = [
            [
                "x".join(map(str, r["shape"])) if "shape" in r else r["model"],
                r.get("layer", r["recipe"]),
                r.get("predicted_speedup", "-"),
                r.get("measured_speedup") or "-",
                "-" if r.get("error") is None else f"{100 * r['error']:+.0f}%",
            ]
            for r in planner["rows"]
        ]
        parts.append(f"\n{name}, planner vs measured: {planner['note']}")
        if rows:
            parts.append(
                _common.format_table([first, "layer", "predicted x", "measured x", "error"], rows)
            )
    return "\n".join(parts)
