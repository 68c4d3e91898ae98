"""The generated parts of the docs must match the code."""

from __future__ import annotations

import importlib.util
import math
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


def test_performance_page_is_up_to_date() -> None:
    gen = _load_script("gen_performance")
    assert gen.render() == (DOCS / "performance.md").read_text(encoding="utf-8"), (
        "docs/performance.md is stale: run python docs/gen_performance.py"
    )


def test_performance_page_refuses_a_benchmark_it_cannot_render(tmp_path: Path) -> None:
    gen = _load_script("gen_performance")
    (tmp_path / "no_such_benchmark.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no renderer for .*no_such_benchmark"):
        gen.render(tmp_path)


def test_head_gradient_counts_flushes_and_saturation_as_derived_by_hand() -> None:
    """docs/head_gradient.py (quoted in the README's lab section) on 32 equal tokens of a
    32-class gradient whose numbers follow from the formats' limits alone."""
    import dataclasses

    import torch

    from fp8train.recipes import Recipe

    hg = _load_script("head_gradient")
    row = torch.zeros(32)
    row[0] = -0.92  # the target: p - 1
    row[1] = 0.5
    row[2:6] = 1e-7  # four classes the model pushed down (marked absent)
    dy = row.expand(32, 32).clone()  # (tokens, vocab)
    absent = torch.zeros(32, dtype=torch.bool)
    absent[2:6] = True
    target = torch.zeros(32, dtype=torch.long)
    weight, h = torch.eye(32), torch.ones(32, 4)
    norm = math.hypot(0.92, 0.5)  # |dy . W| / sqrt(32) and |dy^T . h| / sqrt(128) alike
    specs = {r: Recipe.from_name(r).grad_output for r in ("tensorwise", "rowwise", "mxfp8")}
    specs["rceil"] = dataclasses.replace(specs["mxfp8"], mx_rounding="rceil")
    got = {r: hg.head_report(dy, h, weight, target, absent, s) for r, s in specs.items()}

    # Rowwise E4M3, power-of-two scale 2^floor(log2(448 / 0.92)) = 256 per token: 1e-7 *
    # 256 is below half E4M3's smallest subnormal (2^-10), so the four tail values flush
    # (4 of 6 nonzero), all absent bytes; 0.92 * 256 = 235.52 rounds to 240 (0.0175 off).
    rw = got["rowwise"]
    assert rw["dx cast underflow %"] == pytest.approx(100 * 4 / 6)
    assert rw["of which absent bytes %"] == 100
    assert rw["largest flushed"] == pytest.approx(1e-7)
    assert rw["dx cast clipped %"] == 0 and rw["tokens with target clipped %"] == 0
    assert rw["dx error"] == pytest.approx(math.hypot(0.0175, 2e-7) / norm, rel=1e-6)
    assert rw["dx error from flushed"] == pytest.approx(2e-7 / norm, rel=1e-6)
    # Its grad_weight cast scales each class over the tokens: the tails keep their own.
    assert rw["dW cast underflow %"] == 0
    # E5M2, scale 2^floor(log2(57344 / 0.92)) = 2^15: 1e-7 * 2^15 = 3.3e-3 is above 2^-17.
    assert got["tensorwise"]["dx cast underflow %"] == 0
    assert got["tensorwise"]["dx error from flushed"] == 0
    # MX floor rule: E = floor(log2 0.92) - 8 = -9, so 0.92 scales to 471.04, beyond 464
    # (23 above 448, more than the half step of 16 that rounding allows), and is cut to
    # 448 (0.875, 0.045 off), in both casts (the grad_weight cast's 32-token blocks hold
    # 0.92 alone). RCEIL: E = ceil(log2(0.92 / 448)) = -8, 235.52, no clip.
    mx = got["mxfp8"]
    assert mx["tokens with target clipped %"] == 100
    assert mx["dx cast clipped %"] == pytest.approx(100 / 6)
    assert mx["dW cast clipped %"] == pytest.approx(100 / 6)
    assert mx["dx error"] == pytest.approx(0.045 / norm, rel=1e-6)
    assert mx["dW error"] == pytest.approx(0.045 / norm, rel=1e-6)
    assert got["rceil"]["tokens with target clipped %"] == 0
    assert got["rceil"]["dx cast clipped %"] == got["rceil"]["dW cast clipped %"] == 0
