"""The diagnosis: which layer, GEMM and operand went wrong first, at which step, and why.

:func:`localise` reads one observed step (the monitor's operand statistics and GEMM
errors, :mod:`fp8train.monitor.gemms`) and walks the GEMMs in execution order: every
layer's ``output`` GEMM in model order, then the backward's ``grad_input`` and
``grad_weight`` in reverse model order. The first GEMM that met NaN/inf or whose error
left its baseline (:class:`~fp8train.guard.triggers.GemmBaselines`) is the culprit: what
goes wrong upstream in execution spreads downstream, so the earliest is the likeliest
cause. Its operand is the one that met NaN/inf, else the one that lost most values to
underflow or clipping, else the one with the lowest SQNR. Without such a GEMM the
layers' non-finite counters (the earliest operand that met NaN/inf) and amax jumps name
the culprit; with none of these, the diagnosis names no layer: the trigger does not
come from an FP8 GEMM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fp8train.guard.triggers import GemmBaselines
from fp8train.monitor.stats import OperandStats

__all__ = ["Diagnosis", "execution_order", "localise"]

# Which operand roles each GEMM reads (the ".t" one where the recipe quantises it again).
GEMM_OPERANDS = {
    "output": ("input", "weight"),
    "grad_input": ("grad_output", "weight.t", "weight"),
    "grad_weight": ("grad_output.t", "grad_output", "input.t", "input"),
}

# The first GEMM that reads an operand (to name a GEMM for an operand found NaN/inf).
_FIRST_READER = {"input": "output", "weight": "output", "grad_output": "grad_input"}


@dataclass
class Diagnosis:
    """What went wrong first on ``step``: ``layer``, ``gemm`` (``"output"``,
    ``"grad_input"`` or ``"grad_weight"``) and ``operand`` (a role: ``"input"``,
    ``"weight"``, ``"grad_output"`` or a ``".t"`` variant); all None when no FP8 GEMM is
    to blame. ``triggers``: what made the guard look (``"loss_spike"``, ``"grad_jump"``,
    ``"nonfinite"``, ``"amax_jump"``, ``"gemm_error"``). ``message``: one line saying it.
    ``evidence``: the culprit GEMM's error against its baseline, every GEMM error of the
    layer, its operands' amax, scale range, underflow and clipped shares and SQNR, and
    their amax and scale history over the observed steps."""

    step: int
    triggers: list[str]
    layer: str | None
    gemm: str | None
    operand: str | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """The health-log record (``kind: "diagnosis"``)."""
        return {
            "step": self.step,
            "kind": "diagnosis",
            "triggers": list(self.triggers),
            "layer": self.layer,
            "gemm": self.gemm,
            "operand": self.operand,
            "message": self.message,
            "evidence": self.evidence,
        }


def execution_order(layers: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``(layer, gemm)`` in the order a training step runs them."""
    forward = [(name, "output") for name in layers]
    backward = [(name, g) for name in reversed(layers) for g in ("grad_input", "grad_weight")]
    return forward + backward


def _operand_evidence(st: OperandStats) -> dict[str, Any]:
    return {
        "amax": st.amax,
        "scale_min": st.scale_min if st.calls > st.nonfinite_calls else None,
        "scale_max": st.scale_max if st.calls > st.nonfinite_calls else None,
        "underflow": st.underflow,
        "clipped": st.clipped_fraction,
        "sqnr_db": st.sqnr_db,
        "nonfinite_calls": st.nonfinite_calls,
    }


def _worst_operand(
    layer: str, gemm: str, stats: Mapping[tuple[str, str], OperandStats]
) -> str | None:
    """The operand of ``gemm`` that met NaN/inf, else lost the most values to underflow
    and clipping, else has the lowest SQNR."""
    present = [r for r in GEMM_OPERANDS[gemm] if (layer, r) in stats]
    # A ".t" role replaces its plain one for this GEMM where the recipe made it.
    present = [r for r in present if f"{r}.t" not in present]
    if not present:
        return None

    def badness(role: str) -> tuple[int, float, float]:
        st = stats[(layer, role)]
        sqnr = st.sqnr_db if not math.isnan(st.sqnr_db) else math.inf
        return (st.nonfinite_calls, st.underflow + st.clipped_fraction, -sqnr)

    return max(present, key=badness)


