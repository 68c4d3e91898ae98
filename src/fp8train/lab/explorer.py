"""The format explorer: every format's limits as a table, and three pictures of why FP8
trains where INT8 struggles.

* :func:`formats_table` -- max, smallest normal and subnormal, epsilon and binades of
  dynamic range of every format in :data:`fp8train.formats.FORMATS` (derived from the
  bit fields, never typed in), with bf16 and fp16 from ``torch.finfo`` for reference.
* :func:`plot_formats` -- ``formats_values.png``: the representable values of E4M3,
  E5M2 and INT8 on [-1, 1] and on a log2 axis; ``formats_rounding_error.png``: the
  relative rounding error against magnitude for E4M3, E5M2, BF16 and scaled INT8;
  ``formats_tensors.png``: histograms of a real weight, activation and gradient from
  a lab GPT against each format's range, without and with tensorwise scaling, with
  the underflow and overflow fractions printed on them.
* The same three for FP4 (E2M1, the element format of the mxfp4 and nvfp4 recipes):
  ``formats_fp4_values.png``: its 16 codes, its range beside E4M3's and E5M2's, and
  one row of values as each block's grid times its scale, in mxfp4 and nvfp4;
  ``formats_fp4_rounding_error.png``: relative rounding error against magnitude,
  round-to-nearest and stochastic rounding's expected error and bias;
  ``formats_fp4_tensors.png``: the same real tensors against E2M1's range relative to
  each scaling group's amax, with one scale per tensor and with the mxfp4 and nvfp4
  recipes' block scales.

Every FP8 picture scales a format the way a tensorwise recipe does: multiply so that
the tensor's amax lands on the format's max (for INT8 that is the symmetric grid
``k / 127``). The FP4 pictures quantise with the library's own specs
(:data:`FP4_SCHEMES`), whose scaling groups are a tensor or a block. Plots use
matplotlib's object API (``Figure``): no backend, no global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fp8train.cast import round_to_grid
from fp8train.checkpoint import unique_tmp_path
from fp8train.formats import E2M1, E4M3, E5M2, FORMATS, INT8, Format
from fp8train.monitor import operand_stats
from fp8train.recipes import Recipe
from fp8train.scaling import ScaleSpec, compute_amax, expand_scale
from fp8train.tensor import quantize

__all__ = [
    "FIGURES",
    "FP4_SCHEMES",
    "capture_lab_tensors",
    "e2m1_codes",
    "formats_table",
    "fp4_rounding_error",
    "plot_formats",
]

# The files plot_formats writes, in order: the FP8 pictures, then their FP4 counterparts.
FIGURES = (
    "formats_values.png",
    "formats_rounding_error.png",
    "formats_tensors.png",
    "formats_fp4_values.png",
    "formats_fp4_rounding_error.png",
    "formats_fp4_tensors.png",
)

# One colour per format in every picture.
_COLORS = {
    "e4m3": "#1f77b4",
    "e5m2": "#ff7f0e",
    "int8": "#2ca02c",
    "bf16": "#7f7f7f",
    "e2m1": "#9467bd",
    "stochastic": "#d62728",
}
_LABEL = {"e4m3": "E4M3", "e5m2": "E5M2", "int8": "INT8", "bf16": "BF16", "e2m1": "E2M1"}
_PLOTTED = (E4M3, E5M2, INT8)


# --------------------------------------------------------------------------- the table


def _num(v: float) -> str:
    """Exact and readable: integers as integers, small or huge powers of two as 2^k."""
    m, e = math.frexp(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    if m == 0.5 and (v < 2.0**-4 or v > 1e6):
        return f"2^{e - 1} = {v:.3g}"
    return f"{v:.6g}"


def _policy(fmt: Format) -> str:
    return {
        "ieee": "IEEE: inf, NaN",
        "fn": "fn: NaN, no inf",
        "fnuz": "fnuz: 1 NaN, no -0",
        "finite": "finite only",
        "e8m0": "scale: NaN, no 0",
        "int": "integer grid",
    }[fmt.special]


def _finfo_row(name: str, dtype: torch.dtype) -> list[str]:
    fi = torch.finfo(dtype)
    sub = fi.smallest_normal * fi.eps  # the subnormal quantum: one ulp of the smallest binade
    return [
        name,
        str(fi.bits),
        (f"1-{fi.bits - 1 - round(-math.log2(fi.eps))}-{round(-math.log2(fi.eps))}"),
        "IEEE: inf, NaN",
        _num(fi.max),
        _num(fi.smallest_normal),
        _num(sub),
        _num(fi.eps),
        f"{math.log2(fi.max / sub):.2f}",
    ]


def formats_table(formats: Sequence[Format] | None = None) -> str:
    """Every format's limits as a plain-text table (one row per format, then bf16 and
    fp16 from ``torch.finfo`` for reference, then notes on the columns).

    Columns: ``bits``; ``s-e-m`` (sign, exponent, mantissa bits); the special-value
    policy; ``max``; ``min normal``; ``min subnormal`` (the smallest positive value);
    ``epsilon`` (gap above 1); ``binades`` = ``log2(max / min subnormal)``. Values are
    exact: integers, powers of two as ``2^k`` (with a decimal), otherwise 6 digits.
    """
    rows = []
    for fmt in formats if formats is not None else FORMATS.values():
        layout = (
            f"{int(fmt.signed)}-{fmt.exponent_bits}-{fmt.mantissa_bits}"
            if not fmt.is_integer
            else f"1-{fmt.mantissa_bits} int"
        )
        rows.append(
            [
                fmt.name,
                str(fmt.bits),
                layout,
                _policy(fmt),
                _num(fmt.max),
                _num(fmt.min_normal),
                _num(fmt.min_subnormal),
                _num(fmt.epsilon),
                f"{fmt.binades:.2f}",
            ]
        )
    refs = [_finfo_row("bf16*", torch.bfloat16), _finfo_row("fp16*", torch.float16)]
    head = [
        "format",
        "bits",
        "s-e-m",
        "specials",
        "max",
        "min normal",
        "min subnormal",
        "epsilon",
        "binades",
    ]
    widths = [max(len(r[i]) for r in [head, *rows, *refs]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 4 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    out = [
        line(head),
        line(["-" * w for w in widths]),
        *map(line, rows),
        line(["-" * w for w in widths]),
        *map(line, refs),
        "",
        "binades = log2(max / min subnormal): the dynamic range one scale covers.",
        (
            "epsilon = gap above 1; half of it is the worst relative rounding error "
            "of a normal value."
        ),
        (
            "int8 is the symmetric grid -127..127: its 'min normal' is the step 1, so scaled "
            "to amax it resolves amax/127."
        ),
        "e8m0 is the MX block-scale format (powers of two only), not an element format.",
        "* reference rows from torch.finfo.",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------ lab capture


def capture_lab_tensors(
    *,
    steps: int = 30,
    batch: int = 16,
    layer: str = "blocks.1.mlp.fc",
    corpus_mb: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a small lab GPT in fp32 and capture one layer's real operands.

    The model is ``GPT(vocab=256, seq=64, d_model=128, layers=2, heads=4)`` trained for
    ``steps`` AdamW steps on the first ``corpus_mb`` MiB of the standard-library corpus;
    one more step captures ``layer``'s weight, its input activation and the gradient of
    the loss with respect to its output (no loss scaling: the true gradient). Returns
    ``{"weight", "activation", "gradient"}`` as fp32 CPU tensors plus ``"layer"`` and
    ``"steps"``. The caller's random state is left as it was.
    """
    import torch.nn.functional as F

    from fp8train.lab.data import load_corpus, sample_windows
    from fp8train.lab.gpt import GPT

    seq = 64
    corpus = load_corpus(None, corpus_mb=corpus_mb, val_fraction=0.05, seq=seq)
    captured: dict[str, Any] = {"layer": layer, "steps": steps}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(vocab=256, seq=seq, d_model=128, layers=2, heads=4)
        module = model.get_submodule(layer)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = sample_windows(corpus.train, batch, seq, g)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)

        def keep(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            captured["activation"] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
            out.register_hook(
                lambda g: captured.__setitem__(  # type: ignore[no-untyped-call]
                    "gradient", g.detach().reshape(-1, g.shape[-1]).clone()
                )
            )

        handle = module.register_forward_hook(keep)
        x, y = sample_windows(corpus.train, batch, seq, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        handle.remove()
        captured["weight"] = module.weight.detach().clone()  # type: ignore[operator]
    return captured


# --------------------------------------------------------------------------- pictures


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    tmp = unique_tmp_path(path)  # two writers never share a temporary
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unit_grid(fmt: Format) -> torch.Tensor:
    """The format's finite values scaled so that max is 1 (float64, ascending)."""
    return torch.tensor(fmt.values, dtype=torch.float64) / fmt.max


def _plot_values(path: Path) -> Path:
    """(a) The grids on [-1, 1], a zoom on [0, 1/16], and |x| on a log2 axis."""
    fig = _figure((11, 8.5))
    ax_lin, ax_zoom, ax_log = fig.subplots(3, 1, height_ratios=[1, 1, 1.25])
    rows = {fmt.name: i for i, fmt in enumerate(reversed(_PLOTTED))}
    ticks = [rows[f.name] for f in _PLOTTED]
    labels = [f"{_LABEL[f.name]} ({len(f.values)} values)" for f in _PLOTTED]
    for fmt in _PLOTTED:
        grid = _unit_grid(fmt)
        pos = grid[grid > 0]
        kw = {
            "lineoffsets": rows[fmt.name],
            "linelengths": 0.75,
            "colors": _COLORS[fmt.name],
            "linewidths": 0.6,
        }
        ax_lin.eventplot(grid.numpy(), **kw)
        ax_zoom.eventplot(grid[(grid >= 0) & (grid <= 1 / 16)].numpy(), **kw)
        ax_log.eventplot(torch.log2(pos).numpy(), **kw)
        n_zoom = int(((grid > 0) & (grid <= 1 / 16)).sum())
        ax_zoom.text(
            1 / 16 * 1.005,
            rows[fmt.name],
            f"{n_zoom} values in (0, 1/16]",
            va="center",
            fontsize=8,
            color=_COLORS[fmt.name],
        )
        lo = math.log2(fmt.min_subnormal / fmt.max)
        ax_log.annotate(
            f"smallest: 2^{lo:.1f}",
            (lo, rows[fmt.name] + 0.42),
            fontsize=8,
            ha="left",
            color=_COLORS[fmt.name],
        )
        top = pos[pos > 0.5]  # the top binade (1/2, 1]
        ax_log.text(
            0.3,
            rows[fmt.name],
            f"{len(top)} in (1/2, 1]",
            va="center",
            fontsize=8,
            color=_COLORS[fmt.name],
        )
    for ax in (ax_lin, ax_zoom, ax_log):
        ax.set_yticks(ticks, labels)
        ax.set_ylim(-0.6, len(_PLOTTED) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    ax_lin.set_xlim(-1.02, 1.02)
    ax_lin.set_title(
        "Representable values, each format scaled so that its max is 1 "
        "(tensorwise scaling to amax = 1; INT8 = k/127)"
    )
    ax_lin.set_xlabel("x on [-1, 1]: FP8 values crowd towards 0, INT8 is an even comb")
    ax_zoom.set_xlim(0, 1 / 16 * 1.25)
    ax_zoom.set_xlabel(
        "zoom on [0, 1/16]: INT8 keeps only 7 steps here; E4M3 and E5M2 still have dozens"
    )
    ax_log.set_xlim(-34, 4.5)
    ax_log.set_xlabel(
        "log2 |x| (positive values): a float format has the same number of "
        "values in every binade; INT8 packs half its values into the top binade"
    )
    return _save(fig, path)


def _relative_error(fmt: Format | None, mags: torch.Tensor) -> torch.Tensor:
    """|round(x) - x| / x for magnitudes ``mags`` (fp32, amax = 1), the format scaled to
    put 1 on its max; ``fmt=None`` is BF16 (no scaling needed). 1.0 means flushed."""
    if fmt is None:
        q = mags.to(torch.bfloat16).double()
        y = mags.double()
    else:
        y32 = mags * fmt.max  # the scaled value the cast sees (fp32, as the cast does)
        q = round_to_grid(y32, fmt).double()
        y = y32.double()
    return (q - y).abs() / y


def _plot_rounding_error(path: Path) -> Path:
    """(b) Relative rounding error against magnitude (relative to amax), log-log."""
    lo_exp = -40
    n = 40_000
    g = torch.Generator().manual_seed(0)
    # Log-uniform magnitudes over [2^-40, 1]: every binade equally sampled.
    mags = torch.exp2(lo_exp * torch.rand(n, generator=g, dtype=torch.float64)).float()
    log_mag = torch.log2(mags.double())
    # Worst case per binade of |x|/amax: within one binade a float format's relative
    # error bound falls by 2x from bottom to top; the maximum shows the bound itself.
    which = torch.floor(log_mag).long() - lo_exp  # bin i covers [lo_exp + i, lo_exp + i + 1)
    centres = torch.arange(lo_exp, 0, dtype=torch.float64) + 0.5
    fig = _figure((11, 6.2))
    ax = fig.subplots()
    for fmt in (E4M3, E5M2, None, INT8):
        name = "bf16" if fmt is None else fmt.name
        err = _relative_error(fmt, mags).clamp(min=1e-7)
        worst = torch.zeros(-lo_exp, dtype=torch.float64).scatter_reduce(
            0, which, err, "amax", include_self=False
        )
        ax.scatter(
            log_mag[::4].numpy(),
            err[::4].numpy(),
            s=1.0,
            alpha=0.07,
            color=_COLORS[name],
            rasterized=True,
        )
        label = (
            f"{_LABEL[name]}, unscaled"
            if fmt is None
            else f"{_LABEL[name]}, amax scaled to {int(fmt.max)}"
        )
        ax.plot(
            centres.numpy(),
            worst.numpy(),
            color=_COLORS[name],
            lw=2.0,
            marker="o",
            ms=3,
            label=f"{label} (worst case per binade)",
        )
    ax.set_yscale("log")
    ax.set_xlim(lo_exp, 0.5)
    ax.set_ylim(2e-4, 2.5)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1.5}
    ax.text(-39.5, 1.25, "100%: flushed to zero", fontsize=9)
    ax.text(
        -29.5,
        0.16,
        "E5M2 (2 mantissa bits): flat at ~11% over ~30 binades",
        fontsize=9,
        color=_COLORS["e5m2"],
        bbox=box,
    )
    ax.text(
        -14.8,
        0.048,
        "E4M3 (3 mantissa bits): flat at ~6% over ~15 binades",
        fontsize=9,
        color=_COLORS["e4m3"],
        va="top",
        bbox=box,
    )
    ax.text(
        -3.2,
        0.022,
        "INT8: one step (amax/127) everywhere, so the\nrelative error "
        "grows as 1/x: 0.4% at amax,\n6% at amax/16, 100% below amax/254",
        fontsize=9,
        color=_COLORS["int8"],
        ha="right",
        va="top",
        bbox=box,
    )
    ax.text(
        -39.5,
        0.0052,
        "BF16 (7 mantissa bits, fp32's exponent): flat at ~0.4% over "
        "the whole range, no scaling needed",
        fontsize=9,
        color=_COLORS["bf16"],
        bbox=box,
    )
    ax.set_xlabel("log2 (|x| / amax): how far below the tensor's largest value")
    ax.set_ylabel("relative rounding error |q(x) - x| / |x|")
    ax.set_title(
        "Exponent versus linear grid: a float format's relative error is flat "
        "across binades, INT8's is not"
    )
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3, which="major")
    return _save(fig, path)


def _fractions(x: torch.Tensor, fmt: Format, scaled: bool) -> tuple[float, float]:
    """(underflow, overflow) of casting ``x``: without scaling (scale 1) or with one
    tensorwise scale putting amax on ``fmt.max``. Underflow: nonzero values flushed to
    zero; overflow: values that would round past max, clipped (as the monitor counts
    them: :func:`fp8train.monitor.operand_stats`)."""
    spec = ScaleSpec(fmt=fmt)
    q = quantize(x, spec) if scaled else quantize(x, spec, scale=torch.tensor(1.0))
    st = operand_stats(x, q)
    return st.underflow, st.clipped_fraction


def _range_bar(ax: Any, fmt: Format, scale: float, y: float, height: float) -> None:
    """A bar over log2 |x| covering what ``fmt`` represents at this scale: solid for the
    normal range, hatched for the subnormals."""
    color = _COLORS[fmt.name]
    top = math.log2(fmt.max / scale)
    normal = math.log2(fmt.min_normal / scale)
    bottom = math.log2(fmt.min_subnormal / scale)
    ax.broken_barh(
        [(normal, top - normal)],
        (y, height),
        color=color,
        alpha=0.55,
        transform=ax.get_xaxis_transform(),
    )
    if normal > bottom:
        ax.broken_barh(
            [(bottom, normal - bottom)],
            (y, height),
            facecolor="none",
            edgecolor=color,
            hatch="////",
            lw=0.6,
            transform=ax.get_xaxis_transform(),
        )
    ax.text(
        top + 0.4,
        y + height / 2,
        _LABEL[fmt.name],
        va="center",
        fontsize=7,
        color=color,
        transform=ax.get_xaxis_transform(),
    )


def _plot_tensors(captured: dict[str, Any], path: Path) -> Path:
    """(c) log2 |x| histograms of weight, activation and gradient against each format's
    range, without scaling (left) and with a tensorwise scale to max (right). Both
    panels of a row share the x axis: the histogram stays put and scaling moves the
    formats' ranges onto it."""
    kinds = [
        ("weight", "weight W"),
        ("activation", "input activation x"),
        ("gradient", "output gradient dL/dy (no loss scaling)"),
    ]
    fig = _figure((13, 10.5))
    axes = fig.subplots(3, 2, sharey="row")
    for row, (key, title) in enumerate(kinds):
        x = captured[key].float()
        nz = x[x != 0].abs()
        lx = torch.log2(nz.double())
        amax = float(nz.max())
        # One x range per row: the histogram and every bar, scaled or not.
        ends = [float(lx.min()), float(lx.max())]
        for fmt in _PLOTTED:
            for scale in (1.0, fmt.max / amax):
                ends += [math.log2(fmt.min_subnormal / scale), math.log2(fmt.max / scale)]
        lo, hi = min(ends) - 1.5, max(ends) + 4.5
        for col, scaled in enumerate((False, True)):
            ax = axes[row][col]
            ax.hist(
                lx.numpy(),
                bins=120,
                color="#444444",
                alpha=0.8,
                weights=torch.full_like(lx, 100.0 / len(lx)).numpy(),
            )
            lines = []
            for i, fmt in enumerate(_PLOTTED):
                scale = fmt.max / amax if scaled else 1.0
                _range_bar(ax, fmt, scale, 0.93 - 0.07 * i, 0.05)
                under, over = _fractions(x, fmt, scaled)
                lines.append(f"{_LABEL[fmt.name]}: underflow {under:7.2%}  overflow {over:.2%}")
            ax.text(
                0.015,
                0.70,
                "\n".join(lines),
                transform=ax.transAxes,
                fontsize=8,
                va="top",
                family="monospace",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"},
            )
            ax.set_xlim(lo, hi)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.9)  # room for the bars and the text
            how = "tensorwise scale, amax -> format max" if scaled else "no scaling"
            ax.set_title(f"{title} {tuple(x.shape)}: {how}", fontsize=9)
            ax.set_xlabel("log2 |x|")
            ax.axvline(math.log2(amax), color="black", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("% of nonzero values")
    fig.suptitle(
        f"Real tensors of lab GPT layer {captured.get('layer', '?')} after "
        f"{captured.get('steps', '?')} steps against each format's range\n(bars: solid = "
        "normal, hatched = subnormal; dotted line = amax; underflow = nonzero values "
        "flushed to zero, overflow = values clipped at max)",
        fontsize=10,
    )
    return _save(fig, path)


# ------------------------------------------------------------------------ FP4 pictures


# How the FP4 pictures scale a tensor, one column of formats_fp4_tensors.png each: a
# label and the spec per captured tensor ("weight", "activation", "gradient"). One
# FP32 scale per tensor is the baseline that shows why FP4 needs block scales; the
# others are the mxfp4 and nvfp4 recipes' own specs (weight, input, grad_output).
def _recipe_specs(name: str) -> dict[str, ScaleSpec]:
    r = Recipe.from_name(name)
    return {"weight": r.weight, "activation": r.input, "gradient": r.grad_output}


_TENSORWISE_FP4 = ScaleSpec(fmt=E2M1)
FP4_SCHEMES: tuple[tuple[str, dict[str, ScaleSpec]], ...] = (
    (
        "one FP32 scale per tensor, amax -> 6",
        dict.fromkeys(("weight", "activation", "gradient"), _TENSORWISE_FP4),
    ),
    ("mxfp4: one E8M0 scale per 1x32 block, floor rule", _recipe_specs("mxfp4")),
    (
        "nvfp4: E4M3 scale per 1x16 block (W: 16x16) x FP32 per tensor",
        _recipe_specs("nvfp4"),
    ),
)
# The block-scaled schemes of the values picture: one row of 32 values as an input.
_BLOCK_SCHEMES: tuple[tuple[str, ScaleSpec], ...] = tuple(
    (label, specs["activation"]) for label, specs in FP4_SCHEMES[1:]
)


def e2m1_codes() -> list[tuple[int, float]]:
    """The 16 E2M1 codes in code order with their values (``-0.0`` for code 8): what
    ``formats_fp4_values.png`` draws. Decoded from the bit fields by
    :meth:`fp8train.formats.Format.decode`."""
    return [(code, E2M1.decode(code)) for code in range(2**E2M1.bits)]


def _e2m1_neighbours(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid points just below and just above each magnitude ``y`` in [0, 6]
    (float64; both equal ``y`` where it is on the grid's top)."""
    grid = torch.tensor([v for v in E2M1.values if v >= 0], dtype=torch.float64)
    idx = (torch.searchsorted(grid, y, right=True) - 1).clamp(0, len(grid) - 1)
    lo = grid[idx]
    hi = grid[(idx + 1).clamp(max=len(grid) - 1)]
    return lo, torch.where(y >= grid[-1], lo, hi)


def fp4_rounding_error(
    mags: torch.Tensor, *, draws: int = 0, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Relative rounding error of E2M1 for magnitudes ``mags`` in (0, 1] relative to
    their group's amax, the amax mapped onto E2M1's max (6), as a tensorwise or NVFP4
    block scale does. Returns float64 tensors shaped like ``mags``:

    * ``"nearest"``: ``|q(x) - x| / x`` for round-to-nearest-even (1.0 = flushed), and
      ``"nearest_signed"``: ``(q(x) - x) / x``, its bias (the cast is deterministic);
    * ``"sr_expected"``: stochastic rounding's exact expected error ``E|q(x) - x| / x``
      ``= 2 f (1 - f) h / x``, with ``h`` the gap between the grid points around
      ``x`` and ``f`` the fraction of it below ``x`` (up with probability ``f``, error
      ``(1 - f) h``; down otherwise, error ``f h``). Its bias ``E[q(x)] - x`` is 0.

    ``draws > 0`` adds the library's stochastic cast measured over that many draws per
    magnitude: ``"sr_mean_abs"`` (mean ``|q - x| / x``), ``"sr_bias"`` (mean
    ``(q - x) / x``) and ``"sr_bias_se"`` (its standard error).
    """
    y32 = mags.float() * E2M1.max  # the scaled value the cast sees (fp32, as the cast does)
    y = y32.double()
    q = round_to_grid(y32, E2M1).double()
    lo, hi = _e2m1_neighbours(y)
    h = hi - lo
    f = torch.where(h > 0, (y - lo) / torch.where(h > 0, h, 1.0), 0.0)
    out = {
        "nearest": (q - y).abs() / y,
        "nearest_signed": (q - y) / y,
        "sr_expected": 2 * f * (1 - f) * h / y,
    }
    if draws > 0:
        rep = y32.expand(draws, *y32.shape)
        qs = round_to_grid(rep, E2M1, rounding="stochastic", generator=generator).double()
        rel = (qs - y) / y  # (draws, *mags.shape)
        out["sr_mean_abs"] = rel.abs().mean(0)
        out["sr_bias"] = rel.mean(0)
        out["sr_bias_se"] = rel.std(0) / math.sqrt(draws)
    return out


def _plot_fp4_values(path: Path) -> Path:
    return _save(_fp4_values_figure(), path)


def _fp4_values_figure() -> Any:
    """(d) E2M1's 16 codes (one ``vlines`` collection with gid ``"e2m1_codes"`` in the
    first axes), its range against E4M3 and E5M2 on a log2 axis, and one row of 32
    values as each block's grid times its scale."""
    fig = _figure((11, 10.5))
    blocks = [f"block{i}" for i in range(len(_BLOCK_SCHEMES))]
    axd = fig.subplot_mosaic(
        [["codes"] * len(blocks), ["log"] * len(blocks), blocks],
        height_ratios=[1.1, 0.9, 1.3],
    )
    ax_codes, ax_log = axd["codes"], axd["log"]
    color = _COLORS["e2m1"]

    # Codes: a stem per value, each labelled with its 4 bits (sign, 2 exponent, 1
    # mantissa); +0 and -0 share x = 0.
    codes = e2m1_codes()
    ax_codes.vlines([v for _, v in codes], 0, 1, color=color, lw=1.5, gid="e2m1_codes")
    for code, v in codes:
        negative = code >> 3
        ax_codes.text(
            v,
            1.08 if not negative else -0.08,
            f"{code:04b}",
            ha="center",
            va="bottom" if not negative else "top",
            fontsize=8,
            family="monospace",
        )
        if v > 0 or (v == 0 and not negative):
            ax_codes.text(v, 0.5, f" {v:g}", fontsize=9, color=color, va="center")
    e4m3 = torch.tensor(E4M3.values) * (E2M1.max / E4M3.max)
    ax_codes.eventplot(
        e4m3.numpy(), lineoffsets=-0.55, linelengths=0.35, colors=_COLORS["e4m3"], linewidths=0.4
    )
    ax_codes.text(
        6.25, -0.55, "E4M3 scaled\nto max 6", fontsize=7, color=_COLORS["e4m3"], va="center"
    )
    ax_codes.set_xlim(-6.6, 7.4)
    ax_codes.set_ylim(-0.8, 1.35)
    ax_codes.set_yticks([])
    ax_codes.set_xticks(range(-6, 7))
    ax_codes.grid(axis="x", alpha=0.3)
    ax_codes.set_title(
        f"E2M1: 16 codes (bits above: sign, exponent, mantissa; negatives below), "
        f"{len(E2M1.values)} values, max {E2M1.max:g}, smallest {E2M1.min_subnormal:g}"
    )
    ax_codes.set_xlabel(
        "value: a step of 0.5 up to 2, of 1 up to 4, then only 6; no inf, no NaN "
        "(E4M3, scaled to the same max, has 253 values)"
    )

    # Range: each format's positive values with its max at 1 (log2 axis).
    plotted = (E2M1, E4M3, E5M2)
    for i, fmt in enumerate(plotted):
        row = len(plotted) - 1 - i
        pos = _unit_grid(fmt)
        pos = pos[pos > 0]
        ax_log.eventplot(
            torch.log2(pos).numpy(),
            lineoffsets=row,
            linelengths=0.7,
            colors=_COLORS[fmt.name],
            linewidths=0.8 if fmt is E2M1 else 0.5,
        )
        ax_log.text(
            -33.5,
            row,
            f"{_LABEL[fmt.name]}: {fmt.binades:.1f} binades, {len(pos)} positive values",
            va="center",
            fontsize=8,
            color=_COLORS[fmt.name],
        )
    ax_log.set_yticks([])
    ax_log.set_ylim(-0.6, len(plotted) - 0.4)
    ax_log.set_xlim(-34, 1)
    ax_log.grid(axis="x", alpha=0.3)
    ax_log.set_xlabel(
        "log2 (x / max): one scale covers 3.6 binades in E2M1 against 17.8 in E4M3, so "
        "FP4 recipes give every 16 or 32 values their own scale"
    )

    # One row of 32 values (row 0 of a 4x32 tensor of N(0, 1) draws, so that a
    # per-tensor scale has other rows to come from), quantised by the library.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    idx = torch.arange(32)
    ymax = 0.0
    for name, (label, spec) in zip(blocks, _BLOCK_SCHEMES, strict=True):
        ax = axd[name]
        q = quantize(x, spec)
        scale = expand_scale(q.scale, (4, 32), spec).expand(4, 32)[0]  # (32,) per element
        deq = q.dequantize(torch.float32)[0]
        width = spec.block[1]
        tops = []
        for b0 in range(0, 32, width):
            s_b = float(scale[b0])  # multiply to enter, divide to leave
            grid = torch.tensor(E2M1.values, dtype=torch.float64) / s_b
            ax.hlines(grid.numpy(), b0 - 0.45, b0 + width - 0.55, color=color, lw=0.9, alpha=0.6)
            amax_b = float(x[0, b0 : b0 + width].abs().max())
            tops.append(f"{E2M1.max / s_b / amax_b:.2f}")
            if b0:
                ax.axvline(b0 - 0.5, color="black", lw=0.8)
        ax.scatter(idx.numpy(), x[0].numpy(), s=16, color="black", label="value", zorder=3)
        ax.scatter(
            idx.numpy(),
            deq.numpy(),
            s=36,
            marker="x",
            color=_COLORS["stochastic"],
            label="after the cast",
            zorder=4,
        )
        ax.set_xlim(-0.8, 31.8)
        ax.set_xlabel("element of the row (vertical line: block boundary)", fontsize=8)
        ax.legend(loc="lower left", fontsize=7, ncols=2)
        # One y range for every panel (room under the grid for the legend).
        ymax = max(ymax, float(E2M1.max / scale.min()))
        ax.set_title(
            f"{label}\nhorizontal lines: the block's grid, E2M1 / scale; grid top = "
            f"{' and '.join(tops)} x the block's amax",
            fontsize=8,
        )
    for name in blocks:
        axd[name].set_ylim(-1.35 * ymax, 1.1 * ymax)
    axd[blocks[0]].set_ylabel("value")
    fig.supxlabel(
        "A block's values are E2M1's grid times its scale. MX's floor rule puts the block's "
        "amax in [4, 8) x 2^E, so the grid's top, 6 x 2^E,\nlies between 0.75x and 1.5x "
        "amax (values above 7 x 2^E clip). NVFP4 stores an E4M3 block scale of about amax/6 "
        "under a per-tensor\nFP32 scale, which puts the grid's top within E4M3's rounding "
        "(at most 1/16) of amax.",
        fontsize=8.5,
    )
    return fig


def _plot_fp4_rounding_error(path: Path) -> Path:
    """(e) E2M1's relative rounding error against magnitude: nearest and stochastic
    rounding's expected error (left), and the bias of each (right)."""
    lo_exp = -8
    mags = torch.exp2(torch.linspace(lo_exp, 0, 4001, dtype=torch.float64))
    err = fp4_rounding_error(mags)
    g = torch.Generator().manual_seed(0)
    sparse = torch.exp2(torch.linspace(lo_exp + 0.03, -0.03, 97, dtype=torch.float64))
    draws = 4000
    emp = fp4_rounding_error(sparse, draws=draws, generator=g)
    lx, ls = torch.log2(mags).numpy(), torch.log2(sparse).numpy()
    e4m3 = _relative_error(E4M3, mags.float()).clamp(min=1e-7)

    fig = _figure((13, 6.2))
    ax_err, ax_bias = fig.subplots(1, 2)
    ax_err.plot(
        lx,
        err["nearest"].clamp(min=1e-7).numpy(),
        color=_COLORS["e2m1"],
        lw=1.4,
        label="E2M1, round to nearest even",
    )
    ax_err.plot(
        lx,
        err["sr_expected"].clamp(min=1e-7).numpy(),
        color=_COLORS["stochastic"],
        lw=1.2,
        label="E2M1, stochastic: expected |error| (exact)",
    )
    ax_err.scatter(
        ls,
        emp["sr_mean_abs"].numpy(),
        s=10,
        color=_COLORS["stochastic"],
        label=f"E2M1, stochastic: mean of {draws} casts",
    )
    ax_err.plot(
        lx,
        e4m3.numpy(),
        color=_COLORS["e4m3"],
        lw=0.8,
        alpha=0.8,
        label="E4M3, amax scaled to 448 (for comparison)",
    )
    ax_err.set_yscale("log")
    ax_err.set_ylim(3e-3, 3)
    ax_err.axhline(1.0, color="black", lw=0.8, ls=":")
    ax_err.set_ylabel("relative rounding error |q(x) - x| / |x|")
    ax_err.set_title(
        "Relative error: 1 mantissa bit, so up to 1/3 above amax/12 (0.75, a tie, rounds "
        "to 1)\nand 100% below amax/24, where nearest flushes; stochastic pays more "
        "|error| for no bias",
        fontsize=9,
    )
    ax_err.legend(loc="lower left", fontsize=8)

    ax_bias.plot(
        lx,
        err["nearest_signed"].numpy(),
        color=_COLORS["e2m1"],
        lw=1.4,
        label="round to nearest even: (q(x) - x) / x",
    )
    band = 2 * emp["sr_bias_se"]
    ax_bias.fill_between(
        ls,
        (emp["sr_bias"] - band).numpy(),
        (emp["sr_bias"] + band).numpy(),
        color=_COLORS["stochastic"],
        alpha=0.25,
        lw=0,
    )
    ax_bias.plot(
        ls,
        emp["sr_bias"].numpy(),
        color=_COLORS["stochastic"],
        marker="o",
        ms=3,
        lw=0.8,
        label=f"stochastic: mean (q - x) / x over {draws} casts, +-2 SE",
    )
    ax_bias.axhline(0.0, color="black", lw=0.8)
    ax_bias.set_ylim(-1.15, 1.1)  # nearest spans -100% (flushed) to +100% (up to 0.5)
    ax_bias.set_ylabel("relative bias E[q(x)] / x - 1")
    ax_bias.set_title(
        "Bias: nearest is systematically off and drops everything below amax/24;\n"
        "stochastic rounding is unbiased everywhere, so small gradients survive "
        "in expectation",
        fontsize=9,
    )
    ax_bias.legend(loc=(0.02, 0.2), fontsize=8)
    for ax in (ax_err, ax_bias):
        ax.set_xlim(lo_exp, 0.2)
        flush = math.log2(E2M1.min_subnormal / 2 / E2M1.max)
        ax.axvline(flush, color="black", lw=0.8, ls="--")
        ax.axvline(math.log2(E2M1.min_subnormal / E2M1.max), color="#999999", lw=0.8, ls="--")
        ax.set_xlabel(
            "log2 (|x| / amax), amax mapped to 6 (dashed: amax/24, half the smallest "
            "value; grey: amax/12, the smallest)",
            fontsize=8,
        )
        ax.grid(alpha=0.3)
    fig.suptitle(
        "E2M1 rounding error against magnitude (amax scaled onto max 6, as a "
        "tensorwise or NVFP4 scale does)",
        fontsize=10,
    )
    return _save(fig, path)


def _group_amax(x: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    """Each element's scaling-group amax, shaped like ``x`` (2-D)."""
    amax = compute_amax(x, spec).float()
    return expand_scale(amax, (x.shape[0], x.shape[1]), spec).expand_as(x)


def _plot_fp4_tensors(captured: dict[str, Any], path: Path) -> Path:
    """(f) Each real tensor's values relative to their scaling group's amax, against
    E2M1's range, for every scheme in :data:`FP4_SCHEMES` (one column each)."""
    kinds = [
        ("weight", "weight W"),
        ("activation", "input activation x"),
        ("gradient", "output gradient dL/dy"),
    ]
    cols = len(FP4_SCHEMES)
    fig = _figure((6.5 * cols, 10.5))
    axes = fig.subplots(3, cols, sharey="row", squeeze=False)
    # E2M1 with its max on the group's amax: normal [1/6, 1], subnormal 1/12 (log2 axis).
    top, normal = 0.0, math.log2(E2M1.min_normal / E2M1.max)
    bottom = math.log2(E2M1.min_subnormal / E2M1.max)
    flush = math.log2(E2M1.min_subnormal / 2 / E2M1.max)
    for row, (key, title) in enumerate(kinds):
        x = captured[key].float()
        for col, (label, specs) in enumerate(FP4_SCHEMES):
            ax = axes[row][col]
            spec = specs[key]
            rel = (x.abs() / _group_amax(x, spec))[x != 0]
            lr = torch.log2(rel.double())
            ax.hist(
                lr.clamp(min=-24).numpy(),  # the rare values further down pile up at -24
                bins=96,  # quarter binades; numpy's last bin is closed, so holds each amax
                range=(-24, 0),
                color="#444444",
                alpha=0.8,
                weights=torch.full_like(lr, 100.0 / len(lr)).numpy(),
            )
            ax.axvspan(normal, top, color=_COLORS["e2m1"], alpha=0.25, lw=0)
            ax.axvspan(
                bottom,
                normal,
                facecolor="none",
                edgecolor=_COLORS["e2m1"],
                hatch="////",
                lw=0.0,
                alpha=0.6,
            )
            ax.axvline(flush, color="black", lw=0.8, ls="--")
            # Seeded: nvfp4 rounds gradients stochastically, and the picture must not
            # change from one run to the next.
            g = torch.Generator().manual_seed(0)
            st = operand_stats(x, quantize(x, spec, generator=g))
            below = float((lr < flush).double().mean())
            ax.text(
                0.015,
                0.97,
                f"underflow {st.underflow:7.2%}\nclipped   {st.clipped_fraction:7.2%}\n"
                f"SQNR      {st.sqnr_db:5.1f} dB\n{below:7.2%} of values < amax/24 of their group",
                transform=ax.transAxes,
                fontsize=8,
                va="top",
                family="monospace",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"},
            )
            ax.set_xlim(-24, 1)
            how = spec.describe().removeprefix("e2m1 ")
            ax.set_title(f"{title} {tuple(x.shape)}\n{label}\n({how})", fontsize=8.5)
            ax.set_xlabel("log2 (|x| / amax of its scaling group); below -24 drawn at -24")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("% of nonzero values")
    fig.suptitle(
        f"Real tensors of lab GPT layer {captured.get('layer', '?')} after "
        f"{captured.get('steps', '?')} steps against E2M1's range, each value measured from "
        "its scaling group's amax\n(shaded: E2M1's normal values with the group's amax on 6; "
        "hatched: its one subnormal, 0.5; dashed: amax/24, below which round-to-nearest "
        "flushes to zero;\nMX's floor rule shifts the grid by -0.4 to +0.6 binades per block, "
        "NVFP4's E4M3 scale by at most 1/16. Underflow, clipping and SQNR: the library's cast "
        "of the whole tensor,\none draw of it for nvfp4's stochastically rounded gradient)",
        fontsize=10,
    )
    return _save(fig, path)


def plot_formats(out_dir: str | Path, *, captured: dict[str, Any] | None = None) -> list[Path]:
    """Write the six explorer PNGs (see :data:`FIGURES`) into ``out_dir`` (created if
    missing) and return their paths. ``captured``: tensors from
    :func:`capture_lab_tensors` (``"weight"``, ``"activation"``, ``"gradient"``; 2-D
    floats); captured afresh when ``None`` (a few seconds on a CPU)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if captured is None:
        captured = capture_lab_tensors()
    missing = {"weight", "activation", "gradient"} - set(captured)
    if missing:
        raise ValueError(
            f"captured tensors lack {sorted(missing)}; pass the dict that "
            "capture_lab_tensors() returns"
        )
    return [
        _plot_values(out / FIGURES[0]),
        _plot_rounding_error(out / FIGURES[1]),
        _plot_tensors(captured, out / FIGURES[2]),
        _plot_fp4_values(out / FIGURES[3]),
        _plot_fp4_rounding_error(out / FIGURES[4]),
        _plot_fp4_tensors(captured, out / FIGURES[5]),
    ]
