"""Data-parallel training (fp8train.distributed) on this CPU: 2 gloo ranks.

Every 2-rank run is compared with one process on the same global batch of 24 rows
(``dist_workers.reference_losses``):

* **current-scaling recipes** -- bitwise. Each rank quantises its own 12-row batch with
  its own activation and gradient scales, so the matching single process runs the two
  12-row halves as micro-batches and averages their gradients: the same GEMMs on the same
  shapes, ``(g_0 + g_1) / 2`` exactly as gloo's all-reduce / reduce-scatter computes it
  (a sum of two floats is commutative; halving is exact), and the loss is the mean of the
  two halves' losses. FSDP2's unsharded fp32 weight is the full weight bit for bit, and
  the FP8 all-gather casts each shard with the scales of the full weight (all-reduced
  amax), so its gathered payload and scale are ``quantize(full weight)`` bit for bit.
* **delayed scaling** -- ``DELAYED_RTOL``. Histories record the amax all-reduced with
  max over ranks, which is the amax of the whole 24-row batch, so the matching single
  process runs the whole batch at once (micro-batches would record two amaxes per step).
  The scales then agree (a mean-loss gradient is 2x larger on a 12-row rank, a power of
  two, which gives the same payloads); what differs is only the fp32 summation order
  over tokens: one 24-row mean and weight-gradient GEMM against two 12-row ones. Shuffling
  the rows of a single-process batch (the same kind of change) moves these losses by at
  most 1 ulp (~1e-7 relative); 1e-5 leaves room for a few ulps per step over 4 steps.

Runs are single-threaded (ranks and references) so that CPU GEMMs reduce in one order.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import dist_workers as w
import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks, torchrun
from torch import nn

from fp8train import RECIPE_NAMES, Recipe, quantize
from fp8train import distributed as fd
from fp8train.distributed.process_group import max_over_ranks
from fp8train.distributed.wrap import unwrap
from fp8train.loss_scaler import LossScalerConfig
from fp8train.nn import fp8_layers
from fp8train.testing import assert_bitwise_equal

# Recipes whose weights can be all-gathered in FP8 (the module docstring says why).
AG_RECIPES = ("tensorwise", "delayed", "blockwise", "int8")
STEPS = 4
DELAYED_RTOL = 1e-5
# nvfp4 quantises each rank's shard of the activations and gradients on its own: the
# per-tensor fp32 scale of its two-level scaling comes from the shard's amax, and the
# stochastic rounding of dy and the wgrad Hadamard signs draw each rank's own stream over
# its rows (docs/fp4.md), so its losses move off the single process's by FP4's rounding
# noise: under 1% in these 4 steps.
SHARD_LOCAL_RECIPES = ("nvfp4",)
SHARD_LOCAL_RTOL = 1e-2
# FP8 payload: 1 byte per weight element against bf16's 2, plus the bf16 biases and
# LayerNorm parameters that stay bf16 in both runs (1408 of 148864 parameters).
MAX_BYTES_RATIO = 0.55

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view")


@pytest.fixture
def single_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_rank_group() -> Any:
    """A 1-rank gloo group in this process (FSDP2 and setup work at world size 1)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@functools.cache
def _reference(recipe: str, micro_batches: int) -> tuple[list[float], Any]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return w.reference_losses(recipe, STEPS, micro_batches)
    finally:
        torch.set_num_threads(n)


def _initial_weights(recipe: str) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach() for name, layer in fp8_layers(w.make_model(recipe))}


def _assert_histories_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a.keys() == b.keys(), what
    for layer, roles in a.items():
        for role, window in roles.items():
            other = b[layer][role]
            assert (window is None) == (other is None), f"{what}: {layer}.{role}"
            if window is not None:
                assert_bitwise_equal(window, other, f"{what}: {layer}.{role} history")


