"""Every health heatmap of a run uses one colour scale per quantity, fitted over all its
precisions; each panel has its colour bar beside it; the '.t' operands are explained
in the figure and in the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fp8train.lab import report

pytest.importorskip("matplotlib")


def _log(path: Path, underflow: float, sqnr_db: float) -> None:
    """A monitor log of two layers, two roles, two steps: a common cell (underflow 1%,
    SQNR 20 dB) and one cell per run set by the arguments."""
    recs = []
    for step in (0, 5):
        for layer in ("blocks.0.fc", "head"):
            for role in ("input", "input.t"):
                mine = layer == "head" and step == 5
                recs.append(
                    {
                        "step": step,
                        "kind": "layer",
                        "layer": layer,
                        "role": role,
                        "fmt": "e4m3",
                        "underflow": underflow if mine else 0.01,
                        "sqnr_db": sqnr_db if mine else 20.0,
                    }
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_heatmaps_share_scales_and_explain_transposed_operands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    # Two runs whose ranges differ: drawn alone, each would get its own colour scale.
    _log(tmp_path / "monitor" / "rowwise-seed0.jsonl", underflow=0.0, sqnr_db=35.0)
    _log(tmp_path / "monitor" / "mxfp8-seed0.jsonl", underflow=0.4, sqnr_db=8.0)
    figures: list[Any] = []
    savefig = Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> None:
        savefig(fig, *args, **kwargs)  # draws: the layout is final afterwards
        figures.append(fig)

    monkeypatch.setattr(Figure, "savefig", keep)
    results = {"seeds": [0], "runs": {"bf16": {}, "rowwise": {}, "mxfp8": {}}}
    md = report.health_sections(results, tmp_path)
    assert len(figures) == 2
    assert (tmp_path / "health_rowwise.png").exists() and (tmp_path / "health_mxfp8.png").exists()

    scales = []
    for fig in figures:
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        panels = [ax for ax in fig.axes if ax.images]
        assert len(panels) == 4 and len(bars) == len(panels)  # one bar per panel
        for ax in panels:
            box = ax.get_position()
            beside = [
                b.get_position()
                for b in bars
                if 0 <= b.get_position().x0 - box.x1 < 0.05
                and b.get_position().y0 >= box.y0 - 0.01
                and b.get_position().y1 <= box.y1 + 0.01
            ]
            assert len(beside) == 1, "a colour bar right of each panel, within its height"
        scales.append(
            sorted(
                (im.get_cmap().name, im.norm.vmin, im.norm.vmax)
                for ax in panels
                for im in ax.images
            )
        )
        text = " ".join(t.get_text() for t in fig.findobj(Text))
        assert "'.t' operand is the transposed operand re-quantised" in text
    # One scale per quantity for the whole run, spanning both runs' values.
    assert scales[0] == scales[1]
    by_cmap = {name: (lo, hi) for name, lo, hi in scales[0]}
    assert by_cmap["magma_r"][1] == pytest.approx(40.0)  # underflow %: mxfp8's 40%
    assert by_cmap["viridis"] == pytest.approx((8.0, 35.0))  # SQNR dB: both runs
    assert "same colour scale per quantity" in md
    assert "`.t` are the transposed operand re-quantised along its other axis" in md
