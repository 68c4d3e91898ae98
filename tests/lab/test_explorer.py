"""The format explorer: the table against the format definitions, the lab capture, and
the three PNGs."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from fp8train.formats import FORMATS, Format
from fp8train.lab import explorer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _value(cell: str) -> float:
    """A table cell back to its value: "448", "0.125", or "2^-9 = 0.00195"."""
    token = cell.split(" = ")[0].strip()
    m = re.fullmatch(r"2\^(-?\d+)", token)
    return 2.0 ** int(m.group(1)) if m else float(token)


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 9 and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def test_table_matches_format_definitions() -> None:
    rows = _rows(explorer.formats_table())
    assert rows["format"][4:] == ["max", "min normal", "min subnormal", "epsilon", "binades"]
    for name, fmt in FORMATS.items():
        cells = rows[name]
        assert int(cells[1]) == fmt.bits, name
        got = [_value(c) for c in cells[4:8]]
        assert got == [fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.epsilon], name
        assert float(cells[8]) == round(fmt.binades, 2), name
    # Spot checks against the literal limits in formats.py's comments.
    assert _value(rows["e4m3"][4]) == 448 and _value(rows["e5m2"][4]) == 57344
    assert _value(rows["e4m3fnuz"][4]) == 240 and _value(rows["int8"][4]) == 127


def test_table_reference_rows_come_from_finfo() -> None:
    rows = _rows(explorer.formats_table())
    for name, dtype in (("bf16*", torch.bfloat16), ("fp16*", torch.float16)):
        fi = torch.finfo(dtype)
        cells = rows[name]
        assert _value(cells[5]) == fi.smallest_normal
        assert _value(cells[7]) == fi.eps
        assert _value(cells[6]) == fi.smallest_normal * fi.eps  # smallest subnormal
    assert rows["fp16*"][4] == "65504" and rows["bf16*"][2] == "1-8-7"


def test_table_takes_a_subset() -> None:
    table = explorer.formats_table([FORMATS["e4m3"]])
    assert set(_rows(table)) == {"format", "e4m3", "bf16*", "fp16*"}


@pytest.fixture(scope="module")
def captured() -> dict[str, Any]:
    # Tiny: two steps of batch 2 on a 50 KiB corpus slice.
    return explorer.capture_lab_tensors(steps=2, batch=2, corpus_mb=0.05)


def test_capture_returns_real_operands_and_keeps_rng(captured: dict[str, Any]) -> None:
    assert captured["layer"] == "blocks.1.mlp.fc" and captured["steps"] == 2
    assert captured["weight"].shape == (512, 128)  # fc: d_model 128 -> 4 * 128
    assert captured["activation"].shape == (2 * 64, 128)  # batch * seq tokens
    assert captured["gradient"].shape == (2 * 64, 512)
    for key in ("weight", "activation", "gradient"):
        t = captured[key]
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and t.abs().max() > 0
    state = torch.get_rng_state()
    explorer.capture_lab_tensors(steps=0, batch=1, corpus_mb=0.05)
    assert torch.equal(torch.get_rng_state(), state)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", head[16:24])  # the IHDR chunk
    return width, height


def test_plot_formats_writes_three_pngs(tmp_path: Path, captured: dict[str, Any]) -> None:
    out = tmp_path / "plots"
    paths = explorer.plot_formats(out, captured=captured)
    assert [p.name for p in paths] == list(explorer.FIGURES)
    for p in paths:
        assert p.parent == out and p.stat().st_size > 20_000, p
        width, height = _png_size(p)
        assert width >= 800 and height >= 600, (p, width, height)
    assert sorted(f.name for f in out.iterdir()) == sorted(explorer.FIGURES)  # no temp files


def test_plot_formats_rejects_incomplete_capture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gradient"):
        explorer.plot_formats(
            tmp_path, captured={"weight": torch.ones(2, 2), "activation": torch.ones(2, 2)}
        )


def test_fractions_printed_on_the_histograms_are_exact() -> None:
    # Unscaled E4M3 flushes values below 2^-10 (half its smallest subnormal) and clips
    # beyond 448; scaled to amax, nothing overflows.
    x = torch.tensor([[2.0**-12, 2.0**-11, 1.0, 500.0]])
    assert explorer._fractions(x, FORMATS["e4m3"], scaled=False) == (0.5, 0.25)
    under, over = explorer._fractions(x, FORMATS["e4m3"], scaled=True)
    assert over == 0.0 and under == 0.5  # 2^-12 and 2^-11 are ~2^-20 below amax
    fmt: Format = FORMATS["int8"]
    assert explorer._fractions(torch.tensor([[0.4, 0.6, 200.0]]), fmt, scaled=False) == (
        1 / 3,
        1 / 3,
    )
    assert math.isclose(explorer._fractions(torch.tensor([[1e-3, 1.0]]), fmt, True)[0], 0.5)
