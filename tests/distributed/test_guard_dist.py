"""fp8train.Guard on 2 gloo ranks (issue 32): the ranks take one decision."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_harness import run_ranks

from fp8train.testing import assert_bitwise_equal

FAULT_STEP = 6


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ranks_demote_the_same_layer_when_only_one_rank_sees_the_fault(
    tmp_path: Path, mode: str
) -> None:
    r0, r1 = (
        r.value
        for r in run_ranks("guard_agreement", tmp_path, steps=8, fault_step=FAULT_STEP, mode=mode)
    )
    # DDP's wrapper prefixes the layer names; FSDP2 shards the model in place.
    culprit = ("module." if mode == "ddp" else "") + r1["target"]
    # Rank 0 saw no culprit of its own; rank 1 named the layer; both demoted it.
    assert r0["diagnosed"] == [None] and r1["diagnosed"] == [culprit]
    assert r0["events"] == r1["events"] == [(FAULT_STEP, "demote", culprit)]
    assert r0["demoted"] == r1["demoted"] == [culprit]
    for k, v in r0["params"].items():
        assert_bitwise_equal(v, r1["params"][k])
