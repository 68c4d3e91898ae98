"""The human side of a comparison: ``loss_curves.png`` and ``report.md``.

Everything here reads ``results.json``'s structure and nothing else, so a report can
be redrawn from a saved file. Plots use matplotlib's object API (``Figure``), which
needs no backend choice and touches no global state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fp8train.checkpoint import atomic_write_bytes, unique_tmp_path
from fp8train.lab.config import (
    ABLATION_SEPARATOR,
    ABLATIONS,
    PRECISIONS,
    LabError,
    guarded,
    stores_fp8_activations,
    uses_fp8_optimizer,
)
from fp8train.lab.verdicts import plural, thresholds_text

__all__ = [
    "guard_markdown",
    "ledger_markdown",
    "markdown",
    "plot_curves",
    "plot_ledger",
    "require_plotting",
    "write_report",
]

# How --grad-comm averaged DDP's gradients, for the report's data-parallel line.
_GRAD_COMM_HOOKS = {
    "bf16": " (torch's bf16_compress_hook)",
    "fp8": " (fp8train's fp8_compress_hook: E4M3, one scale per 128 elements, summed in fp32)",
}


def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LabError("the lab needs rich and matplotlib: pip install 'fp8train[lab]'") from None


# One fixed colour per precision, so reports compare at a glance: the default precisions
# (in their order), then the FP4 recipes and the torchao peers; a guarded run takes one
# of the last three; an ablation ("<recipe>~<name>") the colour of its ablation's name.
_PALETTE = [
    "#000000",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_MORE_BASES = {
    "mxfp4": "#637939",
    "nvfp4": "#7b4173",
    "torchao-tensorwise": "#843c39",
    "torchao-rowwise": "#393b79",
}
_ABLATION_PALETTE = [  # as many as ABLATIONS has names: no two ablations share one
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#d6616b",
    "#8c6d31",
    "#de9ed6",
    "#636363",
    "#9ecae1",
    "#fd8d3c",
    "#74c476",
    "#ce6dbd",
    "#e7ba52",
    "#6baed6",
    "#ad494a",
    "#a1d99b",
]


def _color(precision: str) -> str:
    base = precision.split("+")[0]  # a "+fp8act" variant shares its recipe's colour
    recipe, _, ablation = base.partition(ABLATION_SEPARATOR)
    i = PRECISIONS.index(base) if base in PRECISIONS else len(PRECISIONS)
    if guarded(precision):  # its own colour, read against its unguarded run's
        return _PALETTE[len(PRECISIONS) + (0 if i < 2 else 1 + i % 2)]
    if ablation:
        k = list(ABLATIONS).index(ablation) if ablation in ABLATIONS else len(ABLATIONS)
        return _ABLATION_PALETTE[k % len(_ABLATION_PALETTE)]
    if recipe in _MORE_BASES:
        return _MORE_BASES[recipe]
    return _PALETTE[i % len(_PALETTE)]


def _style(precision: str) -> str:
    """Dashed for runs with FP8 activation storage, dotted for FP8 optimizer states,
    dash-dotted for both, so that each variant pairs with its recipe's colour."""
    act, optim = stores_fp8_activations(precision), uses_fp8_optimizer(precision)
    return {(False, False): "-", (True, False): "--", (False, True): ":", (True, True): "-."}[
        (act, optim)
    ]


