"""When the monitor warns: :class:`Thresholds` and the five detectors.

Each detector keeps its own state and returns warning records (``"kind": "warning"``,
built by :func:`warning_record`); the :class:`~fp8train.monitor.Monitor` emits them
through :func:`warnings.warn` as :class:`HealthWarning` and writes them to every sink.
Messages name the step, the layer and the operand. Warnings are edge triggered: one
warning when a quantity crosses its threshold, re-armed once it is back below, so a
persistent condition does not repeat every step. Kinds:

* ``loss_spike`` (:class:`LossSpikeDetector`) --
  ``loss > loss_spike_factor * median(last loss_window losses)`` (checked every
  step); when the step was observed, names the forward operand whose amax grew the
  most since its last observation;
* ``underflow``/``overflow`` (:class:`FractionDetector`) -- the underflow or the
  clipped fraction rose past its threshold;
* ``scale_collapse``/``scale_explode`` (:class:`ScaleChangeDetector`) --
  ``scale_min`` fell, or ``scale_max`` rose, by more than ``2**scale_change_log2``
  against the running median of its earlier observations (a new outlier, or a tensor
  decaying to zero);
* ``nonfinite`` (:class:`NonFiniteDetector`) -- NaN/inf first seen in an operand
  (every step, from the layers' non-finite counters), or in the loss. When several
  layers see NaN/inf in one step the one named is the earliest in execution order --
  forward operands in registration order, then backward operands in reverse -- which
  is the culprit when the NaN propagated downstream; the others are listed.
* ``amax_jump`` (:class:`AmaxJumpDetector`) -- a delayed-scaling operand's amax jumped
  beyond :func:`fp8train.autograd.amax_jump_limit` times its history window (every
  step, from the layers' own :class:`~fp8train.autograd.AmaxJumpWarning` events): the
  layer quantises values of the earlier size to zero while the outlier stays in the
  window. One warning per event, with ``amax``, ``window_amax`` and ``history_step``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fp8train.monitor.stats import FORWARD_ROLES, OperandStats
from fp8train.nn import Fp8Linear

__all__ = [
    "AmaxJumpDetector",
    "FractionDetector",
    "HealthWarning",
    "LossSpikeDetector",
    "NonFiniteDetector",
    "ScaleChangeDetector",
    "Thresholds",
    "warning_record",
]


class HealthWarning(UserWarning):
    """A training-health event: the message names the step, the layer and the operand."""


@dataclass(frozen=True)
class Thresholds:
    """When the monitor warns. Build variants with ``dataclasses.replace``.

    * ``loss_spike_factor``/``loss_window``/``loss_min_history``: warn when the loss
      exceeds ``factor`` times the median of the previous ``loss_window`` losses, once
      at least ``loss_min_history`` losses were seen (a loss that halves is normal
      early in training; one that rises 1.5x in a step is not).
    * ``underflow``: fraction of nonzero values flushed to zero (default 5%). It counts
      values, not their weight: attention gradients routinely hold ~1% of values far
      below the rest (softmax tails) whose loss costs nothing measurable (the SQNR
      says how much signal was lost).
    * ``overflow``: fraction of values *clipped*, past the format's overflow threshold
      before saturation (default 0.1%). Values at max, or rounding to it, are not
      counted here (they lost nothing), although the ``overflow`` statistic includes
      them.
    * ``scale_change_log2``/``scale_window``/``scale_min_history``: warn when a scale
      moves more than ``2**scale_change_log2`` away from the median of its last
      ``scale_window`` observations (at least ``scale_min_history`` of them). A loss
      scaler backing off moves grad_output scales by 2x per skipped step, and in the
      first few dozen steps of the lab GPT gradient amaxes swing by up to 2^8; the
      default 2^6 with four earlier observations flags what is left.
    """

    loss_spike_factor: float = 1.5
    loss_window: int = 32
    loss_min_history: int = 8
    underflow: float = 0.05
    overflow: float = 0.001
    scale_change_log2: float = 6.0
    scale_window: int = 8
    scale_min_history: int = 4

    def __post_init__(self) -> None:
        if not self.loss_spike_factor > 1.0:
            raise ValueError(f"loss_spike_factor must be > 1, got {self.loss_spike_factor}")
        for name in ("loss_window", "loss_min_history", "scale_window", "scale_min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("underflow", "overflow"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"{name} threshold is a fraction in [0, 1), got {getattr(self, name)}"
                )
        if not self.scale_change_log2 > 0:
            raise ValueError(f"scale_change_log2 must be > 0, got {self.scale_change_log2}")


def warning_record(
    s: int, kind: str, layer: str | None, operand: str | None, message: str, **extra: Any
) -> dict[str, Any]:
    """A ``"warning"`` record of type ``kind`` at step ``s``; the message is prefixed
    with the step and where it happened."""
    where = f"layer {layer!r} operand {operand!r}" if layer is not None else f"operand {operand!r}"
    return {
        "step": s,
        "kind": "warning",
        "type": kind,
        "layer": layer,
        "operand": operand,
        "message": f"fp8train monitor: step {s}: {where}: {message}",
        **extra,
    }


@dataclass
class _Edge:
    """Edge trigger: fires when the condition turns true, re-arms when it turns false."""

    active: set[tuple[str, ...]] = field(default_factory=set)

    def rises(self, key: tuple[str, ...], condition: bool) -> bool:
        if condition and key not in self.active:
            self.active.add(key)
            return True
        if not condition:
            self.active.discard(key)
        return False


def _quantised(record: dict[str, Any]) -> bool:
    """Whether a layer record holds quantisation statistics (not a shadow record, and
    not one whose every call met NaN/inf)."""
    return record["role"] != "output" and record.get("underflow") is not None


class FractionDetector:
    """``underflow`` and ``overflow``: the flushed or the clipped fraction of one
    (layer, role) rose past its threshold."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._edges = _Edge()

    def check(self, s: int, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Warnings for one layer record of step ``s``."""
        if not _quantised(rec):
            return []
        th = self.thresholds
        out = []
        layer, role, fmt = rec["layer"], rec["role"], rec["fmt"]
        u, c = rec["underflow"], rec["clipped"]
        if self._edges.rises((layer, role, "underflow"), u > th.underflow):
            out.append(
                warning_record(
                    s,
                    "underflow",
                    layer,
                    role,
                    f"{u:.2%} of nonzero values flushed to zero in {fmt} (threshold "
                    f"{th.underflow:.2%}); amax {rec['amax']:.3g}, "
                    f"scale {rec['scale_max']:.3g}",
                    value=u,
                    threshold=th.underflow,
                )
            )
        # Clipped, not "at or beyond": a value landing on max lost nothing (re-quantising
        # an FP8 payload with a power-of-two scale does that often, and an INT8 scale
        # of 127/amax puts amax a rounding error above 127).
        if self._edges.rises((layer, role, "overflow"), c > th.overflow):
            out.append(
                warning_record(
                    s,
                    "overflow",
                    layer,
                    role,
                    f"{c:.2%} of values beyond +-max of {fmt} were clipped (threshold "
                    f"{th.overflow:.2%}); amax {rec['amax']:.3g}, scale {rec['scale_max']:.3g}"
                    + (
                        f", amax/history amax {rec['staleness']:.3g}"
                        if rec.get("staleness") is not None
                        else ""
                    ),
                    value=c,
                    threshold=th.overflow,
                )
            )
        return out


class ScaleChangeDetector:
    """``scale_collapse``/``scale_explode``: ``scale_min`` fell, or ``scale_max`` rose,
    too far from the running median of its own earlier observations (in log2)."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._edges = _Edge()
        self._logs: dict[tuple[str, str, str], deque[float]] = {}  # log2 of past scales

    def check(self, s: int, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """Warnings for one layer record of step ``s``; the record joins the history."""
        if not _quantised(rec):
            return []
        th = self.thresholds
        out = []
        layer, role = rec["layer"], rec["role"]
        for which, kind, sign in (
            ("scale_min", "scale_collapse", -1.0),
            ("scale_max", "scale_explode", 1.0),
        ):
            value = rec[which]
            if not value > 0 or not math.isfinite(value):
                continue
            hist = self._logs.setdefault((layer, role, which), deque(maxlen=th.scale_window))
            lg = math.log2(value)
            if len(hist) >= th.scale_min_history:
                ref = statistics.median(hist)
                moved = sign * (lg - ref) > th.scale_change_log2
                if self._edges.rises((layer, role, kind), moved):
                    verb = "fell" if sign < 0 else "rose"
                    out.append(
                        warning_record(
                            s,
                            kind,
                            layer,
                            role,
                            f"{which} {verb} by 2^{abs(lg - ref):.1f} to {value:.3g} against "
                            f"its running median {2.0**ref:.3g} (threshold "
                            f"2^{th.scale_change_log2:g}); amax {rec['amax']:.3g}",
                            value=value,
                            reference=2.0**ref,
                        )
                    )
            hist.append(lg)
        return out


class LossSpikeDetector:
    """``loss_spike``: the loss jumped against the median of the recent losses.

    Keeps the loss window and, per (layer, role), the amax of its last observation, to
    name the forward operand whose amax grew the most as the suspect.
    """

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._edges = _Edge()
        self._losses: deque[float] = deque(maxlen=thresholds.loss_window)
        self._prev_amax: dict[tuple[str, str], float] = {}  # amax at the last observation

    def median(self) -> float | None:
        """Median of the loss window (the losses before this step), ``None`` if empty."""
        return statistics.median(self._losses) if self._losses else None

    def check(
        self, s: int, loss: float | None, observed: Mapping[tuple[str, str], OperandStats]
    ) -> list[dict[str, Any]]:
        """The warning for step ``s``'s ``loss``, if it spiked. ``observed``: this step's
        statistics (empty when the step was not observed)."""
        th = self.thresholds
        if loss is None or not math.isfinite(loss) or len(self._losses) < th.loss_min_history:
            return []
        median = statistics.median(self._losses)
        spike = median > 0 and loss > th.loss_spike_factor * median
        if not self._edges.rises(("", "loss", "spike"), spike):
            return []
        layer, role, why = self._suspect(observed)
        return [
            warning_record(
                s,
                "loss_spike",
                layer,
                role,
                f"loss {loss:.4g} is {loss / median:.2f}x the median {median:.4g} of the last "
                f"{len(self._losses)} steps (threshold {th.loss_spike_factor:g}x); {why}",
                value=loss,
                reference=median,
                suspect_layer=layer,
                suspect_operand=role,
            )
        ]

    def end_step(self, loss: float | None, stats: Mapping[tuple[str, str], OperandStats]) -> None:
        """Remember this step: its loss joins the window (when finite), each finite
        nonzero amax becomes the operand's reference for the next observation."""
        for key, st in stats.items():
            if st.amax > 0 and math.isfinite(st.amax):
                self._prev_amax[key] = st.amax
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)

    def _suspect(
        self, observed: Mapping[tuple[str, str], OperandStats]
    ) -> tuple[str | None, str, str]:
        """The forward operand whose amax grew the most since its previous observation
        (gradients grow after a loss spike, so only forward operands are suspects)."""
        if not observed:
            return None, "loss", ("step not observed; the next step will be, to find the layer")
        best: tuple[float, str, str] | None = None
        for (layer, role), st in observed.items():
            if role not in FORWARD_ROLES:  # the loss is made in the forward pass
                continue
            prev = self._prev_amax.get((layer, role))
            if prev and st.amax > 0 and math.isfinite(st.amax):
                growth = st.amax / prev
                if best is None or growth > best[0]:
                    best = (growth, layer, role)
        if best is None:
            return None, "loss", "no earlier observation to compare amax against"
        growth, layer, role = best
        return layer, role, f"largest amax growth since the last observation: {growth:.3g}x"


class NonFiniteDetector:
    """``nonfinite``: NaN/inf first seen in an operand or in the loss.

    Reads the layers' own non-finite counters, so it works on every step, observed or
    not; warns once per (layer, operand) and once for the loss.
    """

    def __init__(self, layers: Sequence[tuple[str, Fp8Linear]]) -> None:
        self._layers = list(layers)
        self._order = {name: i for i, (name, _) in enumerate(self._layers)}
        self._seen: set[tuple[str, str]] = set()
        self._counts: dict[str, dict[str, int]] = {}
        self.rebase()

    def rebase(self) -> None:
        """Take the layers' counters as they are now as the baseline (on attach)."""
        self._counts = {n: dict(m.fp8_state.nonfinite) for n, m in self._layers}

    def _execution_order(self, layer: str, role: str) -> tuple[int, int, str]:
        """Forward operands by layer order, then backward operands in reverse."""
        i = self._order.get(layer, 0)
        if role.split(".")[0] in ("input", "weight"):
            return (0, i, role)
        return (1, -i, role)

    def check(self, s: int, loss: float | None) -> list[dict[str, Any]]:
        """Warnings for step ``s``: counters that rose since the last check, and the loss."""
        new: list[tuple[str, str, int]] = []
        for name, layer in self._layers:
            counts = layer.fp8_state.nonfinite
            before = self._counts.setdefault(name, {})
            for role, n in counts.items():
                if n > before.get(role, 0):
                    new.append((name, role, n - before.get(role, 0)))
                    before[role] = n
        out = []
        if new:
            new.sort(key=lambda e: self._execution_order(e[0], e[1]))
            first_seen = [e for e in new if (e[0], e[1]) not in self._seen]
            self._seen.update((e[0], e[1]) for e in new)
            if first_seen:
                culprit, role, n = new[0]  # the earliest event this step: the likely cause
                others = [f"{e[0]}:{e[1]}" for e in new[1:]]
                also = f"; also seen downstream: {', '.join(others)}" if others else ""
                out.append(
                    warning_record(
                        s,
                        "nonfinite",
                        culprit,
                        role,
                        f"NaN/inf first seen ({n} event(s); no scale was computed and the GEMM "
                        f"ran in high precision){also}",
                        affected=[{"layer": e[0], "operand": e[1], "events": e[2]} for e in new],
                    )
                )
        if loss is not None and not math.isfinite(loss) and ("", "loss") not in self._seen:
            self._seen.add(("", "loss"))
            out.append(
                warning_record(
                    s, "nonfinite", None, "loss", f"the loss is {loss} (first non-finite loss)"
                )
            )
        return out


class AmaxJumpDetector:
    """``amax_jump``: the layers' :class:`~fp8train.autograd.AmaxJump` events since the
    last check, one warning each (each is an outlier of its own step).

    Reads the layers' event counters, so it works on every step, observed or not.
    """

    def __init__(self, layers: Sequence[tuple[str, Fp8Linear]]) -> None:
        self._layers = list(layers)
        self._counts: dict[str, int] = {}
        self.rebase()

    def rebase(self) -> None:
        """Take the layers' event counts as they are now as the baseline (on attach)."""
        self._counts = {n: m.fp8_state.amax_jump_count for n, m in self._layers}

    def check(self, s: int) -> list[dict[str, Any]]:
        out = []
        for name, layer in self._layers:
            state = layer.fp8_state
            new = state.amax_jump_count - self._counts.get(name, 0)
            self._counts[name] = state.amax_jump_count
            # The layer keeps its latest events only; more than that in one step are counted.
            events = list(state.amax_jumps)[-new:] if new > 0 else []
            for jump in events:
                out.append(
                    warning_record(
                        s,
                        "amax_jump",
                        name,
                        jump.role,
                        f"amax {jump.amax:.4g} is {jump.ratio:.3g} times "
                        f"the history window's {jump.window_amax:.4g} (limit {jump.limit:.3g}): "
                        "values of the earlier size quantise to zero while it stays in the "
                        "window",
                        amax=jump.amax,
                        window_amax=jump.window_amax,
                        history_step=jump.history_step,
                    )
                )
        return out
