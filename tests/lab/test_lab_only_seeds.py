"""--only-seeds: processes sharing one --out each train some of the run's seeds; a
--resume without it then writes the report, the same as one process training all."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab_helpers import read_results, tiny_compare

PRECISIONS = "bf16,tensorwise"


def _compare(run_cli, text_dir: Path, out: Path, *extra: str) -> int:
    options = ["--steps", "4", "--seeds", "2", "--precisions", PRECISIONS, "--kernels", "eager"]
    return run_cli(*tiny_compare(text_dir, *options, "--out", str(out), *extra))


def test_seeds_trained_apart_give_the_report_of_one_process(
    run_cli, text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _compare(run_cli, text_dir, whole) == 0
    assert _compare(run_cli, text_dir, split, "--only-seeds", "1") == 0
    assert not (split / "results.json").exists()  # seed 0 is still to train
    assert "once every seed has" in capsys.readouterr().out
    assert run_cli("compare", "--resume", "--out", str(split), "--only-seeds", "0") == 0
    assert not (split / "results.json").exists()
    assert run_cli("compare", "--resume", "--out", str(split)) == 0
    a, b = read_results(whole), read_results(split)
    for precision in PRECISIONS.split(","):
        # Everything but the step times, which are the machine's.
        untimed = [
            [{k: v for k, v in run.items() if k != "median_step_s"} for run in r["per_seed"]]
            for r in (a["runs"][precision], b["runs"][precision])
        ]
        assert untimed[0] == untimed[1]
        assert a["runs"][precision]["curves"] == b["runs"][precision]["curves"]


@pytest.mark.parametrize(
    ("value", "message"),
    [("2", "not among the run's seeds [0, 1]"), ("0;1", "separated by commas")],
)
def test_bad_only_seeds_are_refused_before_training(
    run_cli,
    text_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    value: str,
    message: str,
) -> None:
    out = tmp_path / "run"
    assert _compare(run_cli, text_dir, out, "--only-seeds", value) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