def _ema(values: list[float | None], alpha: float = 0.1) -> list[float]:
    """Exponential moving average of the train loss (per-batch losses are noisy)."""
    out, acc = [], math.nan
    for v in values:
        x = math.nan if v is None else v
        acc = x if math.isnan(acc) else (1 - alpha) * acc + alpha * x
        out.append(acc)
    return out


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Two panels: train (smoothed, thin) and validation (markers) loss against step for
    every precision; each precision's validation-loss gap to bf16 in percent."""
    from matplotlib.figure import Figure

    runs = results["runs"]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_loss, ax_gap = fig.subplots(1, 2)
    for precision, run in runs.items():
        c = run["curves"]
        color = _color(precision)
        ax_loss.plot(c["train_step"], _ema(c["train_loss"]), color=color, lw=0.8, alpha=0.45)
        ax_loss.plot(
            c["val_step"],
            _nan(c["val_loss"]),
            color=color,
            ls=_style(precision),
            lw=1.6,
            marker="o",
            ms=2.5,
            label=precision,
        )
    _mark_guard_actions(ax_loss, runs)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.set_title("validation (markers) and train loss (thin, EMA 0.1)")
    ax_loss.legend(fontsize=8, ncol=2)
    ax_loss.grid(alpha=0.3)
    vals = [v for run in runs.values() for v in _nan(run["curves"]["val_loss"][1:])]
    finite = [v for v in vals if math.isfinite(v)]
    if finite:  # the untrained loss (step 0) would squash the rest of the curve
        lo, hi = min(finite), max(finite)
        ax_loss.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))

    bf16 = runs.get("bf16")
    if bf16 is None:
        ax_gap.text(
            0.5,
            0.5,
            "bf16 not run: no reference",
            ha="center",
            va="center",
            transform=ax_gap.transAxes,
        )
    else:
        ref = _nan(bf16["curves"]["val_loss"])
        for precision, run in runs.items():
            if precision == "bf16":
                continue
            gap = [
                100.0 * (v - r) / r
                for v, r in zip(_nan(run["curves"]["val_loss"]), ref, strict=False)
            ]
            ax_gap.plot(
                run["curves"]["val_step"],
                gap,
                color=_color(precision),
                ls=_style(precision),
                lw=1.4,
                marker="o",
                ms=2.5,
                label=precision,
            )
        ax_gap.axhline(0.0, color=_color("bf16"), lw=1.0, ls="--", label="bf16")
        ax_gap.legend(fontsize=8, ncol=2)
    ax_gap.set_xlabel("step")
    ax_gap.set_ylabel("validation loss gap to bf16 (%)")
    seeds = results.get("seeds", [])
    ax_gap.set_title(
        f"gap to bf16 ({'mean of ' + str(len(seeds)) + ' seeds' if len(seeds) > 1 else 'one seed'})"
    )
    ax_gap.grid(alpha=0.3)
    _save(fig, path)