def localise(
    step: int,
    triggers: list[tuple[str, str]],
    layers: Sequence[str],
    gemm_errors: Mapping[tuple[str, str], float],
    baselines: GemmBaselines,
    stats: Mapping[tuple[str, str], OperandStats],
    nonfinite: Sequence[tuple[str, str]] = (),
    amax_jumps: Sequence[tuple[str, str, float]] = (),
    history: Mapping[tuple[str, str], Sequence[tuple[int, float, float]]] | None = None,
) -> Diagnosis:
    """The diagnosis of ``step`` (module docstring). ``triggers``: ``(name, why)``.
    ``layers``: the FP8 layers in model order. ``gemm_errors`` and ``stats``: the step's,
    by ``(layer, gemm)`` and ``(layer, role)``. ``nonfinite``: ``(layer, role)`` whose
    non-finite counter rose this step; ``amax_jumps``: ``(layer, role, ratio)``.
    ``history``: per ``(layer, role)``, ``(step, amax, scale_min)`` of earlier observed
    steps."""
    names = sorted({t for t, _ in triggers})
    why = "; ".join(w for _, w in triggers)
    culprit: tuple[str, str, str | None] | None = None
    how = ""
    for layer, gemm in execution_order(layers):
        err = gemm_errors.get((layer, gemm))
        if err is None or not baselines.out((layer, gemm), err):
            continue
        culprit = (layer, gemm, _worst_operand(layer, gemm, stats))
        base = baselines.describe((layer, gemm))
        typical = base.get("typical")
        if math.isnan(err):
            how = "met NaN/inf"
        elif typical is not None:
            how = f"relative error {err:.3g} against its usual {typical:.3g}"
        else:
            how = f"relative error {err:.3g} (no baseline yet)"
        break
    if culprit is None and nonfinite:
        order = {name: i for i, name in enumerate(layers)}

        def when(e: tuple[str, str]) -> tuple[int, int]:
            fwd = e[1].split(".")[0] in ("input", "weight")
            return (0, order.get(e[0], 0)) if fwd else (1, -order.get(e[0], 0))

        layer, role = min(nonfinite, key=when)
        culprit = (layer, _FIRST_READER.get(role.split(".")[0], "output"), role)
        how = f"its {role} met NaN/inf first"
    if culprit is None and amax_jumps:
        layer, role, ratio = max(amax_jumps, key=lambda j: j[2])
        culprit = (layer, _FIRST_READER.get(role, "output"), role)
        how = f"its {role} amax jumped {ratio:.3g}x past its history window"

    evidence: dict[str, Any] = {"triggers": [{"trigger": t, "why": w} for t, w in triggers]}
    if culprit is None:
        observed = "no FP8 GEMM left its baseline" if gemm_errors else "step not observed"
        return Diagnosis(
            step,
            names,
            None,
            None,
            None,
            f"step {step}: {why}; {observed} and no operand met NaN/inf: not an FP8 GEMM's doing",
            evidence,
        )
    layer, gemm, operand = culprit
    evidence["rel_err"] = gemm_errors.get((layer, gemm))
    evidence["baseline"] = baselines.describe((layer, gemm))
    evidence["gemm_errors"] = {g: e for (n, g), e in gemm_errors.items() if n == layer}
    evidence["operands"] = {r: _operand_evidence(st) for (n, r), st in stats.items() if n == layer}
    if history is not None:
        evidence["history"] = {
            r: [list(h) for h in hist] for (n, r), hist in history.items() if n == layer
        }
    on = f", operand {operand}" if operand else ""
    return Diagnosis(
        step,
        names,
        layer,
        gemm,
        operand,
        f"step {step}: layer {layer!r} {gemm} GEMM{on}: {how} ({why})",
        evidence,
    )
