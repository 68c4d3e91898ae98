"""Helpers the lab tests import (a uniquely named module, unlike conftest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FP8_PRECISIONS = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8", "int8")


def tiny_compare(text_dir: Path, *options: str) -> list[str]:
    """The CLI arguments of a ``compare`` on the tiny preset over ``text_dir``, then
    ``options``."""
    return ["compare", "--preset", "tiny", "--data", str(text_dir), *options]


def read_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())
