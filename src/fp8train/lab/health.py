"""The health part of a lab report, read back from a :class:`fp8train.monitor.Monitor`
JSONL log: a per-layer heatmap PNG and a markdown "Health" section.

* :func:`read_log` parses the log (non-finite floats were written as ``"inf"``,
  ``"-inf"`` and ``"nan"`` strings; they come back as floats).
* :func:`plot_heatmap` draws layers x observed steps, one row of panels per operand
  role: underflow % (log colour scale) and SQNR in dB, each panel with its colour bar,
  and a caption saying what the ``.t`` operands are.
* :func:`heatmap_scales` fits one colour scale per quantity over several logs, so that
  every heatmap of a run says the same value with the same colour.
* :func:`health_markdown` renders the section: a table of every layer and operand at
  its last observation, the BF16 shadow errors if any, and the warnings.
* :func:`write_health` does both for a report folder and returns the markdown.

Nothing here imports the monitor: a log file is all it needs, so a report can be
redrawn from a saved run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp8train.checkpoint import unique_tmp_path
from fp8train.lab.verdicts import plural

__all__ = [
    "HEATMAP",
    "HeatmapScales",
    "health_markdown",
    "heatmap_scales",
    "plot_heatmap",
    "read_log",
    "write_health",
]

# File name of the heatmap inside a report folder.
HEATMAP = "health_heatmap.png"

# Canonical order of operand roles (rows of panels, rows of the table).
_ROLES = ("input", "weight", "grad_output", "input.t", "weight.t", "grad_output.t")
# Fields that may hold the strings "inf", "-inf" or "nan".
_FLOAT_FIELDS = (
    "amax",
    "scale_min",
    "scale_max",
    "underflow",
    "overflow",
    "clipped",
    "sqnr_db",
    "staleness",
    "bf16_rel_err",
    "loss",
    "loss_median",
    "grad_norm",
    "loss_scale",
    "value",
    "threshold",
    "reference",
)
# Underflow percentages at or below this are drawn with the lowest colour (log scale).
_UNDERFLOW_FLOOR_PCT = 1e-4
# SQNR above this takes the top colour (see heatmap_scales).
_SQNR_CAP_DB = 60.0
# What each operand role is, for the panel titles. Shapes: x (M, K), W (N, K), dy (M, N).
# A ".t" role is the same tensor quantised again along its other axis, because a
# backward GEMM contracts that axis and a per-row/per-block scale belongs to the axis it
# was taken along; recipes whose scales do not depend on the axis (one per tensor,
# square tiles) reuse the forward's quantisation and have no ".t" rows.
_ROLE_NOTES = {
    "input": "x for output = x.W^T",
    "weight": "W for output = x.W^T",
    "grad_output": "dy for grad_input = dy.W",
    "input.t": "x re-quantised along M for grad_weight = dy^T.x",
    "weight.t": "W re-quantised along N for grad_input = dy.W",
    "grad_output.t": "dy re-quantised along M for grad_weight = dy^T.x",
}
# In the markdown of a log with ".t" rows.
_TRANSPOSED_NOTE = (
    " Operands ending in `.t` are the transposed operand re-quantised along its other "
    "axis for a backward GEMM: `input.t` and `grad_output.t` feed grad_weight = dy^T.x "
    "(contracting the M tokens), `weight.t` feeds grad_input = dy.W (contracting the N "
    "outputs); a per-row or per-block scale belongs to the axis it was taken along, so "
    "the forward's quantisation cannot be reused there."
)
# Under every heatmap: what the ".t" rows are and that the scales are shared.
_CAPTION = (
    "A '.t' operand is the transposed operand re-quantised along its other axis for a "
    "backward GEMM: a rowwise, 1x128 or MX scale belongs to the axis it was taken along.\n"
    "Shapes: x (M tokens, K in), W (N out, K in), dy (M, N). Recipes with no '.t' rows "
    "(one scale per tensor, square tiles) reuse the forward's quantisation.\n"
    "Colour scales are shared by every precision of the run: underflow {floor:g}% (and 0) "
    "to {u_hi:.3g}% (log); SQNR {s_lo:.1f} to {s_hi:.1f} dB (higher is better; exact casts "
    "and values above the top take the top colour)."
)
# How many warnings the markdown lists before pointing at the log.
_MAX_WARNINGS = 30


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a monitor JSONL log, in order, with non-finite floats restored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            for key in _FLOAT_FIELDS:
                if isinstance(rec.get(key), str):
                    rec[key] = float(rec[key])
            records.append(rec)
    return records


def _records(log: str | Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return log if isinstance(log, list) else read_log(log)


def _layers_and_roles(layer_recs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    layers: list[str] = []
    for r in layer_recs:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    present = {r["role"] for r in layer_recs}
    roles = [r for r in _ROLES if r in present]
    roles += sorted(present - set(_ROLES) - {"output"})
    return layers, roles


@dataclass(frozen=True)
class HeatmapScales:
    """The colour scales of the heatmaps, one per quantity. A report draws every
    precision's heatmap with the same scales (``heatmap_scales`` over all their logs), so
    one colour means one value in every file of the run."""

    underflow_max_pct: float  # top of the log underflow scale
    sqnr_lo_db: float  # bottom of the SQNR scale
    sqnr_hi_db: float  # top of the SQNR scale (higher values take the top colour)
    # Bottom of the log underflow scale: lower values, 0 included, take the bottom colour.
    underflow_min_pct: float = _UNDERFLOW_FLOOR_PCT


def _layer_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "layer" and r.get("role") != "output"]


def heatmap_scales(*logs: str | Path | list[dict[str, Any]]) -> HeatmapScales:
    """Scales that fit every value of every log given (pass all the logs of a run)."""
    recs = [r for log in logs for r in _layer_records(_records(log))]
    under = [100.0 * r["underflow"] for r in recs if r.get("underflow") is not None]
    sqnr = [r["sqnr_db"] for r in recs if r.get("sqnr_db") is not None]
    sqnr = [v for v in sqnr if math.isfinite(v)]
    s_lo, s_hi = (min(sqnr), max(sqnr)) if sqnr else (0.0, 1.0)
    # Near-lossless casts (re-quantising FP8 values, ~140 dB) would stretch the colour
    # scale and flatten the ~20-40 dB range where problems show; cap it (values above
    # the cap take the top colour).
    s_hi = min(s_hi, max(s_lo + 1.0, _SQNR_CAP_DB))
    if s_hi - s_lo < 1.0:
        s_lo, s_hi = s_lo - 0.5, s_hi + 0.5
    finite_under = [u for u in under if math.isfinite(u)]
    # At least 1%: a run whose worst underflow is tiny should look pale, not saturated.
    u_hi = max(1.0, *finite_under) if finite_under else 1.0
    return HeatmapScales(underflow_max_pct=u_hi, sqnr_lo_db=s_lo, sqnr_hi_db=s_hi)


def plot_heatmap(
    log: str | Path | list[dict[str, Any]],
    path: str | Path,
    *,
    scales: HeatmapScales | None = None,
    title: str = "Per-layer FP8 health",
) -> Path | None:
    """Draw the heatmap (layers x observed steps; per operand role: underflow %, SQNR dB;
    a colour bar beside every panel) to ``path``; return it, or ``None`` when the log
    holds no layer statistics. ``scales``: the run's shared colour scales (default: fit
    to this log alone)."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    recs = _layer_records(_records(log))
    if not recs:
        return None
    scales = scales if scales is not None else heatmap_scales(recs)
    layers, roles = _layers_and_roles(recs)
    steps = sorted({r["step"] for r in recs})
    col = {s: i for i, s in enumerate(steps)}
    row = {name: i for i, name in enumerate(layers)}
    under = {role: np.full((len(layers), len(steps)), np.nan) for role in roles}
    sqnr = {role: np.full((len(layers), len(steps)), np.nan) for role in roles}
    for r in recs:
        i, j = row[r["layer"]], col[r["step"]]
        if r.get("underflow") is not None:
            under[r["role"]][i, j] = max(100.0 * r["underflow"], scales.underflow_min_pct)
        if r.get("sqnr_db") is not None:
            sqnr[r["role"]][i, j] = r["sqnr_db"]

    panel_h = max(1.8, 0.17 * len(layers) + 1.1)
    fig = Figure(figsize=(14, panel_h * len(roles) + 1.6), layout="constrained")
    axes = fig.subplots(len(roles), 2, squeeze=False)
    u_norm = LogNorm(vmin=scales.underflow_min_pct, vmax=scales.underflow_max_pct)
    ticks = _step_ticks(len(steps))
    for k, role in enumerate(roles):
        ax_u, ax_s = axes[k]
        im_u = ax_u.imshow(
            under[role], aspect="auto", interpolation="nearest", cmap=_cmap("magma_r"), norm=u_norm
        )
        # +inf (exact) is drawn with the top colour, as is anything above the cap.
        im_s = ax_s.imshow(
            np.clip(sqnr[role], scales.sqnr_lo_db, scales.sqnr_hi_db),
            aspect="auto",
            interpolation="nearest",
            cmap=_cmap("viridis"),
            vmin=scales.sqnr_lo_db,
            vmax=scales.sqnr_hi_db,
        )
        for ax, im, what, unit in (
            (ax_u, im_u, "underflow", "% flushed (log)"),
            (ax_s, im_s, "SQNR", "dB"),
        ):
            ax.set_title(f"{role}: {what} - {_ROLE_NOTES.get(role, '')}", fontsize=8.5)
            ax.set_yticks(range(len(layers)), layers, fontsize=7)
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
            ax.set_xlabel("step", fontsize=8)
            bar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.05, aspect=12)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(unit, fontsize=7)
        ax_s.set_yticklabels([])
    fig.suptitle(f"{title}: layers x observed steps (grey: not observed or NaN/inf)", fontsize=10)
    # supxlabel, not fig.text: the constrained layout makes room for it.
    fig.supxlabel(
        _CAPTION.format(
            floor=scales.underflow_min_pct,
            u_hi=scales.underflow_max_pct,
            s_lo=scales.sqnr_lo_db,
            s_hi=scales.sqnr_hi_db,
        ),
        fontsize=8,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp_path(out)  # two writers never share a temporary
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#eeeeee")  # NaN: not observed


def _step_ticks(n: int, most: int = 12) -> list[int]:
    stride = max(1, math.ceil(n / most))
    return list(range(0, n, stride))


def _g(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:{spec}}"


def _rel(r: dict[str, Any]) -> float:
    return float(r["bf16_rel_err"])


def _pct(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return "0" if v == 0 else f"{100 * v:.3g}"


def health_markdown(
    log: str | Path | list[dict[str, Any]],
    *,
    heatmap: str | None = HEATMAP,
    title: str = "Health",
) -> str:
    """The section ``## {title}``: context (with what the ``.t`` operands are, when the
    log has any), the heatmap link (``heatmap``: its path relative to the markdown, or
    ``None``), a table of every layer and operand at its last observation, the BF16
    shadow errors if the log has any, and the warnings."""
    records = _records(log)
    layer_recs = [r for r in records if r["kind"] == "layer" and r.get("role") != "output"]
    shadow = [r for r in records if r["kind"] == "layer" and r.get("role") == "output"]
    steps = [r for r in records if r["kind"] == "step"]
    warns = [r for r in records if r["kind"] == "warning"]
    lines = [f"## {title}", ""]
    if not records:
        return "\n".join([*lines, "The monitor log is empty: nothing was observed.", ""])
    observed = sorted({r["step"] for r in layer_recs})
    layers, roles = _layers_and_roles(layer_recs) if layer_recs else ([], [])
    lines.append(
        f"From the training monitor: {plural(len(observed), 'observed step')}"
        + (f" ({observed[0]} to {observed[-1]})" if observed else "")
        + f", {plural(len(layers), 'FP8 layer')}, {plural(len(warns), 'warning')}. "
        "Underflow: nonzero values flushed to zero; overflow: values at or beyond the "
        "format's max before saturation (clipped: would round past max, lost to "
        "saturation); SQNR: signal to quantisation noise of the cast; staleness (delayed "
        "scaling): amax over the history amax its scale came from."
        + (_TRANSPOSED_NOTE if any(role.endswith(".t") for role in roles) else "")
    )
    if steps:
        last = steps[-1]
        lines.append(
            f"Last observed step {last['step']}: loss {_g(last.get('loss'), '.4f')}, "
            f"gradient norm {_g(last.get('grad_norm'))}, loss scale "
            f"{_g(last.get('loss_scale'))}, {plural(last.get('skipped_total', 0), 'skipped step')}."
        )
    lines.append("")
    if heatmap is not None and layer_recs:
        lines += [f"![per-layer underflow and SQNR]({heatmap})", ""]
    if layer_recs:
        final: dict[tuple[str, str], dict[str, Any]] = {}
        for r in layer_recs:
            final[(r["layer"], r["role"])] = r  # the log is in step order: last one wins
        delayed = any(r.get("staleness") is not None for r in final.values())
        head = [
            "layer",
            "operand",
            "format",
            "step",
            "amax",
            "scale",
            "underflow %",
            "overflow %",
            "clipped %",
            "SQNR dB",
        ] + (["staleness"] if delayed else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in layers:
            for role in roles:
                if (name, role) not in final:
                    continue
                r = final[(name, role)]
                lo, hi = r.get("scale_min"), r.get("scale_max")
                scale = _g(hi) if lo == hi else f"{_g(lo)}..{_g(hi)}"
                if r.get("nonfinite_calls") and r.get("underflow") is None:
                    scale = "NaN/inf input"
                row = [
                    f"`{name}`",
                    role,
                    r.get("fmt") or "",
                    str(r["step"]),
                    _g(r.get("amax")),
                    scale,
                    _pct(r.get("underflow")),
                    _pct(r.get("overflow")),
                    _pct(r.get("clipped")),
                    _g(r.get("sqnr_db"), ".1f"),
                ]
                if delayed:
                    row.append(_g(r.get("staleness")))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if shadow:
        last_shadow: dict[str, dict[str, Any]] = {r["layer"]: r for r in shadow}
        finite = [r for r in last_shadow.values() if math.isfinite(r["bf16_rel_err"])]
        worst = (
            f"largest {100 * max(finite, key=_rel)['bf16_rel_err']:.2f}% in "
            f"`{max(finite, key=_rel)['layer']}`"
            if finite
            else "no finite value"
        )
        lines += [
            f"BF16 shadow check (last at step {shadow[-1]['step']}; relative error of the FP8 "
            f"output against F.linear in bf16 on the same input): {worst}; "
            + ", ".join(
                f"`{n}` "
                + (
                    f"{100 * r['bf16_rel_err']:.2f}%"
                    if math.isfinite(r["bf16_rel_err"])
                    else "n/a (NaN/inf)"
                )
                for n, r in last_shadow.items()
            )
            + ".",
            "",
        ]
    lines += [f"### Warnings ({len(warns)})", ""]
    if not warns:
        lines += [
            (
                "None: no loss spike, underflow or overflow past its threshold, scale "
                "jump or NaN/inf was seen."
            ),
            "",
        ]
    else:
        for w in warns[:_MAX_WARNINGS]:
            where = (
                f"`{w['layer']}` {w['operand']}" if w.get("layer") else str(w.get("operand") or "")
            )
            # Drop the message's "fp8train monitor: step N: <where>: " prefix.
            msg = w["message"].split(": ", 3)[-1]
            lines.append(f"- step {w['step']}, {w['type']}, {where}: {msg}")
        if len(warns) > _MAX_WARNINGS:
            lines.append(f"- ... and {len(warns) - _MAX_WARNINGS} more in the monitor log")
        lines.append("")
    return "\n".join(lines)


def write_health(
    log: str | Path,
    out_dir: str | Path,
    *,
    name: str = HEATMAP,
    title: str = "Health",
    scales: HeatmapScales | None = None,
) -> str:
    """Draw the heatmap as ``out_dir/name`` and return the markdown section linking it
    (several runs in one report: give each its own ``name`` and ``title``, and the
    run's shared ``scales`` from ``heatmap_scales`` over all their logs)."""
    records = read_log(log)
    drawn = plot_heatmap(records, Path(out_dir) / name, scales=scales, title=title)
    return health_markdown(records, heatmap=name if drawn is not None else None, title=title)
