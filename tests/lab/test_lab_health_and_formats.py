"""The lab wires the library's monitor into FP8 runs (health section, heatmap, JSONL) and
exposes the format explorer as ``fp8train formats``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fp8train
from fp8train.lab.cli import main


def test_fp8_run_reports_health_per_layer(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "compare",
            "--preset",
            "tiny",
            "--data",
            str(text_dir),
            "--precisions",
            "bf16,tensorwise",
            "--monitor-every",
            "2",
            "--kernels",
            "eager",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    log = out / "monitor" / "tensorwise-seed0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    layer_records = [r for r in records if r["kind"] == "layer"]
    layers = {r["layer"] for r in layer_records}
    assert layers == {
        name for name, _ in fp8train.nn.fp8_layers(fp8train.convert(_tiny_gpt(), "tensorwise"))
    }
    assert {r["step"] for r in layer_records} == {0, 2, 4}  # every 2nd of 6 steps
    assert not (out / "monitor" / "bf16-seed0.jsonl").exists()  # bf16 has no FP8 layers
    report = (out / "report.md").read_text()
    assert "## Numerics health" in report and "Health: tensorwise" in report
    png = out / "health_tensorwise.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_gpt():  # type: ignore[no-untyped-def]
    from fp8train.lab.config import resolve
    from fp8train.lab.gpt import GPT

    c = resolve("gpt", "tiny", {})
    return GPT(vocab=256, seq=c.seq, d_model=c.d_model, layers=c.layers, heads=c.heads)


def test_formats_command_prints_every_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    table = capsys.readouterr().out
    for fmt in fp8train.formats.FORMATS.values():
        assert fmt.name in table
    assert "448" in table and "57344" in table


def test_bad_kernels_and_monitor_options_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compare", "--kernels", "fast"])
    assert e.value.code == 2
    assert main(["compare", "--monitor-every", "-1", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "monitor-every" in err and "Traceback" not in err
