"""fp8train.distributed.comm_hooks on 2 gloo ranks: bytes on the wire against DDP's
fp32 and bf16 hooks, the averaged gradient's error, and identical replicas."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_harness import run_ranks

from fp8train.distributed.comm_hooks import Fp8CommState
from fp8train.testing import assert_bitwise_equal

WORLD = 2
STEPS = 2
# Two E4M3 roundings (each rank's gradient, then the average), each at most 2^-4
# relative for an element in its block's normal range, far less in RMS over a block.
MAX_GRAD_REL_ERR = 2.0**-4
# bf16's one rounding: 2^-9 relative per element.
MAX_BF16_REL_ERR = 2.0**-8


def _sent(counts: dict[str, int], world: int) -> float:
    """Bytes one rank sends, by the usual algorithm of each collective: a ring
    all-reduce sends 2 (W - 1) / W of its tensor, an all-to-all the (W - 1) / W that other
    ranks own, a ring all-gather its input to the W - 1 others."""
    return (
        counts["all_reduce"] * 2 * (world - 1) / world
        + counts["all_to_all_single"] * (world - 1) / world
        + counts["all_gather_single"] * (world - 1)
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def hook_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    results = run_ranks(
        "comm_hook_bytes", tmp_path_factory.mktemp("hooks"), world=WORLD, steps=STEPS
    )
    return [r.value for r in results]


def test_fp8_hook_sends_a_quarter_of_fp32_bytes(hook_runs: list[Any]) -> None:
    run = hook_runs[0]
    sent = {k: _sent(run[k]["counts"], WORLD) for k in ("fp32", "bf16", "fp8")}
    n = run["parameters"]
    # fp32 all-reduce: 4 bytes per element both ways of the ring; bf16: 2.
    assert sent["fp32"] == pytest.approx(STEPS * 2 * (WORLD - 1) / WORLD * 4 * n, rel=0.01)
    assert sent["bf16"] == pytest.approx(sent["fp32"] / 2, rel=0.01)
    # FP8: 1 byte per element plus a 4-byte scale per 128 (and padding to whole blocks).
    ratio = sent["fp8"] / sent["fp32"]
    assert 0.25 < ratio < 0.25 * (1 + 4 / 128) * 1.02, sent
    hook = run["fp8"]["hook_state"]
    assert hook["payload"] + hook["scales"] == sent["fp8"]
    print(f"bytes sent per rank over {STEPS} steps, {n} parameters: {sent}")


def test_fp8_average_is_close_and_replicas_are_identical(hook_runs: list[Any]) -> None:
    ref, bf16, fp8 = (hook_runs[0][k]["grads"] for k in ("fp32", "bf16", "fp8"))
    for name, g in ref.items():
        assert _rel(bf16[name], g) < MAX_BF16_REL_ERR, name
        err = _rel(fp8[name], g)
        assert 0 < err < MAX_GRAD_REL_ERR, f"{name}: relative error {err:.4f}"
        print(f"{name}: bf16 {_rel(bf16[name], g):.2e}, fp8 {err:.2e}")
    for name in ref:
        assert_bitwise_equal(
            hook_runs[0]["fp8"]["params"][name], hook_runs[1]["fp8"]["params"][name]
        )


def test_state_validates() -> None:
    with pytest.raises(ValueError, match="1-byte"):
        Fp8CommState(fmt="e2m1")
    with pytest.raises(ValueError, match="block"):
        Fp8CommState(block=0)
    assert Fp8CommState(fmt="e5m2").spec.fmt.name == "e5m2"
