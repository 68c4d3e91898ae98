"""The seed experiment done right: a Linear-ReLU-Linear classifier on scikit-learn's
digits, test accuracy per precision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from lab_helpers import read_results

pytest.importorskip("sklearn")


def test_digits_compare_reports_accuracy(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        run_cli(
            "compare",
            "--task",
            "digits",
            "--preset",
            "tiny",
            "--precisions",
            "fp32,bf16",
            "--out",
            str(out),
        )
        == 0
    )
    results = read_results(out)
    assert results["task"] == "digits"
    assert results["data"]["test_examples"] == 359  # 20% of 1,797
    for precision, run in results["runs"].items():
        assert 0.1 < run["test_accuracy"] <= 1.0, precision  # above chance after a few steps
        assert math.isfinite(run["final_val_loss"])
        assert math.isfinite(run["test_accuracy_gap_vs_bf16_pts"])
    report = (out / "report.md").read_text()
    assert "test accuracy" in report
    assert (out / "loss_curves.png").stat().st_size > 0


def test_digits_rejects_data(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.txt").write_text("x" * 5000)
    assert (
        run_cli(
            "compare", "--task", "digits", "--data", str(tmp_path / "t.txt"), "--precisions", "bf16"
        )
        == 2
    )
    assert "--data applies to the gpt task" in capsys.readouterr().err