def _check_case(key: str, per_rank: list[dict[str, Any]]) -> None:
    _, recipe, ag = key.split("/")
    r0, r1 = (v[key] for v in per_rank)
    assert r0["losses"] == r1["losses"], f"{key}: ranks report different global losses"
    _assert_histories_equal(r0["histories"], r1["histories"], f"{key}: rank 0 vs rank 1")
    if recipe == "delayed":
        ref, _ = _reference(recipe, 1)
        assert r0["losses"] == pytest.approx(ref, rel=DELAYED_RTOL, abs=0), key
    elif recipe in SHARD_LOCAL_RECIPES:
        ref, _ = _reference(recipe, 2)
        worst = max(abs(a / b - 1.0) for a, b in zip(r0["losses"], ref, strict=True))
        assert worst <= SHARD_LOCAL_RTOL, f"{key}: losses {worst:.2e} off the single process"
    else:
        ref, _ = _reference(recipe, 2)
        assert r0["losses"] == ref, f"{key}: not bitwise equal to the single process"
    if ag == "True":
        spec = Recipe.from_name(recipe).weight
        for name, full in _initial_weights(recipe).items():
            data, scale, is_gathered = r0["gathered"][name]
            assert is_gathered, f"{key}: {name}'s forward GEMM did not use the gathered weight"
            q = quantize(full, spec)
            assert_bitwise_equal(data, q.data, f"{key}: {name} gathered payload")
            assert_bitwise_equal(scale, q.scale, f"{key}: {name} gathered scale")


# --------------------------------------------------------------------------- in process


def test_fp8_all_gather_support_follows_the_weight_spec() -> None:
    supported = tuple(
        r for r in RECIPE_NAMES if fd.fp8_all_gather_unsupported_reason(Recipe.from_name(r)) is None
    )
    assert supported == AG_RECIPES
    for name in ("rowwise", "int8_rowwise", "mxfp8"):
        reason = fd.fp8_all_gather_unsupported_reason(Recipe.from_name(name))
        assert reason is not None and "grad_input" in reason and "bf16" in reason
    from dataclasses import replace

    no_dgrad = replace(Recipe.from_name("tensorwise"), fp8_dgrad=False)
    assert "fp8_dgrad=False" in (fd.fp8_all_gather_unsupported_reason(no_dgrad) or "")


def test_setup_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="init_from_env"):
        fd.setup(w.make_model("tensorwise"), "ddp")


def test_init_from_env_without_torchrun_is_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fd.init_from_env() == fd.DistInfo(0, 1, 0)
    assert not dist.is_initialized() and fd.rank() == 0 and fd.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_PORT"):
        fd.init_from_env()


@pytest.mark.parametrize("recipe", ["rowwise", "mxfp8", "int8_rowwise"])
def test_setup_rejects_fp8_all_gather_for_axis_dependent_weight_scales(
    one_rank_group: None, recipe: str
) -> None:
    with pytest.raises(ValueError, match=f"does not support recipe '{recipe}'.*grad_input"):
        fd.setup(w.make_model(recipe), "fsdp2", fp8_all_gather=True)


def test_setup_rejects_bad_options(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        fd.setup(w.make_model("tensorwise"), "fsdp")
    with pytest.raises(ValueError, match="FSDP2 options"):
        fd.setup(w.make_model("tensorwise"), "ddp", fp8_all_gather=True)
    with pytest.raises(ValueError, match="no Fp8Linear"):
        fd.setup(nn.Sequential(nn.Linear(32, 32)), "fsdp2", fp8_all_gather=True)
    ddp = fd.setup(w.make_model("tensorwise"), "ddp")
    with pytest.raises(ValueError, match="already data-parallel"):
        fd.setup(ddp, "fsdp2")


def test_layer_hooks_on_one_rank(one_rank_group: None) -> None:
    hooks = fd.Fp8LayerHooks()
    amax = torch.tensor([3.0, math.nan])
    assert hooks.reduce_amax(amax) is amax  # one rank: nothing to agree with, no collective
    full = torch.randn(8, 16)
    assert hooks.gathered(full) is None
    scaled, grid = quantize(full, Recipe.from_name("tensorwise").weight), full.abs().amax()
    got = hooks.gathered(fd.Fp8GatheredWeight(scaled, grid))
    assert got is not None and got[0] is scaled and got[1] is grid


def test_max_over_ranks_makes_every_non_finite_inf(one_rank_group: None) -> None:
    # A MAX reduction's NaN handling is backend-defined; inf wins on every backend.
    got = max_over_ranks(torch.tensor([1.0, math.nan, -math.inf], dtype=torch.bfloat16), None)
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, math.inf, math.inf]  # -inf too: any non-finite is inf


