"""A binary --data file is refused with the share of its bytes that are not text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fp8train.lab import data
from fp8train.lab.cli import main


def test_non_text_fraction_counts_bytes_that_are_not_text() -> None:
    assert data.non_text_fraction(b"") == 0.0
    assert data.non_text_fraction(b"plain ASCII\twith\r\nwhitespace\f\v") == 0.0
    assert data.non_text_fraction("UTF-8: héllo wörld, 漢字, \u2028".encode()) == 0.0
    assert data.non_text_fraction(b"\x00\x07\x1b\x7f") == 1.0  # controls and DEL
    assert data.non_text_fraction("\x85".encode()) == 1.0  # a C1 control: valid UTF-8, 2 bytes
    assert data.non_text_fraction(b"ab\xff\xfe") == 0.5  # bytes of no UTF-8 sequence
    # Every byte value once: 28 ASCII controls (0-8, 14-31, 127) and 128 bytes that
    # start no valid sequence in this order (0x80-0xff).
    assert data.non_text_fraction(bytes(range(256))) == (28 + 128) / 256


def test_latin1_text_passes_and_random_bytes_do_not() -> None:
    latin1 = ("Le coeur a ses raisons que la raison ne connaît point. " * 50).encode("latin-1")
    assert data.non_text_fraction(latin1) < data.MAX_NON_TEXT_FRACTION
    noise = random.Random(0).randbytes(50_000)
    assert data.non_text_fraction(noise) > 0.5


def test_binary_data_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(random.Random(0).randbytes(20_000))  # no NUL-free text in sight
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(blob), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fp8train: error: ") and "not text" in err
    pct = f"{data.non_text_fraction(blob.read_bytes()):.1%}"
    assert f"{pct} of its bytes" in err
    assert not out.exists()  # refused before anything was written
