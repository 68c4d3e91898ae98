"""The health part of a lab report, read back from a :class:`fp8train.monitor.Monitor`
JSONL log: a per-layer heatmap PNG and a markdown "Health" section.

* :func:`read_log` parses the log (non-finite floats were written as ``"inf"``,
  ``"-inf"`` and ``"nan"`` strings; they come back as floats).
* :func:`plot_heatmap` draws layers x observed steps, one row of panels per operand
  role: underflow % (log colour scale) and SQNR in dB.
* :func:`health_markdown` renders the section: a table of every layer and operand at
  its last observation, the BF16 shadow errors if any, and the warnings.
* :func:`write_health` does both for a report folder and returns the markdown.

Nothing here imports the monitor: a log file is all it needs, so a report can be
redrawn from a saved run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["HEATMAP", "health_markdown", "plot_heatmap", "read_log", "write_health"]

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


def plot_heatmap(log: str | Path | list[dict[str, Any]], path: str | Path) -> Path | None:
    """Draw the heatmap (layers x observed steps; per role: underflow %, SQNR dB) to
    ``path``; return it, or ``None`` when the log holds no layer statistics."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    recs = [r for r in _records(log) if r["kind"] == "layer" and r.get("role") != "output"]
    if not recs:
        return None
    layers, roles = _layers_and_roles(recs)
    steps = sorted({r["step"] for r in recs})
    col = {s: i for i, s in enumerate(steps)}
    row = {name: i for i, name in enumerate(layers)}
    under = {role: np.full((len(layers), len(steps)), np.nan) for role in roles}
    sqnr = {role: np.full((len(layers), len(steps)), np.nan) for role in roles}
    for r in recs:
        i, j = row[r["layer"]], col[r["step"]]
        if r.get("underflow") is not None:
            under[r["role"]][i, j] = max(100.0 * r["underflow"], _UNDERFLOW_FLOOR_PCT)
        if r.get("sqnr_db") is not None:
            sqnr[r["role"]][i, j] = r["sqnr_db"]
    finite = np.concatenate([a[np.isfinite(a)] for a in sqnr.values()] + [np.zeros(0)])
    s_lo, s_hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # Near-lossless casts (re-quantising FP8 values, ~140 dB) would stretch the colour
    # scale and flatten the ~20-40 dB range where problems show; cap it (values above
    # the cap take the top colour).
    s_hi = min(s_hi, max(s_lo + 1.0, 60.0))
    if s_hi - s_lo < 1.0:
        s_lo, s_hi = s_lo - 0.5, s_hi + 0.5
    u_hi = max(
        1.0,
        float(np.nanmax([np.nanmax(a) if np.isfinite(a).any() else 0.0 for a in under.values()])),
    )

    panel_h = max(1.6, 0.17 * len(layers) + 0.9)
    fig = Figure(figsize=(13, panel_h * len(roles) + 0.8), layout="constrained")
    axes = fig.subplots(len(roles), 2, squeeze=False)
    cmap_u = _cmap("magma_r")
    cmap_s = _cmap("viridis")
    im_u: Any = None
    im_s: Any = None
    for k, role in enumerate(roles):
        ax_u, ax_s = axes[k]
        im_u = ax_u.imshow(
            under[role],
            aspect="auto",
            interpolation="nearest",
            cmap=cmap_u,
            norm=LogNorm(vmin=_UNDERFLOW_FLOOR_PCT, vmax=u_hi),
        )
        # +inf (exact) is drawn with the top colour; the colourbar says so.
        im_s = ax_s.imshow(
            np.clip(sqnr[role], s_lo, s_hi),
            aspect="auto",
            interpolation="nearest",
            cmap=cmap_s,
            vmin=s_lo,
            vmax=s_hi,
        )
        for ax, what in (
            (ax_u, "underflow (% of nonzero values flushed to zero)"),
            (ax_s, "SQNR of the quantisation (dB)"),
        ):
            ax.set_title(f"{role}: {what}", fontsize=9)
            ax.set_yticks(range(len(layers)), layers, fontsize=7)
            ticks = _step_ticks(len(steps))
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
            ax.set_xlabel("step", fontsize=8)
        ax_s.set_yticklabels([])
    cb_u = fig.colorbar(im_u, ax=axes[:, 0].tolist(), shrink=0.6, pad=0.01)
    cb_u.set_label(
        f"underflow % (log; <= {_UNDERFLOW_FLOOR_PCT:g}% incl. 0 at the bottom)", fontsize=8
    )
    cb_s = fig.colorbar(im_s, ax=axes[:, 1].tolist(), shrink=0.6, pad=0.01)
    cb_s.set_label("SQNR dB (higher is better; exact = top colour)", fontsize=8)
    fig.suptitle(
        "Per-layer FP8 health: layers x observed steps (blank: not observed or NaN/inf)",
        fontsize=10,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
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
    """The section ``## {title}``: context, the heatmap link (``heatmap``: its path
    relative to the markdown, or ``None``), a table of every layer and operand at its
    last observation, the BF16 shadow errors if the log has any, and the warnings."""
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
        f"From the training monitor: {len(observed)} observed step"
        f"{'s' if len(observed) != 1 else ''}"
        + (f" ({observed[0]} to {observed[-1]})" if observed else "")
        + f", {len(layers)} FP8 layers, {len(warns)} warning{'s' if len(warns) != 1 else ''}. "
        "Underflow: nonzero values flushed to zero; overflow: values at or beyond the "
        "format's max before saturation (clipped: would round past max, lost to "
        "saturation); SQNR: signal to quantisation noise of the cast; staleness (delayed "
        "scaling): amax over the history amax its scale came from."
    )
    if steps:
        last = steps[-1]
        lines.append(
            f"Last observed step {last['step']}: loss {_g(last.get('loss'), '.4f')}, "
            f"gradient norm {_g(last.get('grad_norm'))}, loss scale "
            f"{_g(last.get('loss_scale'))}, {last.get('skipped_total', 0)} skipped steps."
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
    log: str | Path, out_dir: str | Path, *, name: str = HEATMAP, title: str = "Health"
) -> str:
    """Draw the heatmap as ``out_dir/name`` and return the markdown section linking it
    (several runs in one report: give each its own ``name`` and ``title``)."""
    records = read_log(log)
    drawn = plot_heatmap(records, Path(out_dir) / name)
    return health_markdown(records, heatmap=name if drawn is not None else None, title=title)
