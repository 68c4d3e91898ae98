"""The generated parts of the docs must match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from fp8train.formats import FORMATS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_script(name: str) -> ModuleType:
    # docs/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formats_table_is_up_to_date() -> None:
    gen = _load_script("gen_formats_table")
    text = (DOCS / "numerics.md").read_text(encoding="utf-8")
    assert text.count(gen.START) == 1 and text.count(gen.END) == 1
    assert gen.update(text) == text, (
        "docs/numerics.md has a stale formats table: run python docs/gen_formats_table.py"
    )


def test_formats_table_lists_every_format() -> None:
    table = _load_script("gen_formats_table").render_table()
    for name in FORMATS:
        assert f"| `{name}` |" in table


def test_update_requires_markers() -> None:
    gen = _load_script("gen_formats_table")
    with pytest.raises(ValueError, match="markers"):
        gen.update("no markers here")


def test_numerics_doc_lists_every_recipe_gemm() -> None:
    from fp8train.recipes import describe_all

    text = Path(__file__).parents[1].joinpath("docs", "numerics.md").read_text()
    assert describe_all() in text, "docs/numerics.md recipe GEMMs are stale: paste describe_all()"


def test_head_gradient_counts_flushes_and_saturation_as_derived_by_hand() -> None:
    """docs/head_gradient.py (quoted in the README's lab section) on one 32-class row whose
    numbers follow from the formats' limits alone."""
    import dataclasses

    import torch

    from fp8train.recipes import Recipe

    hg = _load_script("head_gradient")
    dy = torch.zeros(1, 32)
    dy[0, 0] = -0.95  # the target: p - 1
    dy[0, 1] = 0.5
    dy[0, 2:6] = 1e-7  # four classes the model pushed down (marked absent)
    absent = torch.zeros(32, dtype=torch.bool)
    absent[2:6] = True
    target = torch.tensor([0])
    h = torch.ones(1, 4)
    specs = {r: Recipe.from_name(r).grad_output for r in ("tensorwise", "rowwise", "mxfp8")}
    specs["rceil"] = dataclasses.replace(specs["mxfp8"], mx_rounding="rceil")
    got = {r: hg.cast_losses(dy, h, target, absent, s) for r, s in specs.items()}

    # Rowwise E4M3, power-of-two scale 2^floor(log2(448 / 0.95)) = 256: 1e-7 * 256 is
    # below half E4M3's smallest subnormal (2^-10), so the four tail values flush (4 of 6
    # nonzero), all absent bytes; 0.95 * 256 = 243.2 fits.
    assert got["rowwise"]["underflow %"] == pytest.approx(100 * 4 / 6)
    assert got["rowwise"]["of which absent bytes %"] == 100
    assert got["rowwise"]["largest flushed"] == pytest.approx(1e-7)
    assert got["rowwise"]["target clipped %"] == 0
    # E5M2, scale 2^floor(log2(57344 / 0.95)) = 2^15: 1e-7 * 2^15 = 3.3e-3 is above 2^-17.
    assert got["tensorwise"]["underflow %"] == 0
    assert got["tensorwise"]["dW error from flushed"] == 0
    # MX floor rule: E = floor(log2 0.95) - 8 = -9, so 0.95 scales to 486.4 > 448 and is
    # cut to 448 (-7.9% on the target, beyond E4M3's half ulp of 2^-4). RCEIL:
    # E = ceil(log2(0.95 / 448)) = -8, so 0.95 scales to 243.2 and only rounds.
    assert got["mxfp8"]["target clipped %"] == 100
    assert got["rceil"]["target clipped %"] == 0
    # The one clipped value dominates the weight-gradient error: |448/512 - 0.95| / |dy|.
    assert got["mxfp8"]["dW error"] > (0.95 - 448 / 512) / float(dy.norm()) * 0.99
