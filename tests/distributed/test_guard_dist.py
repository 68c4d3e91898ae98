"""fp8train.Guard on 2 gloo ranks (issue 32): the ranks take one decision."""

from __future__ import annotations

import math
from pathlib import Path

import dist_workers as w
import pytest
import torch
from dist_harness import run_ranks

from fp8train import Recipe, quantize
from fp8train.testing import assert_bitwise_equal

FAULT_STEP = 6


@pytest.mark.parametrize("ladder", [None, ["rowwise", "high"]])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ranks_demote_the_same_layer_when_only_one_rank_sees_the_fault(
    tmp_path: Path, mode: str, ladder: list[str] | None
) -> None:
    """Default ladder (high precision) and a finer recipe first: the same rung on both."""
    kw = {"steps": 8, "fault_step": FAULT_STEP, "mode": mode, "demote_to": ladder}
    r0, r1 = (r.value for r in run_ranks("guard_agreement", tmp_path, **kw))
    to = "high" if ladder is None else ladder[0]
    assert r0["to"] == r1["to"] == [to]
    assert r0["recipes"] == r1["recipes"]
    # DDP's wrapper prefixes the layer names; FSDP2 shards the model in place.
    culprit = ("module." if mode == "ddp" else "") + r1["target"]
    # Rank 0 saw no culprit of its own; rank 1 named the layer; both demoted it.
    assert r0["diagnosed"] == [None] and r1["diagnosed"] == [culprit]
    assert r0["events"] == r1["events"] == [(FAULT_STEP, "demote", culprit)]
    assert r0["demoted"] == r1["demoted"] == [culprit]
    for k, v in r0["params"].items():
        assert_bitwise_equal(v, r1["params"][k])


def test_fsdp2_fp8_all_gather_follows_a_demotion(tmp_path: Path) -> None:
    """After a demotion under the FP8 all-gather (a guard's ladder), the demoted layers
    stop multiplying the FP8 weight of their old recipe: one moved to rowwise quantises
    the gathered full weight itself, one in high precision multiplies it as it is; both
    ranks compute bit for bit what one process without FSDP computes (tensorwise:
    current scaling, the two ranks' rows as two micro-batches)."""
    demotions = {"blocks.0.fc1": "rowwise", "head": "high"}
    kw = {"recipe": "tensorwise", "steps_before": 2, "steps_after": 3, "demotions": demotions}
    r0, r1 = (r.value for r in run_ranks("fsdp2_demoted_fp8_all_gather", tmp_path, **kw))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: CPU GEMMs reduce in one order
    try:
        ref = w.demoted_reference(**kw, micro_batches=2)
    finally:
        torch.set_num_threads(n)
    assert r0["losses"] == r1["losses"] == ref["losses"]
    for k, v in ref["params"].items():
        assert_bitwise_equal(r0["params"][k], v, k)
        assert_bitwise_equal(r1["params"][k], v, k)
    for r in (r0, r1):
        used = r["used_gathered"]
        assert used["blocks.0.fc1"] and not any(used["blocks.0.fc1"])  # rowwise: its own cast
        assert "head" not in used  # high precision: nothing quantised
        assert used["blocks.1.fc1"] and all(used["blocks.1.fc1"])  # undemoted: the FP8 gather


def test_fsdp2_fp8_all_gather_serves_a_demotion_to_a_recipe_it_gathers(tmp_path: Path) -> None:
    """delayed -> tensorwise (a ladder's first rung) keeps the FP8 all-gather, now with the
    new recipe's scale: the current amax of the full weight, not the delayed history. The
    demoted weight is shrunk 4x at the demotion, so the history's scale (from the larger
    amaxes before) would be 4x too small: the payload and scale the first forward after
    the demotion multiplies must be ``quantize(full weight)`` with tensorwise's spec."""
    name = "blocks.0.fc1"
    kw = {
        "recipe": "delayed",
        "steps_before": 3,
        "steps_after": 2,
        "demotions": {name: "tensorwise"},
        "demoted_weight_factor": 0.25,
    }
    r0, r1 = (r.value for r in run_ranks("fsdp2_demoted_fp8_all_gather", tmp_path, **kw))
    assert r0["losses"] == r1["losses"]
    assert all(math.isfinite(v) for v in r0["losses"])
    for k, v in r0["params"].items():
        assert_bitwise_equal(v, r1["params"][k], k)
    spec = Recipe.from_name("tensorwise").weight
    for r in (r0, r1):
        assert r["used_gathered"][name] and all(r["used_gathered"][name])  # still FP8
        data, scale = r["first_after_demotion"][name]
        q = quantize(r["weights_at_demotion"][name], spec)
        assert_bitwise_equal(data, q.data, f"{name} gathered payload")
        assert_bitwise_equal(scale, q.scale, f"{name} gathered scale")
