"""Shared fixtures for the lab tests: a small text folder and an in-process CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fp8train.lab.cli import main


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A folder of three small text files (about 6 KB), plus things the loader must skip:
    a hidden file and a binary file."""
    folder = tmp_path / "text"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.txt", "b.py", "sub/c.md"]):
        lines = [
            f"line {j} of file {i}: the quick brown fox jumps over the lazy dog\n"
            for j in range(30)
        ]
        (folder / name).write_text("".join(lines))
    (folder / ".hidden").write_text("not part of the corpus\n")
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return folder


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., int]:
    """Run ``fp8train`` in this process (cwd = tmp_path, so runs/ lands there)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> int:
        return main([*args, "--quiet"])

    return run