def _guard_events(run: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(seed, event)`` of every guard action of a "+guard" run, in seed order."""
    return [
        (seed_run["seed"], e)
        for seed_run in run.get("per_seed", [])
        for e in (seed_run.get("guard") or {}).get("events", [])
    ]


def _event_label(e: dict[str, Any]) -> str:
    where = f" {e['layer']}" if e.get("layer") else ""
    to = f" -> {e['to']}" if e.get("to") else ""
    back = f" (back to {e['to_step']})" if "to_step" in e else ""
    return f"{e['action']}{where}{to}{back}"


def _mark_guard_actions(ax: Any, runs: dict[str, Any]) -> None:
    """Each guard action as a triangle at the foot of the loss panel, at the step it was
    taken (every seed's; the first seed's labelled): a train loss that spikes on the
    batch that triggered the guard would carry a mark on the curve off the chart."""
    foot = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    guarded_runs = [(p, events) for p, r in runs.items() if (events := _guard_events(r))]
    for k, (precision, events) in enumerate(guarded_runs):
        first_seed = events[0][0]
        # Two guarded runs often act at the same step: the k-th one's triangles sit one
        # row higher and its labels one text height to the right.
        y = 0.015 + 0.03 * k
        for seed, e in events:
            # Events count steps from 0 (the step's index); the curves from 1.
            x = e["step"] + 1
            ax.plot([x], [y], marker="^", ms=6, color=_color(precision), ls="", transform=foot)
            if seed == first_seed:
                ax.annotate(
                    _event_label(e),
                    (x, 0.04 + 0.03 * (len(guarded_runs) - 1)),
                    xycoords=foot,
                    xytext=(8 * k, 0),
                    textcoords="offset points",
                    fontsize=6.5,
                    color=_color(precision),
                    rotation=90,
                    ha="center",
                    va="bottom",
                )


def guard_markdown(results: dict[str, Any]) -> str:
    """The guard's actions of every "+guard" run, per seed, with the diagnosis of each;
    empty when no run was guarded."""
    parts = []
    for precision, run in results["runs"].items():
        if not guarded(precision):
            continue
        per_seed = run.get("per_seed", [])
        policy = next((s["guard"]["policy"] for s in per_seed if s.get("guard")), "?")
        lines = [f"**{precision}** (policy `{policy}`):", ""]
        for seed_run in per_seed:
            guard = seed_run.get("guard") or {}
            events = guard.get("events", [])
            demoted = guard.get("demoted") or {}
            now = ", ".join(f"{k} -> {v}" for k, v in demoted.items()) or "none"
            lines.append(
                f"- seed {seed_run['seed']}: {plural(len(events), 'action')}; "
                f"demoted at the end: {now}"
            )
            for e in events:
                triggers = ", ".join(e.get("triggers", []))
                lines.append(
                    f"  - step {e['step'] + 1}: {_event_label(e)} (triggers: {triggers}). "
                    f"{e.get('message', '')}"
                )
        parts.append("\n".join(lines))
    if not parts:
        return ""
    intro = (
        "Each action of fp8train.Guard (docs/guard.md), with the diagnosis that named "
        "its layer, GEMM and operand; steps count from 1, as the curves do (the guard's own "
        "messages count from 0). The loss "
        "curves mark each action with a triangle at the foot of the loss panel (every "
        "seed's; the first seed's labelled)."
    )
    return intro + "\n\n" + "\n\n".join(parts)


def _save(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (readers never see half a file)."""
    tmp = unique_tmp_path(path)  # two writers never share a temporary
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _num(x: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{suffix}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _load_note(results: dict[str, Any]) -> str:
    load = results.get("machine_load") or {}
    start, end = load.get("loadavg_1m_start"), load.get("loadavg_1m_end")
    if start is None or end is None:
        return ""
    return f" (1-minute load average {start:.1f} before, {end:.1f} after)"


def _time_note(results: dict[str, Any]) -> str:
    """How long this took and under what load; for a comparison assembled from runs that
    other processes trained (resumed), says that its times are theirs."""
    wall = f"{results['wall_time_s']:.0f} s"
    elsewhere = results.get("runs_trained_elsewhere", 0)
    if not elsewhere:
        return f"{wall} in all{_load_note(results)}"
    total = sum(len(run["per_seed"]) for run in results["runs"].values())
    span = results.get("training_load_1m")
    loads = (
        f"1-minute load average {span[0]:.1f} to {span[1]:.1f} across the training "
        "sessions that recorded it"
        if span
        else "their load was not recorded"
    )
    return (
        f"{wall} in this process{_load_note(results)}, which resumed the comparison: "
        f"{elsewhere} of {total} runs were trained, wholly or in part, by earlier "
        f"processes, so their step times were measured there ({loads})"
    )


def markdown(results: dict[str, Any]) -> str:
    """The report: context, the table, the noise floor, the picture and the verdicts."""
    cfg, ver, data = results["config"], results["versions"], results["data"]
    runs = results["runs"]
    seeds = results["seeds"]
    digits = results["task"] == "digits"
    title = (
        f"# fp8train lab: {results['task']}, {plural(len(runs), 'precision')}, "
        f"{plural(len(seeds), 'seed')}"
    )
    lines = [title, ""]
    if digits:
        lines.append(
            f"Linear(64, {cfg['d_model']})-ReLU-Linear({cfg['d_model']}, 10) on scikit-learn's "
            f"digits ({data['train_examples']} train, {plural(data['test_examples'], 'test image')}"
            f", sha256 `{data['sha256'][:16]}`), {plural(cfg['steps'], 'step')} of "
            f"{plural(cfg['batch'], 'image')}."
        )
    else:
        lines.append(
            f"Byte-level GPT (d_model {cfg['d_model']}, {plural(cfg['layers'], 'layer')}, "
            f"{plural(cfg['heads'], 'head')}, context {cfg['seq']}), "
            f"{plural(cfg['steps'], 'step')} of {cfg['batch']} x "
            f"{cfg['seq']} bytes, on `{data['source']}` ({plural(data['files'], 'file')}, "
            f"{data['bytes']:,} bytes, last {cfg['val_fraction']:.0%} held out, sha256 "
            f"`{data['sha256'][:16]}`)."
        )
    lines += [
        (
            f"Seeds {', '.join(map(str, seeds))}, paired: every precision starts from the same "
            f"weights and sees the same batches. fp8train {ver['fp8train']}, torch "
            f"{ver['torch']}, Python {ver['python']}, {ver['platform']}, "
            f"{plural(ver['cpu_count'], 'CPU')}; {_time_note(results)}."
        ),
        "",
    ]
    dist = results.get("distributed")
    if dist:
        gathered = ", ".join(dist["fp8_all_gather"]) or "none"
        grad_comm = dist.get("grad_comm", "fp32")  # results from before --grad-comm: fp32
        lines += [
            (
                f"Data-parallel: {dist['mode']} over {plural(dist['world_size'], 'rank')} "
                f"({dist['backend']}), each training on its {cfg['batch'] // dist['world_size']} "
                f"rows of every batch; FP8 weight all-gather: {gathered}; gradients averaged "
                f"in {grad_comm}{_GRAD_COMM_HOOKS.get(grad_comm, '')}. "
                "Step times include the communication; saved for backward is not measured."
            ),
            "",
        ]
    se_note = "SE" if len(seeds) > 1 else "SE (needs --seeds >= 2)"
    head = ["precision", "final val loss", "gap vs bf16", se_note]
    if digits:
        head += ["test accuracy", "accuracy vs bf16"]
    head += ["step time", "vs bf16", "saved for backward", "skipped steps", "FP8 linears"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, run in runs.items():
        row = [
            f"**{precision}**",
            _num(run["final_val_loss"], ".4f"),
            _num(run["val_loss_gap_vs_bf16_pct"], "+.2f", "%"),
            _num(run["val_loss_gap_vs_bf16_se_pct"], ".2f", "%"),
        ]
        if digits:
            row += [
                _num(
                    None if run["test_accuracy"] is None else 100 * run["test_accuracy"], ".1f", "%"
                ),
                _num(run.get("test_accuracy_gap_vs_bf16_pts"), "+.1f", " pts"),
            ]
        row += [
            _num(
                None if run["median_step_s"] is None else 1000 * run["median_step_s"], ".1f", " ms"
            ),
            _num(run["step_time_vs_bf16"], ".2f", "x"),
            _mib(run["saved_activation_bytes"]),
            str(run["skipped_steps"]),
            run["converted_linears"] if precision not in ("fp32", "bf16") else "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    floor = results["noise_floor"]
    if floor is not None and floor["fp32_vs_bf16_gap_pct"] is not None:
        se = floor["fp32_vs_bf16_se_pct"]
        lines.append(
            f"Noise floor: fp32 vs bf16 differs by {floor['fp32_vs_bf16_gap_pct']:+.2f}%"
            + (f" (SE {se:.2f}%)." if se is not None else " (one seed: no standard error).")
        )
    else:
        lines.append("Noise floor: not measured (run fp32 and bf16 together).")
    lines += [
        thresholds_text(),
        (
            "Step times are CPU wall times with FP8 arithmetic emulated, not a forecast of "
            "GPU speed."
            + (
                ""
                if ver.get("bf16_gemm_native", True)
                else (
                    " This CPU has no hardware for bf16 GEMMs (no bf16 instructions: PyTorch "
                    "runs them in a generic fallback, or converts to fp32 inside oneDNN: 3 to "
                    "over 100 times slower than fp32), so bf16 steps are slow here and "
                    "the FP8 emulation multiplies its exact operands in fp32: the ratio to bf16 "
                    "says nothing about FP8; the ratio to fp32 is the one to read."
                )
            )
            + " Saved for backward: bytes of the tensors autograd keeps for one step, "
            "each storage once, parameters excluded. The curves validate on "
            f"{plural(cfg['eval_windows'], 'fixed window')}; final val loss on "
            f"{cfg['final_eval_windows']}. "
            "FP8 linears: layers converted / all Linear layers."
        ),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Verdicts",
        "",
    ]
    lines += [f"- **{p}**: {run['verdict']}" for p, run in runs.items()]
    return "\n".join(lines) + "\n"


def health_sections(results: dict[str, Any], out: Path) -> str:
    """One health section per monitored FP8 run (first seed): a per-layer heatmap PNG and
    the table and warnings from ``fp8train.lab.health``. Every heatmap of the run uses the
    same colour scale per quantity (fitted over all the logs), so one colour means one
    value in every file."""
    from fp8train.lab.health import heatmap_scales, read_log, write_health

    seed = results["seeds"][0] if results.get("seeds") else 0
    logs = {
        precision: log
        for precision in results["runs"]
        if (log := out / "monitor" / f"{precision}-seed{seed}.jsonl").exists()
        and log.stat().st_size
    }
    if not logs:
        return ""
    scales = heatmap_scales(*(read_log(log) for log in logs.values()))
    intro = (
        "Every heatmap below uses the same colour scale per quantity, fitted over the "
        f"monitored runs of this comparison ({', '.join(logs)}): underflow from "
        f"{scales.underflow_min_pct:g}% (and 0) to {scales.underflow_max_pct:.3g}% on a log "
        f"scale, SQNR from {scales.sqnr_lo_db:.1f} to {scales.sqnr_hi_db:.1f} dB. "
        "Operands ending in `.t` are the transposed operand re-quantised along its other "
        "axis for a backward GEMM (see each section)."
    )
    parts = [intro]
    for precision, log in logs.items():
        parts.append(
            write_health(
                log,
                out,
                name=f"health_{precision}.png",
                title=f"Health: {precision} (seed {seed})",
                scales=scales,
            )
        )
    return "\n\n".join(parts)


# The ledger's parts, as the table and the picture name them (fp8train.lab.memory).
_LEDGER_PARTS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "saved_activations": "saved activations",
}


def _ledgers(results: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    return {p: run["memory"] for p, run in results["runs"].items() if run.get("memory")}


def ledger_markdown(results: dict[str, Any]) -> str:
    """The memory ledger table: each part in MiB and as a ratio to bf16's (bf16 AMP),
    and the measured peak; empty when no run measured one (distributed runs)."""
    ledgers = {
        p: dict(ledger, sum=sum(v for k in _LEDGER_PARTS if (v := ledger.get(k)) is not None))
        for p, ledger in _ledgers(results).items()
    }
    if not ledgers:
        return ""
    ref = ledgers.get("bf16")

    def cell(ledger: dict[str, Any], key: str) -> str:
        value = ledger.get(key)
        if value is None:
            return "n/a"
        base = None if ref is None else ref.get(key)
        ratio = f" ({value / base:.2f}x)" if base else ""
        return f"{value / 2**20:.2f} MiB{ratio}"

    head = ["precision", *_LEDGER_PARTS.values(), "sum of parts", "measured peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, ledger in ledgers.items():
        cells = [cell(ledger, k) for k in (*_LEDGER_PARTS, "sum", "peak")]
        lines.append("| " + " | ".join([f"**{precision}**", *cells]) + " |")
    note = (
        "Bytes of one training step of the first seed, in MiB, with the ratio to bf16 "
        "autocast in brackets"
        + ("" if ref is not None else " (bf16 not run: no ratios)")
        + ". Parameters, gradients and optimizer states: the bytes of their tensors after "
        "the second step's update (fp32 master weights and gradients; AdamW's two fp32 "
        "moments, or fp8train.Fp8AdamW's FP8 moments and scales with `+fp8optim`). Saved "
        "activations: what autograd kept for backward on the first step. Measured peak: "
        "the most bytes of live tensor storages at any operator boundary of the second "
        "step (forward, backward, unscale and clip, optimizer step), seen by a "
        "TorchDispatchMode (fp8train.lab.memory.LiveTensorBytes), the same quantity as "
        "CUDA's max_memory_allocated without the allocator's caching; the parts are not "
        "all alive at once, so the sum of parts is not the peak. docs/memory.md says more."
    )
    return "\n".join(lines) + "\n\n" + note + "\n\n![memory ledger](memory.png)\n"


def plot_ledger(results: dict[str, Any], path: Path) -> bool:
    """A stacked bar per precision (its ledger's parts) with its measured peak as a
    black mark; returns False (and draws nothing) when no run has a ledger."""
    ledgers = _ledgers(results)
    if not ledgers:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(ledgers) + 3), 4.6), layout="constrained")
    ax = fig.subplots()
    names = list(ledgers)
    xs = range(len(names))
    bottoms = [0.0] * len(names)
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for (key, label), color in zip(_LEDGER_PARTS.items(), colors, strict=True):
        heights = [(ledgers[n].get(key) or 0) / 2**20 for n in names]
        ax.bar(xs, heights, bottom=bottoms, color=color, label=label, width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    peaks = [(ledgers[n].get("peak") or math.nan) / 2**20 for n in names]
    ax.scatter(xs, peaks, marker="_", s=900, color="black", linewidths=2.5, label="measured peak")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("memory ledger of one training step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def write_report(results: dict[str, Any], out: Path) -> None:
    plot_curves(results, out / "loss_curves.png")
    health = health_sections(results, out)
    ledger = ledger_markdown(results) if plot_ledger(results, out / "memory.png") else ""
    text = markdown(results) + ("\n\n## Memory ledger\n\n" + ledger if ledger else "")
    guard = guard_markdown(results)
    text += ("\n\n## Guard actions\n\n" + guard) if guard else ""
    text += ("\n\n## Numerics health\n\n" + health) if health else ""
    atomic_write_bytes(out / "report.md", text.encode())
