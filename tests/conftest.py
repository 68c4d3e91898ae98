"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker takes one thread, so that two workers on two cores
    do not oversubscribe them (no test depends on the thread count; the distributed
    tests set their own)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


# The slow tier: files whose tests train models, start processes or compile many
# kernels (most of a cold run's time). `pytest -m "not slow"` leaves them out for
# day-to-day work; CI runs everything. Each entry says why it is slow.
SLOW_FILES = {
    "tests/test_kernel_encoders.py": "compiles every encoder route over whole binades",
    "tests/test_kernels_in_layers.py": "compiles every recipe's kernels in real layers",
    "tests/test_models.py": "compiles and trains Hugging Face and nanoGPT models",
    "tests/numerics/test_training.py": "trains a model per recipe",
    "tests/distributed/": "starts torchrun process groups",
    "tests/lab/test_lab_resume.py": "trains and resumes lab runs per recipe",
    "tests/lab/test_lab_smoke.py": "runs the lab's comparison end to end",
    "tests/lab/test_lab_faults.py": "kills and resumes real lab processes",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix()
        if any(path.startswith(prefix) for prefix in SLOW_FILES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global generator before every test so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(params=["bf16", "fp32"])
def gemm_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both routes of the emulated GEMM (fp8train.matmul.gemm_dtype),
    whatever this CPU has: "bf16" as where bf16 GEMMs are native (AVX-512, AMX), "fp32"
    as where they are not (AVX2 only), so neither route goes untested on any machine."""
    import fp8train.matmul

    native = request.param == "bf16"
    monkeypatch.setattr(fp8train.matmul, "bf16_gemm_is_native", lambda device_type: native)
    return str(request.param)
