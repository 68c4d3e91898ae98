"""Verdicts are worded as strongly as the evidence allows, counts take the right
plural, and the help text breaks lines between words only."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fp8train.lab import compare, report
from fp8train.lab.cli import main
from fp8train.lab.config import KNOWN_PRECISIONS

FLOOR = {"fp32_vs_bf16_gap_pct": -0.8, "fp32_vs_bf16_se_pct": None}


def _run(gap: float | None, se: float | None, skipped: int = 0) -> dict[str, Any]:
    return {
        "val_loss_gap_vs_bf16_pct": gap,
        "val_loss_gap_vs_bf16_se_pct": se,
        "diverged": False,
        "skipped_steps": skipped,
    }


@pytest.mark.parametrize(
    ("gap", "start"),
    [
        (0.5, "indistinguishable from bf16"),  # 0.6x the floor
        (-0.8, "indistinguishable from bf16"),  # at the floor: not beyond it
        (1.2, "possibly worse than bf16"),  # 1.5x
        (-4.0, "better than bf16"),  # 5x
        (11.2, "clearly worse than bf16"),  # 14x: int8 in the default comparison
    ],
)
def test_one_seed_verdict_scales_with_the_noise_floor(gap: float, start: str) -> None:
    line = compare.verdict("int8", _run(gap, None), FLOOR, 1)
    assert line.startswith(start), line
    assert "one seed, no standard error" in line
    assert f"{abs(gap) / 0.8:.1f}x the fp32-vs-bf16 noise floor" in line


@pytest.mark.parametrize(
    ("gap", "start"),
    [
        (0.5, "indistinguishable from bf16"),  # 1 SE
        (-1.25, "possibly better than bf16"),  # 2.5 SE
        (2.0, "worse than bf16"),  # 4 SE
        (3.5, "clearly worse than bf16"),  # 7 SE
    ],
)
def test_several_seed_verdict_scales_with_the_standard_error(gap: float, start: str) -> None:
    line = compare.verdict("rowwise", _run(gap, 0.5), None, 3)
    assert line.startswith(start), line
    assert f"{abs(gap) / 0.5:.1f} SE over 3 paired seeds" in line


def test_thresholds_live_in_one_table_and_rise() -> None:
    from fp8train.lab import verdicts

    for unit, cuts in verdicts.THRESHOLDS.items():
        assert list(cuts) == sorted(cuts) and len(cuts) == 3, unit
        assert [verdicts.strength(c, unit) for c in cuts] == [0, 1, 2]  # "beyond", not "at"
        assert verdicts.strength(cuts[-1] * 1.01, unit) == 3
    assert verdicts.THRESHOLDS["standard_error"][0] == compare.CLAIM_SE
    # The report states the same numbers.
    text = verdicts.thresholds_text()
    for cuts in verdicts.THRESHOLDS.values():
        assert all(f"{c:g}" in text for c in cuts)


def test_counts_take_the_right_plural() -> None:
    run = {
        "final_val_loss": 2.0,
        "val_loss_gap_vs_bf16_pct": 0.0,
        "val_loss_gap_vs_bf16_se_pct": None,
        "median_step_s": 0.1,
        "step_time_vs_bf16": 1.0,
        "saved_activation_bytes": 1024,
        "skipped_steps": 0,
        "converted_linears": "0/1",
        "verdict": "reference: every gap is measured against this run",
    }
    cfg = {
        "d_model": 128,
        "layers": 1,
        "heads": 1,
        "seq": 32,
        "steps": 1,
        "batch": 4,
        "val_fraction": 0.05,
        "eval_windows": 1,
        "final_eval_windows": 8,
    }
    results = {
        "task": "gpt",
        "config": cfg,
        "versions": {
            "fp8train": "0",
            "torch": "2",
            "python": "3",
            "platform": "linux",
            "cpu_count": 1,
        },
        "data": {"source": "x", "files": 1, "bytes": 1000, "sha256": "0" * 64},
        "seeds": [0],
        "wall_time_s": 1.0,
        "noise_floor": None,
        "runs": {"bf16": run},
    }
    md = report.markdown(results)
    assert md.startswith("# fp8train lab: gpt, 1 precision, 1 seed\n")
    for one in ("1 layer,", "1 head,", "1 step of", "1 file,", "1 CPU;", "1 fixed window;"):
        assert one in md, one
    assert not re.search(r"\b1 [a-zA-Z ]*?(precisions|layers|heads|steps|files|CPUs)\b", md)
    line = compare.verdict("mxfp8", _run(0.1, None, skipped=1), FLOOR, 1)
    assert line.endswith("; 1 step skipped by the loss scaler")


@pytest.mark.parametrize("command", ["compare", "train", "formats", None])
def test_help_fits_80_columns_without_breaking_words(
    command: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(len(line) <= 80 for line in text.splitlines()), text
    if command == "compare":
        words = set(re.findall(r"[\w+]+", text))
        assert set(KNOWN_PRECISIONS) - {p for p in KNOWN_PRECISIONS if "+" in p} <= words
        assert "--no-fp8-all-gather" in text and "<recipe>+fp8act" in text