def test_shutdown_warns_while_a_ddp_model_is_still_referenced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DDP model freed after its process group can hang its rank (the reducer's
    destructor); shutdown names the hazard when one is alive, and is quiet once it is gone.
    The group's destruction is deferred here so that this test never creates the hazard."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        destroyed: list[bool] = []
        monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
        with pytest.warns(RuntimeWarning, match="1 DistributedDataParallel model"):
            fd.shutdown()
        assert destroyed == [True]  # it warns, and still tears the group down
        del model
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fd.shutdown()
        assert not dist.is_initialized()
    finally:
        monkeypatch.undo()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_distributed_loss_scaler_from_config() -> None:
    config = LossScalerConfig("static", init_scale=8.0)
    scaler = fd.DistributedLossScaler.from_config(config, process_group=None)
    assert isinstance(scaler, fd.DistributedLossScaler) and scaler.config == config


@pytest.mark.parametrize(("mode", "recipe"), [("ddp", "delayed"), ("fsdp2", "tensorwise")])
def test_setup_gives_every_fp8_layer_one_hooks_object(
    one_rank_group: None, mode: str, recipe: str
) -> None:
    model = fd.setup(w.make_model(recipe), mode, fp8_all_gather=mode == "fsdp2")
    states = [layer.fp8_state for _, layer in fp8_layers(unwrap(model))]
    assert states and isinstance(states[0].distributed, fd.Fp8LayerHooks)
    assert all(s.distributed is states[0].distributed for s in states)


@pytest.mark.parametrize("recipe", AG_RECIPES)
def test_one_rank_fsdp2_fp8_all_gather_is_bitwise_the_plain_model(
    one_rank_group: None, single_thread: None, recipe: str
) -> None:
    """World size 1 runs every hook (cast, gather, GEMM on the gathered weight, backward
    re-gather from the cached scale) against an unwrapped model."""
    ref, ref_hist = _reference(recipe, 1)
    model = w.make_model(recipe)
    used = []
    for _, layer in fp8_layers(model):
        layer.fp8_state.observer = lambda s, role, t, qt: (
            used.append(isinstance(t, fd.Fp8GatheredWeight) and qt is t.fp8_gathered)
            if role == "weight"
            else None
        )
    model = fd.setup(model, "fsdp2", fp8_all_gather=True)
    opt = w.make_optimizer(model)
    losses = []
    for step in range(STEPS):
        x, y = w.global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses == ref
    assert used and all(used), "a forward GEMM re-quantised the gathered weight"
    _assert_histories_equal(w.histories(model), ref_hist, recipe)
    assert all(
        isinstance(layer.weight.to_local(), fd.Fp8AllGatherWeight) for _, layer in fp8_layers(model)
    )


# --------------------------------------------------------------------------- 2 ranks


def test_fsdp2_two_ranks_match_single_process(tmp_path: Path, single_thread: None) -> None:
    cases = [("fsdp2", r, False) for r in RECIPE_NAMES] + [("fsdp2", r, True) for r in AG_RECIPES]
    ranks = run_ranks("train_compare", tmp_path, cases=cases, steps=STEPS)
    values = [r.value for r in ranks]
    for key in values[0]:
        _check_case(key, values)


def test_ddp_two_ranks_match_single_process(tmp_path: Path, single_thread: None) -> None:
    cases = [("ddp", r, False) for r in RECIPE_NAMES]
    ranks = run_ranks("train_compare", tmp_path, cases=cases, steps=STEPS)
    values = [r.value for r in ranks]
    for key in values[0]:
        _check_case(key, values)


