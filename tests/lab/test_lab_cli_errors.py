"""Bad requests end with one line on stderr and status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fp8train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fp8train: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["compare", "--precisions", "bf16,fp9"], ["'fp9'", "tensorwise", "mxfp8"]),
        (["train", "--precision", "nope"], ["'nope'", "known:"]),
        (["compare", "--steps", "0"], ["--steps", ">= 1"]),
        (["compare", "--steps", "-3"], ["--steps"]),
        (["compare", "--steps", "ten"], ["--steps", "invalid int"]),
        (["compare", "--seeds", "0"], ["--seeds"]),
        (["compare", "--d-model", "130", "--heads", "4"], ["multiple"]),
        (["compare", "--bogus"], ["unrecognized"]),
        (["compare", "--task", "vision"], ["--task"]),
        (["compare", "--preset", "huge"], ["'huge'"]),
        (["compare", "--resume"], ["no run"]),
        (["train", "--dist", "ddp", "--fp8-all-gather"], ["--fp8-all-gather", "fsdp2 only"]),
        ([], ["compare, train, formats or plan"]),
    ],
)
def test_bad_arguments(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run(tmp_path, *args), *fragments)


def test_empty_data_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(tmp_path, "compare", "--data", "empty", "--precisions", "bf16", "--quiet")
    assert_one_line_error(result, "no text files")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_missing_and_too_small_data(tmp_path: Path) -> None:
    assert_one_line_error(run(tmp_path, "compare", "--data", "nowhere", "--quiet"), "no such")
    (tmp_path / "small.txt").write_text("print('hi')\n" * 10)
    result = run(tmp_path, "compare", "--data", "small.txt", "--precisions", "bf16", "--quiet")
    assert_one_line_error(result, "too little", "--seq")


def test_help_exits_zero(tmp_path: Path) -> None:
    result = run(tmp_path, "compare", "--help")
    assert result.returncode == 0
    assert "--precisions" in result.stdout and "--resume" in result.stdout


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    for out in ("notes.txt", "notes.txt/run"):
        result = run(tmp_path, "train", "--preset", "tiny", "--out", out, "--quiet")
        assert_one_line_error(result, f"--out {out}", "not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_that_cannot_be_created_is_refused(tmp_path: Path, text_dir: Path) -> None:
    # /proc takes no new folders, whatever the permission bits say (even for root).
    args = ["train", "--preset", "tiny", "--data", str(text_dir), "--quiet"]
    result = run(tmp_path, *args, "--out", "/proc/fp8train-lab-test")
    assert_one_line_error(result, "--out /proc/fp8train-lab-test", "cannot create")
