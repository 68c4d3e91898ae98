"""The generated parts of the docs must match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from fp8train.formats import FORMATS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_generator() -> ModuleType:
    # docs/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location(
        "gen_formats_table", DOCS / "gen_formats_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formats_table_is_up_to_date() -> None:
    gen = _load_generator()
    text = (DOCS / "numerics.md").read_text(encoding="utf-8")
    assert text.count(gen.START) == 1 and text.count(gen.END) == 1
    assert gen.update(text) == text, (
        "docs/numerics.md has a stale formats table: run python docs/gen_formats_table.py"
    )


def test_formats_table_lists_every_format() -> None:
    table = _load_generator().render_table()
    for name in FORMATS:
        assert f"| `{name}` |" in table


def test_update_requires_markers() -> None:
    gen = _load_generator()
    with pytest.raises(ValueError, match="markers"):
        gen.update("no markers here")


def test_numerics_doc_lists_every_recipe_gemm() -> None:
    from fp8train.recipes import describe_all

    text = Path(__file__).parents[1].joinpath("docs", "numerics.md").read_text()
    assert describe_all() in text, "docs/numerics.md recipe GEMMs are stale: paste describe_all()"
