"""An interrupted run resumed from its checkpoints reproduces the uninterrupted run
bit for bit on CPU: losses, final weights and optimiser state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lab_helpers import FP8_PRECISIONS, read_results, tiny_compare


def run_split(
    run_cli,
    text_dir: Path,
    out: Path,
    precisions: str,
    stop_at: int | None,
    kernels: str = "compiled",
) -> None:
    options = ["--steps", "7", "--precisions", precisions, "--kernels", kernels]
    args = tiny_compare(text_dir, *options, "--out", str(out))
    if stop_at is None:
        assert run_cli(*args) == 0
        return
    assert run_cli(*args, "--stop-at", str(stop_at)) == 0
    assert not (out / "results.json").exists()  # unfinished: no results yet
    assert run_cli("compare", "--resume", "--out", str(out)) == 0


def assert_same_runs(a: Path, b: Path, precisions: list[str]) -> None:
    ra, rb = read_results(a), read_results(b)
    for p in precisions:
        assert ra["runs"][p]["curves"] == rb["runs"][p]["curves"], p  # exact float equality
        assert ra["runs"][p]["final_val_loss"] == rb["runs"][p]["final_val_loss"], p
        assert ra["runs"][p]["skipped_steps"] == rb["runs"][p]["skipped_steps"], p
        ca = torch.load(a / "checkpoints" / f"{p}-seed0.pt", weights_only=True)
        cb = torch.load(b / "checkpoints" / f"{p}-seed0.pt", weights_only=True)
        assert ca["step"] == cb["step"] == 7
        for key, ta in ca["model"].items():
            tb = cb["model"][key]
            if isinstance(ta, torch.Tensor):
                assert torch.equal(ta, tb), f"{p}: {key} differs after resume"
        for sa, sb in zip(
            ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=False
        ):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), p


# 3 is a checkpoint step of the tiny preset (ckpt_every=3); 4 is not, so the stop
# itself writes the checkpoint.
@pytest.mark.parametrize("stop_at", [3, 4])
def test_resume_is_bitwise_identical(run_cli, text_dir: Path, tmp_path: Path, stop_at: int) -> None:
    run_split(run_cli, text_dir, tmp_path / "full", "fp32,bf16", None)
    run_split(run_cli, text_dir, tmp_path / "split", "fp32,bf16", stop_at)
    assert_same_runs(tmp_path / "full", tmp_path / "split", ["fp32", "bf16"])


def test_resume_of_finished_run_changes_nothing(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_split(run_cli, text_dir, out, "bf16", None)
    before = read_results(out)["runs"]
    assert run_cli("compare", "--resume", "--out", str(out)) == 0
    assert read_results(out)["runs"]["bf16"]["curves"] == before["bf16"]["curves"]


def test_resume_picks_newest_run_without_out(run_cli, text_dir: Path, tmp_path: Path) -> None:
    assert run_cli(*tiny_compare(text_dir, "--precisions", "bf16", "--stop-at", "2")) == 0
    assert run_cli("compare", "--resume") == 0
    (out,) = (tmp_path / "runs").iterdir()
    assert read_results(out)["runs"]["bf16"]["curves"]["train_step"][-1] == 6


@pytest.mark.parametrize("recipe", FP8_PRECISIONS)
def test_resume_fp8_recipe_is_bitwise_identical(
    run_cli, text_dir: Path, tmp_path: Path, recipe: str
) -> None:
    # Recipe state (amax history) and the loss scaler must come back exactly too. Eager
    # kernels: what resuming restores does not depend on them (tests/test_kernels.py
    # checks the compiled ones bit for bit against eager), and compiling every recipe's
    # kernels afresh for three runs costs minutes on a small CPU. The smoke test runs the
    # compiled default.
    run_split(run_cli, text_dir, tmp_path / "full", recipe, None, kernels="eager")
    run_split(run_cli, text_dir, tmp_path / "split", recipe, 4, kernels="eager")
    assert_same_runs(tmp_path / "full", tmp_path / "split", [recipe])


def test_resume_refuses_a_changed_config(run_cli, text_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = tiny_compare(text_dir, "--precisions", "bf16")
    assert run_cli(*base, "--out", str(out), "--stop-at", "2") == 0
    assert run_cli("compare", "--resume", "--out", str(out), "--steps", "9") == 2
    assert "steps is 6 there, not 9" in capsys.readouterr().err
    assert run_cli("compare", "--resume", "--out", str(out), "--preset", "default") == 2
    # the same command again, plus --resume, continues
    assert run_cli(*base, "--out", str(out), "--resume") == 0
    assert read_results(out)["runs"]["bf16"]["curves"]["train_step"][-1] == 6


def test_a_resume_may_add_precisions_and_seeds(
    run_cli, text_dir: Path, tmp_path: Path, capsys
) -> None:
    """A finished comparison grown by a resume (a control row, more seeds) trains only
    the new runs, leaves the old ones as they were, and ends where a comparison of the
    grown set from scratch ends; dropping a precision or a seed is refused."""
    base = tiny_compare(text_dir, "--kernels", "eager")
    grown = tmp_path / "grown"
    assert run_cli(*base, "--precisions", "bf16", "--out", str(grown)) == 0
    first = grown / "checkpoints" / "bf16-seed0.pt"
    written = first.stat().st_mtime_ns
    more = ["--precisions", "bf16,fp32", "--seeds", "2"]
    assert run_cli("compare", "--resume", "--out", str(grown), *more) == 0
    assert first.stat().st_mtime_ns == written  # the finished run was not trained again
    saved = json.loads((grown / "config.json").read_text())["config"]
    assert (saved["precisions"], saved["seeds"]) == (["bf16", "fp32"], 2)
    scratch = tmp_path / "scratch"
    assert run_cli(*base, *more, "--out", str(scratch)) == 0
    a, b = read_results(grown)["runs"], read_results(scratch)["runs"]
    assert a.keys() == b.keys() == {"bf16", "fp32"}
    for p in a:
        assert [(r["seed"], r["final_val_loss"], r["curves"]) for r in a[p]["per_seed"]] == [
            (r["seed"], r["final_val_loss"], r["curves"]) for r in b[p]["per_seed"]
        ], p
    # Growing is the only change a resume accepts in these two fields.
    for fewer in (["--precisions", "fp32"], ["--seeds", "1"]):
        assert run_cli("compare", "--resume", "--out", str(grown), *fewer) == 2
        assert "may add precisions or seeds, not drop them" in capsys.readouterr().err
    assert run_cli("compare", "--resume", "--out", str(grown)) == 0  # the grown config


def test_a_resumed_report_says_whose_times_it_shows(
    run_cli, text_dir: Path, tmp_path: Path
) -> None:
    """A report written by the process that resumed a comparison does not present its
    own few seconds and load as those of the training: it counts the runs that earlier
    processes trained and gives the load their sessions recorded."""
    run_split(run_cli, text_dir, tmp_path / "full", "fp32,bf16", None)
    run_split(run_cli, text_dir, tmp_path / "split", "fp32,bf16", 3)
    full, split = read_results(tmp_path / "full"), read_results(tmp_path / "split")
    assert full["runs_trained_elsewhere"] == 0
    assert split["runs_trained_elsewhere"] == 2  # both trained steps 1-3 before the stop
    low, high = split["training_load_1m"]  # two sessions per run, both recorded
    assert 0 <= low <= high
    assert " s in all" in (tmp_path / "full" / "report.md").read_text()
    report = (tmp_path / "split" / "report.md").read_text()
    assert "which resumed the comparison: 2 of 2 runs were trained" in report
    assert "1-minute load average" in report and " s in all" not in report
