"""``fp8train plan`` and ``fp8train compare --plan-gpu``: the table, the picture, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp8train.lab.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_a_published_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "llama3.2-1b", "--gpu", "b200", "--recipe", "mxfp8"]
    args += ["--tokens", "4096", "--world-size", "8", "--fsdp", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["layer", "n", "m", "k"]
    # 16 blocks folded into one row per projection, then the head
    q = next(line for line in lines if line.startswith("model.layers.*.self_attn.q_proj"))
    assert q.split()[1:5] == ["x16", "4096", "2048", "2048"]
    assert any(line.startswith("lm_head ") for line in lines)
    assert "B200, mxfp8, FSDP2 over 8: whole step" in out
    assert "(fraction 0.40)" in out
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG)
    md = (tmp_path / "plan.md").read_text()
    assert md.startswith("# Plan: llama3.2-1b on B200, mxfp8")
    assert "| `model.layers.*.mlp.down_proj` | 4096 | 8192 | 2048 |" in md


def test_plan_the_lab_gpt_with_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--preset", "tiny", "--calibrate", "1", "--gpu", "h100", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("head "))
    assert head.split()[9] in ("low", "medium", "high")  # measured, not "unknown"
    assert "CPU profile scaled by bandwidth" in out
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt5"], "unknown --model 'gpt5'; known: lab-gpt, llama3-8b"),
        (["--gpu", "a100"], "unknown gpu 'a100'; known: h100-sxm"),
        (["--recipe", "fp7"], "unknown recipe 'fp7'"),
        (["--model", "mistral-7b", "--calibrate", "2"], "--calibrate needs real weights"),
        (["--tokens", "0", "--model", "mistral-7b"], "--tokens must be >= 1"),
    ],
)
def test_plan_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["plan", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8train: error: ") and message in err
    assert err.count("\n") == 1


def test_compare_refuses_an_unknown_plan_gpu_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", "--preset", "tiny", "--plan-gpu", "a100", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "--plan-gpu: unknown gpu 'a100'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # trains two tiny runs (~15 s)
def test_compare_adds_the_plan_to_its_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["compare", "--preset", "tiny", "--precisions", "bf16,rowwise", "--steps", "2"]
    args += ["--quiet", "--plan-gpu", "h200", "--out", str(out)]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "\n## Plan on H200\n" in report
    assert "H200, rowwise: whole step" in report
    assert (out / "plan.png").read_bytes().startswith(PNG)
