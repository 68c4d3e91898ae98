"""Helpers the lab tests import (a uniquely named module, unlike conftest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FP8_PRECISIONS = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8", "int8")


def read_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())
