"""The format explorer: the table against the format definitions, the lab capture, the
six PNGs, and the FP4 panels' numbers against ml_dtypes' float4_e2m1fn."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from fp8train.formats import FORMATS, Format
from fp8train.lab import explorer
from fp8train.lab.cli import main
from fp8train.recipes import Recipe

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


def test_plot_formats_writes_six_pngs(tmp_path: Path, captured: dict[str, Any]) -> None:
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


# ----------------------------------------------------------------------------- FP4


def _ml_e2m1(codes: np.ndarray) -> np.ndarray:
    """ml_dtypes' decode of 4-bit codes (held in the low bits of a byte) as float64."""
    values: np.ndarray = codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    return values


def test_fp4_codes_are_ml_dtypes_decode_of_all_16() -> None:
    ref = _ml_e2m1(np.arange(16))
    got = explorer.e2m1_codes()
    assert [c for c, _ in got] == list(range(16))
    for (code, value), r in zip(got, ref, strict=True):
        # Bit for bit, so code 8 must be -0.0, not +0.0.
        assert struct.pack(">d", value) == struct.pack(">d", float(r)), (code, value, r)


def test_fp4_values_panel_draws_the_ml_dtypes_grid() -> None:
    fig = explorer._fp4_values_figure()
    stems = [c for c in fig.axes[0].collections if c.get_gid() == "e2m1_codes"]
    assert len(stems) == 1
    xs = sorted(float(seg[0][0]) for seg in stems[0].get_segments())
    assert xs == sorted(_ml_e2m1(np.arange(16)).tolist())  # 16 stems, +0 and -0 both at 0


def test_fp4_nearest_error_matches_ml_dtypes() -> None:
    g = torch.Generator().manual_seed(1)
    # Log-uniform over 10 binades below the amax, plus the top and exact ties.
    mags = torch.cat(
        [
            torch.exp2(-10 * torch.rand(5000, generator=g, dtype=torch.float64)),
            torch.tensor([1.0, 0.125, 1 / 48, 5 / 6], dtype=torch.float64),
        ]
    )
    err = explorer.fp4_rounding_error(mags)
    y32 = (mags.float() * 6).numpy()  # the scaled value, in fp32 as the cast computes it
    q = y32.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)  # RNE, saturating
    y = y32.astype(np.float64)
    np.testing.assert_array_equal(err["nearest"].numpy(), np.abs(q - y) / y)
    np.testing.assert_array_equal(err["nearest_signed"].numpy(), (q - y) / y)
    # Hand-derived: 0.75 ties to 1 (even code), 0.125 ties to 0, 5 ties to 4, 6 is exact.
    assert err["nearest"][-4:].tolist() == [0.0, 1 / 3, 1.0, 0.2]


def test_fp4_stochastic_error_formula_and_measured_bias() -> None:
    # y = 0.375 (mags 1/16): between 0 and 0.5, f = 0.75, E|err| = 2 f (1 - f) h = 0.1875.
    # y = 5 (mags 5/6): between 4 and 6, f = 1/2, E|err| = 1 (the nearest error's 0.2 x 5).
    exact = explorer.fp4_rounding_error(torch.tensor([1 / 16, 5 / 6, 1.0], dtype=torch.float64))
    assert exact["sr_expected"].tolist() == pytest.approx([0.5, 0.2, 0.0], abs=1e-7)
    g = torch.Generator().manual_seed(2)
    mags = torch.exp2(torch.linspace(-7, -0.01, 60, dtype=torch.float64))
    draws = 3000
    got = explorer.fp4_rounding_error(mags, draws=draws, generator=g)
    # Statistical bounds: 6 standard errors over 60 magnitudes (a false alarm ~1e-7).
    z_bias = got["sr_bias"] / got["sr_bias_se"].clamp(min=1e-12)
    assert float(z_bias.abs().max()) < 6, float(z_bias.abs().max())
    # |q - x| / x takes two values per x, (1 - f) h / x and f h / x, at most h / x apart,
    # so its standard deviation is at most h / (2 x): 6 standard errors of the mean.
    y = mags * 6
    lo, hi = explorer._e2m1_neighbours(y)
    bound = 6 * ((hi - lo) / y) / (2 * math.sqrt(draws))
    assert bool(((got["sr_mean_abs"] - got["sr_expected"]).abs() <= bound).all())
    # And stochastic rounding is unbiased where nearest is not: below amax/24 nearest
    # loses everything.
    assert float(got["nearest_signed"][mags < 1 / 24].max()) == -1.0


def test_fp4_group_amax_is_each_blocks_max() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 96, generator=g)
    (_, tensorwise), (_, mx), (_, nv) = explorer.FP4_SCHEMES
    assert bool((explorer._group_amax(x, tensorwise["weight"]) == x.abs().max()).all())
    a = x.abs()
    rows = a.reshape(32, 3, 32).amax(-1, keepdim=True).expand(32, 3, 32).reshape(32, 96)
    assert torch.equal(explorer._group_amax(x, mx["activation"]), rows)
    rows16 = a.reshape(32, 6, 16).amax(-1, keepdim=True).expand(32, 6, 16).reshape(32, 96)
    assert torch.equal(explorer._group_amax(x, nv["activation"]), rows16)
    tiles = a.reshape(2, 16, 6, 16).amax((1, 3), keepdim=True).expand(2, 16, 6, 16)
    assert torch.equal(explorer._group_amax(x, nv["weight"]), tiles.reshape(32, 96))


def test_fp4_schemes_are_the_recipes_specs() -> None:
    # The picture shows what training does: each column quantises with its recipe's specs.
    for (_, specs), name in zip(explorer.FP4_SCHEMES[1:], ("mxfp4", "nvfp4"), strict=True):
        r = Recipe.from_name(name)
        assert specs == {"weight": r.weight, "activation": r.input, "gradient": r.grad_output}
    assert {s.fmt.name for _, specs in explorer.FP4_SCHEMES for s in specs.values()} == {"e2m1"}


def test_formats_cli_plots_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "e2m1" in out and "448" in out  # the table still prints first
    for name in explorer.FIGURES:
        assert f"wrote {tmp_path / name}" in out
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
