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