def test_fsdp2_three_ranks_uneven_shards(tmp_path: Path) -> None:
    """3 ranks split every 128-row weight 43/43/42 (FSDP pads the last shard) and cut
    128x128 blocks mid-block. Gathering in FP8 must not change a bit against gathering
    the fp32 weights: same losses, and payload and scales are ``quantize(full weight)``.
    (The 3-way gradient average rounds, so here the reference is the 3-rank fp32 run.)"""
    cases = [("fsdp2", r, ag) for r in AG_RECIPES for ag in (False, True)]
    ranks = run_ranks("train_compare", tmp_path, world=3, cases=cases, steps=3)
    for recipe in AG_RECIPES:
        spec = Recipe.from_name(recipe).weight
        fp32, fp8 = (f"fsdp2/{recipe}/{ag}" for ag in (False, True))
        for r in ranks:
            assert (
                r.value[fp8]["losses"] == r.value[fp32]["losses"] == ranks[0].value[fp32]["losses"]
            )
            _assert_histories_equal(
                r.value[fp8]["histories"],
                ranks[0].value[fp32]["histories"],
                f"{recipe}: rank {r.rank} FP8 vs rank 0 fp32 all-gather",
            )
        for name, full in _initial_weights(recipe).items():
            data, scale, is_gathered = ranks[0].value[fp8]["gathered"][name]
            q = quantize(full, spec)
            assert is_gathered
            assert_bitwise_equal(data, q.data, f"{recipe}: {name} gathered payload")
            assert_bitwise_equal(scale, q.scale, f"{recipe}: {name} gathered scale")


def test_fp8_all_gather_halves_the_measured_all_gather_bytes(tmp_path: Path) -> None:
    ranks = run_ranks("all_gather_bytes", tmp_path, recipes=list(AG_RECIPES))
    for r in ranks:
        for recipe, counts in r.value.items():
            bf16, fp8 = counts[False], counts[True]
            assert bf16["all_gather_calls"] == fp8["all_gather_calls"] > 0
            ratio = fp8["all_gather"] / bf16["all_gather"]
            print(
                f"rank {r.rank} {recipe}: FP8 {fp8['all_gather']} B / bf16 "
                f"{bf16['all_gather']} B = {ratio:.4f}; amax all-reduce "
                f"{fp8['all_reduce']} B"
            )
            assert ratio <= MAX_BYTES_RATIO, (recipe, ratio)


def test_loss_scaler_skips_on_every_rank_and_histories_stay_identical(tmp_path: Path) -> None:
    ranks = run_ranks("loss_scaler_agreement", tmp_path)
    plain = [r.value["LossScaler"] for r in ranks]
    shared = [r.value["DistributedLossScaler"] for r in ranks]
    # Without the all-reduced flag only the rank holding the inf skips: replicas diverge.
    assert [p["skipped"] for p in plain] == [False, True]
    assert [p["params_changed"] for p in plain] == [True, False]
    for s in shared:
        assert s == {"skipped": True, "scale": 2.0**9, "params_changed": False}
    nan0, nan1 = (r.value["nan_on_one_rank"] for r in ranks)
    assert nan0["skipped"] == nan1["skipped"] == [False, True, False]
    _assert_histories_equal(nan0["histories"], nan1["histories"], "NaN on rank 1")
    # The NaN step recorded nothing on either rank: 2 of 3 steps in every history.
    assert {c for roles in nan0["counts"].values() for c in roles.values()} == {2}


