"""Issue 31 on 2 gloo ranks: fp8train.distributed.comm_hooks (bytes on the wire against
DDP's fp32 and bf16 hooks, the averaged gradient's error, identical replicas) and
fp8train.Fp8AdamW under FSDP2 (bitwise the single-process run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dist_workers as w
import pytest
import torch
from dist_harness import run_ranks

from fp8train.distributed.comm_hooks import Fp8CommState
from fp8train.optim import Fp8AdamW
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


@pytest.fixture
def single_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_fp8_adamw_under_fsdp2_is_bitwise_the_single_process(
    tmp_path: Path, single_thread: None
) -> None:
    """Fp8AdamW steps each rank's shard; its row blocks make the shard's scales those of
    the whole parameter, so 2 FSDP2 ranks match one process bit for bit (gloo averages
    the two gradients exactly, as the single process does with two micro-batches)."""
    steps = 3
    ranks = run_ranks("fp8_adamw_train", tmp_path, world=WORLD, steps=steps)
    ref = w.fp8_adamw_train(steps, world=WORLD)
    for r in ranks:
        assert r.value["losses"] == ref["losses"]
        for name, value in ref["params"].items():
            assert_bitwise_equal(r.value["params"][name], value)
            for got, want in zip(r.value["moments"][name], ref["moments"][name], strict=True):
                assert_bitwise_equal(got, want)
    # Each rank holds half of the states (Net's rows split evenly over 2 ranks).
    total = Fp8AdamW.state_bytes_for(w.Net().parameters())
    assert sum(r.value["state_bytes"] for r in ranks) == total


def test_fsdp2_bf16_reduce_scatter_halves_the_bytes(tmp_path: Path) -> None:
    """FSDP2's gradient reduce-scatter in bf16 is MixedPrecisionPolicy(reduce_dtype=...),
    passed by fd.setup: half the bytes, one bf16 rounding of the reduced gradient."""
    run = run_ranks("fsdp2_reduce_scatter_bytes", tmp_path, world=WORLD)[0].value
    fp32, bf16 = run["fp32"], run["bf16"]
    assert fp32["counts"]["calls"] == bf16["counts"]["calls"] > 0
    assert bf16["counts"]["reduce_scatter"] * 2 == fp32["counts"]["reduce_scatter"]
    for name, g in fp32["grads"].items():
        assert _rel(bf16["grads"][name].float(), g) < MAX_BF16_REL_ERR, name
    print(f"reduce-scatter input bytes per rank: {fp32['counts']} (fp32), {bf16['counts']} (bf16)")
