"""The lab's stress setting and guarded precisions (issue 32, item 3): the options are
checked, the stress reaches every precision alike, a "+guard" run without a trigger is
the plain run, and a triggered guard's actions reach results.json, the report and the
curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lab_helpers import read_results, tiny_compare
from torch import nn

from fp8train.lab.config import LabError, resolve
from fp8train.lab.stress import OutlierStress, parse_guard, parse_stress

STRESS = "outlier:blocks.0.mlp.proj:3:1e6"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"stress": "spike:x:1:2"}, "unknown stress 'spike'"),
        ({"stress": "outlier:blocks.0.mlp.proj:3"}, "expected outlier:<layer>:<every>:<factor>"),
        ({"stress": "outlier:head:0:1e6"}, "<every> must be >= 1"),
        ({"stress": "outlier:head:3:inf"}, "<factor> must be a finite number > 1"),
        ({"stress": "outlier:head:three:1e6"}, "<every> must be an int"),
        ({"guard": "panic"}, "unknown policy 'panic'"),
        ({"guard": "skip:rowwise"}, "only demote and rollback take a ladder"),
        ({"guard": "demote:rowwise,,high"}, "empty rung"),
        ({"precisions": ("bf16+guard+guard",)}, "+guard applies once, to fp32, bf16 and"),
        ({"precisions": ("torchao-rowwise+guard",)}, "+guard applies once, to fp32, bf16 and"),
        ({"precisions": ("tensorwise+guard",), "dist": "ddp"}, "+guard precisions run on one"),
    ],
)
def test_bad_stress_and_guard_options_are_refused(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(LabError) as info:
        resolve("gpt", "tiny", overrides)
    assert fragment in str(info.value)


def test_good_options_parse() -> None:
    assert parse_stress("outlier:blocks.1.mlp.proj:40:1e6") == OutlierStress(
        "blocks.1.mlp.proj", 40, 1e6
    )
    spec = parse_guard("demote:rowwise,high")
    assert (spec.policy, spec.demote_to) == ("demote", ("rowwise", "high"))
    assert parse_guard("skip").demote_to is None
    for precision in ("delayed~nopow2+fp8act+guard", "bf16+guard", "fp32+guard"):
        config = resolve("gpt", "tiny", {"precisions": (precision,)})
        assert config.precisions == (precision,)


def test_the_outlier_needs_a_linear_layer_of_the_model() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    for name in ("0.x", "1"):
        with pytest.raises(ValueError, match=f"'{name}' is not a Linear layer of the model"):
            OutlierStress(name, 3, 1e6).attach(model)


def test_the_outlier_lands_where_documented() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    model = nn.Sequential(layer)
    hook = OutlierStress("0", every=2, factor=1e6).attach(model)
    received: list[torch.Tensor] = []
    # Registered after the stress hook: sees what the layer receives.
    layer.register_forward_pre_hook(lambda m, args: received.append(args[0].detach().clone()))
    x = torch.randn(2, 5, 8)
    for step in range(3):
        hook.step = step
        model(x)
    model.eval()
    hook.step = 1
    model(x)
    assert torch.equal(received[0], x) and torch.equal(received[2], x)  # steps 1 and 3
    hit = received[1]  # step 2 (1-based): the outlier
    assert hit[0, 0, 0] == x.abs().amax() * 1e6
    expected = x.clone()
    expected[0, 0, 0] = hit[0, 0, 0]
    assert torch.equal(hit, expected)  # nothing else changed
    assert torch.equal(received[3], x)  # validation (eval mode) is untouched


def _compare(run_cli: Any, text_dir: Path, out: Path, precisions: str, *extra: str) -> dict:
    args = tiny_compare(text_dir, "--kernels", "eager")
    assert run_cli(*args, "--precisions", precisions, "--out", str(out), *extra) == 0
    return read_results(out)


@pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning")
def test_a_guard_that_never_triggers_leaves_the_run_unchanged(
    run_cli: Any, text_dir: Path, tmp_path: Path
) -> None:
    """tensorwise, and bf16 (no FP8 layers: the guard's own monitor, nothing to demote)."""
    precisions = "bf16,bf16+guard,tensorwise,tensorwise+guard"
    results = _compare(run_cli, text_dir, tmp_path / "out", precisions)
    for precision in ("bf16", "tensorwise"):
        plain, guarded = (
            results["runs"][p]["per_seed"][0] for p in (precision, precision + "+guard")
        )
        assert guarded["guard"]["events"] == [] and guarded["guard"]["demoted"] == {}
        assert guarded["curves"]["train_loss"] == plain["curves"]["train_loss"], precision
        assert guarded["final_val_loss"] == plain["final_val_loss"], precision
        assert "guard" not in plain
    assert "## Guard actions" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning")
def test_a_stressed_delayed_run_is_guarded_and_the_actions_are_reported(
    run_cli: Any, text_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    results = _compare(run_cli, text_dir, out, "bf16,delayed,delayed+guard", "--stress", STRESS)
    assert results["config"]["stress"] == STRESS
    assert results["config"]["guard"] == "demote:rowwise,high"
    runs = results["runs"]
    # The stress reaches bf16 too, so each precision's gap is against a stressed bf16.
    baseline = _compare(run_cli, text_dir, tmp_path / "plain", "bf16")
    assert runs["bf16"]["final_val_loss"] != baseline["runs"]["bf16"]["final_val_loss"]
    guard = runs["delayed+guard"]["per_seed"][0]["guard"]
    assert guard["policy"] == "demote:rowwise,high"
    # The first outlier (1-based step 3, index 2) names the stressed layer's output GEMM
    # and input; the layer moves to rowwise, where the next outlier no longer triggers.
    (event,) = guard["events"]
    assert (event["step"], event["action"], event["layer"], event["to"]) == (
        2,
        "demote",
        "blocks.0.mlp.proj",
        "rowwise",
    )
    assert "amax_jump" in event["triggers"]
    assert "operand input" in event["message"]
    assert guard["demoted"] == {"blocks.0.mlp.proj": "rowwise"}
    assert math.isfinite(runs["delayed+guard"]["final_val_loss"])
    report = (out / "report.md").read_text()
    assert "## Guard actions" in report
    assert "step 3: demote blocks.0.mlp.proj -> rowwise (triggers: amax_jump" in report
    assert (out / "loss_curves.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning")
def test_a_rollback_replays_and_the_curve_keeps_one_point_per_step(
    run_cli: Any, text_dir: Path, tmp_path: Path
) -> None:
    results = _compare(
        run_cli,
        text_dir,
        tmp_path / "out",
        "delayed+guard",
        "--stress",
        "outlier:blocks.0.mlp.proj:5:1e6",
        "--guard",
        "rollback:rowwise,high",
    )
    seed = results["runs"]["delayed+guard"]["per_seed"][0]
    (event,) = seed["guard"]["events"]
    # The outlier at index 4; the snapshot before index 3 (ckpt_every 3 in the preset).
    assert (event["step"], event["action"], event["to_step"]) == (4, "rollback", 3)
    assert seed["curves"]["train_step"] == [1, 2, 3, 4, 5, 6]
    assert seed["curves"]["val_step"] == [0, 3, 6]


def test_an_unknown_stress_layer_is_refused_with_the_layers_named(
    run_cli: Any, text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny_compare(text_dir, "--precisions", "bf16")
    code = run_cli(*args, "--stress", "outlier:blocks.9.fc:3:1e6", "--out", str(tmp_path / "o"))
    assert code == 2
    err = capsys.readouterr().err
    assert "'blocks.9.fc' is not a Linear layer of the model" in err
    assert "blocks.0.mlp.proj" in err


@pytest.mark.filterwarnings("ignore::fp8train.autograd.AmaxJumpWarning")
def test_a_resumed_guard_keeps_what_its_triggers_learnt(
    run_cli: Any, text_dir: Path, tmp_path: Path
) -> None:
    """The loss and gradient-norm triggers judge only after 16 steps of history: a guard
    resumed at step 18 with fresh windows would let the outlier of step 20 through.
    From the checkpoint's guard state it acts as the uninterrupted run does, bit for bit."""
    extra = ("--steps", "22", "--stress", "outlier:head:20:1e6")
    precisions = "bf16+guard,tensorwise+guard"
    full = _compare(run_cli, text_dir, tmp_path / "full", precisions, *extra)
    split = tmp_path / "split"
    args = tiny_compare(text_dir, "--kernels", "eager")
    args += ["--precisions", precisions, "--out", str(split), *extra]
    assert run_cli(*args, "--stop-at", "18") == 0
    assert run_cli("compare", "--resume", "--out", str(split)) == 0
    resumed = read_results(split)
    for p in precisions.split(","):
        a, b = full["runs"][p]["per_seed"][0], resumed["runs"][p]["per_seed"][0]
        steps = [e["step"] for e in a["guard"]["events"]]
        assert 19 in steps, f"{p}: the outlier after the resume point must trigger ({steps})"
        assert b["guard"]["events"] == a["guard"]["events"], p
        assert b["curves"]["train_loss"] == a["curves"]["train_loss"], p
        assert b["final_val_loss"] == a["final_val_loss"], p