# Resuming on one process loads the checkpoint without a process group, on purpose;
# torch.distributed.checkpoint says so with a warning.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
@pytest.mark.parametrize("recipe, fp8_all_gather", [("tensorwise", True), ("delayed", False)])
def test_checkpoint_saved_on_2_ranks_resumes_on_2_and_on_1(
    tmp_path: Path, single_thread: None, recipe: str, fp8_all_gather: bool
) -> None:
    ckpt = str(tmp_path / "ckpt")
    kw: dict[str, Any] = {"recipe": recipe, "fp8_all_gather": fp8_all_gather, "ckpt": ckpt}
    saved = [
        r.value
        for r in run_ranks(
            "checkpoint_save", tmp_path / "save", steps_before=3, steps_after=3, **kw
        )
    ]
    resumed = [
        r.value for r in run_ranks("checkpoint_resume", tmp_path / "resume", steps_after=3, **kw)
    ]
    for s, r in zip(saved, resumed, strict=False):
        _assert_histories_equal(s["saved"]["histories"], r["loaded"]["histories"], "2 ranks")
        assert s["saved"]["scaler"] == r["loaded"]["scaler"]
        assert r["after"] == s["after"], "resuming on 2 ranks changed the continuation"
    # One process, no process group, no FSDP: the same DCP files, resharded on load.
    if recipe != "delayed":
        one = w.reference_resume(recipe, ckpt, 3, micro_batches=2)
        _assert_histories_equal(
            saved[0]["saved"]["histories"], one["loaded"]["histories"], "1 rank"
        )
        assert one["loaded"]["scaler"] == saved[0]["saved"]["scaler"]
        assert one["after"] == saved[0]["after"], "resuming on 1 rank changed the continuation"
        return
    # Delayed: the 12-row ranks recorded grad_output amaxes twice those of the 24-row
    # process (a mean loss's gradient scales with 1/rows). Rescaled on load they are the
    # amaxes the process would have recorded itself: the continuation then differs from
    # 2 ranks only in fp32 token-sum order (DELAYED_RTOL, as in the module docstring).
    one = w.reference_resume(recipe, ckpt, 3, micro_batches=1, rescale_grad_histories=True)
    assert one["loaded"]["scaler"] == saved[0]["saved"]["scaler"]
    for layer, roles in saved[0]["saved"]["histories"].items():
        for role, window in roles.items():
            expect = window * 0.5 if role == "grad_output" else window
            assert_bitwise_equal(one["loaded"]["histories"][layer][role], expect, f"{layer}.{role}")
    assert one["after"] == pytest.approx(saved[0]["after"], rel=DELAYED_RTOL, abs=0)
    # As saved, the grad_output scales are off by 2x (one binade of headroom) until 16 new
    # steps replace them: the same E5M2 values except those pushed into the subnormal
    # range, so the losses move a little (measured 1.6e-4), not bitwise.
    as_saved = w.reference_resume(recipe, ckpt, 3, micro_batches=1)
    _assert_histories_equal(
        saved[0]["saved"]["histories"], as_saved["loaded"]["histories"], "1 rank, as saved"
    )
    assert as_saved["after"] == pytest.approx(saved[0]["after"], rel=1e-3, abs=0)


@pytest.mark.parametrize("how, pg_timeout_s", [("exit", 20.0), ("stall", 3.0)])
def test_a_lost_rank_fails_the_others_with_a_clear_error(
    tmp_path: Path, how: str, pg_timeout_s: float
) -> None:
    ranks = run_ranks(
        "rank_dies",
        tmp_path,
        expect_ok=False,
        how=how,
        pg_timeout_s=pg_timeout_s,
        marker=str(tmp_path / "rank0_done"),
    )
    survivor, lost = ranks
    assert lost.exitcode == (17 if how == "exit" else 18)
    assert survivor.exitcode == 0, survivor.error
    res = survivor.value
    assert res["type"] == "RankFailureError", res
    assert "rank 0 of 2: a collective failed" in res["error"]
    if how == "exit":
        # The peer's closed socket is noticed at once, long before the timeout (the
        # backend's wording varies with where the collective was: closed, reset, ...).
        assert res["elapsed"] < pg_timeout_s, res
    else:
        assert "timed out" in res["error"].lower(), res
        # Fails after the process-group timeout (plus slack for a loaded CPU), not never.
        assert pg_timeout_s * 0.9 <= res["elapsed"] < pg_timeout_s + 15


def test_torchrun_launch(tmp_path: Path, single_thread: None) -> None:
    """``torchrun --nproc-per-node 2`` with the library's own ``init_from_env``."""
    out = tmp_path / "result.pt"
    here = Path(__file__).parent
    proc = torchrun(str(here / "dist_torchrun_main.py"), str(out), cwd=tmp_path, pythonpath=(here,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert set(result) == {"ddp/tensorwise/False", "fsdp2/tensorwise/True", "fsdp2/delayed/True"}
    ref, _ = _reference("tensorwise", 2)
    assert result["ddp/tensorwise/False"]["losses"] == ref[:3]
    assert result["fsdp2/tensorwise/True"]["losses"] == ref[:3]
    ref_delayed, _ = _reference("delayed", 1)
    assert result["fsdp2/delayed/True"]["losses"] == pytest.approx(
        ref_delayed[:3], rel=DELAYED_RTOL, abs=0
    )
