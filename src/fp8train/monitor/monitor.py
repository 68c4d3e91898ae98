"""The :class:`Monitor`: schedules the hooks, ends each step, routes the records.

It wires the parts together and keeps none of their state: the operand hooks and
their statistics (:mod:`fp8train.monitor.recorder`), the BF16 shadow check
(:mod:`fp8train.monitor.shadow`), the detectors (:mod:`fp8train.monitor.detectors`)
and the sinks (:mod:`fp8train.monitor.sinks`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fp8train.monitor.detectors import (
    AmaxJumpDetector,
    FractionDetector,
    HealthWarning,
    LossSpikeDetector,
    NonFiniteDetector,
    ScaleChangeDetector,
    Thresholds,
)
from fp8train.monitor.gemms import GemmCheck
from fp8train.monitor.recorder import OperandRecorder
from fp8train.monitor.shadow import Bf16Shadow
from fp8train.monitor.sinks import Sink, open_sinks
from fp8train.monitor.stats import OperandStats
from fp8train.monitor.stats import grad_norm as model_grad_norm
from fp8train.nn import Fp8Linear, fp8_layers

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_EVERY", "Monitor"]

log = logging.getLogger("fp8train")

# Observe one step in this many by default. An observed step costs a sizeable fraction
# of a step on top of it, an off-interval step nothing measurable; 1 in 25 spreads the
# former thinly enough to stay inside the 5% budget with room for noisier machines.
# benchmarks/monitor.py measures the cost at each interval.
DEFAULT_EVERY = 25


class Monitor:
    """Watch the FP8 layers of ``model``; see :mod:`fp8train.monitor` for what is recorded.

    ``every``: observe steps whose number is a multiple of this (step numbers count
    ``step()`` calls from ``start``; pass the training step when resuming). ``jsonl``:
    file to append records to. ``tensorboard``: log folder for TensorBoard, skipped
    with a log line when tensorboard is not installed. ``sinks``: further sinks.
    ``shadow_every``: run the BF16 shadow check on steps that are multiples of this.
    ``thresholds``: when to warn (:class:`Thresholds`). ``gemm_check``: on observed
    steps, also measure each layer's three GEMMs against high precision
    (:mod:`fp8train.monitor.gemms`; layer records with roles ``"gemm.output"``,
    ``"gemm.grad_input"``, ``"gemm.grad_weight"`` and field ``rel_err``).

    Use as a context manager (``with Monitor(model) as mon:``) or call ``attach()`` and
    ``detach()``; ``close()`` detaches and closes the sinks. A layer can have one
    observer at a time: attaching while another monitor is attached raises.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = DEFAULT_EVERY,
        *,
        jsonl: str | Path | None = None,
        tensorboard: str | Path | None = None,
        sinks: Sequence[Sink] = (),
        shadow_every: int | None = None,
        thresholds: Thresholds | None = None,
        start: int = 0,
        gemm_check: bool = False,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be a positive int (observe 1 step in every), got {every!r}"
            )
        if shadow_every is not None and (not isinstance(shadow_every, int) or shadow_every < 1):
            raise ValueError(f"shadow_every must be a positive int or None, got {shadow_every!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.model = model
        self.every = every
        self.shadow_every = shadow_every
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.step_count = start
        self.layers: list[tuple[str, Fp8Linear]] = list(fp8_layers(model))
        if not self.layers:
            log.info(
                "fp8train monitor: the model has no Fp8Linear layers; recording the "
                "loss and gradient norm only"
            )
        self._sinks: list[Sink] = open_sinks(jsonl, tensorboard, sinks)
        self.warnings: list[dict[str, Any]] = []  # every warning record, in order
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}  # last record per (layer, role)

        self._gemms = GemmCheck(self.layers) if gemm_check else None
        self._recorder = OperandRecorder(self.layers, self._gemms)
        self._shadow = Bf16Shadow(self.layers)
        self._nonfinite = NonFiniteDetector(self.layers)
        self._jumps = AmaxJumpDetector(self.layers)
        self._loss = LossSpikeDetector(self.thresholds)
        # Checked on each layer record in this order (underflow, overflow, then scales).
        self._layer_detectors = (
            FractionDetector(self.thresholds),
            ScaleChangeDetector(self.thresholds),
        )
        self._attached = False
        self._observing = False
        self._shadowing = False
        self._force_next = False
        self._skipped_total = 0

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Self:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        """Whether the monitor is watching its layers."""
        return self._attached

    @property
    def observing(self) -> bool:
        """Whether the current step is recorded."""
        return self._observing

    def attach(self) -> Self:
        """Start watching (from the current step). Idempotent."""
        if self._attached:
            return self
        for name, layer in self.layers:
            if layer.fp8_state.observer is not None:
                raise ValueError(
                    f"layer {name!r} already has an observer ({layer.fp8_state.observer!r}); "
                    "detach the other monitor first: one observer per layer"
                )
        self._nonfinite.rebase()
        self._jumps.rebase()
        self._attached = True
        self._configure()
        return self

    def detach(self) -> None:
        """Stop watching: remove every observer and hook. Sinks stay open."""
        self._uninstall()
        self._attached = False

    def close(self) -> None:
        """Detach and close every sink."""
        self.detach()
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def _configure(self) -> None:
        """Install or remove observers and hooks for the step about to run."""
        s = self.step_count
        observe = self._attached and (s % self.every == 0 or self._force_next)
        shadow = self._attached and self.shadow_every is not None and s % self.shadow_every == 0
        self._force_next = False
        if observe == self._observing and shadow == self._shadowing:
            return
        self._uninstall()
        self._observing, self._shadowing = observe, shadow
        if observe:
            self._recorder.install()
        if shadow:
            self._shadow.install()

    def _uninstall(self) -> None:
        self._recorder.uninstall()
        self._shadow.uninstall()
        self._observing = self._shadowing = False

    # -------------------------------------------------------------------- step
    def step(
        self,
        loss: float | torch.Tensor | None = None,
        *,
        grad_norm: float | torch.Tensor | None = None,
        loss_scale: float | None = None,
        skipped: bool = False,
    ) -> list[dict[str, Any]]:
        """End the current step: record it (observed steps), check for warnings, and
        advance. Returns this step's warning records (also emitted as
        :class:`HealthWarning`). ``loss``: the step's loss (a tensor is read with
        ``float()``). ``grad_norm``: global gradient norm; computed from ``p.grad`` on
        observed steps when not given. ``loss_scale``: e.g. ``scaler.get_scale()``.
        ``skipped``: whether the optimizer step was skipped (non-finite gradients).
        """
        s = self.step_count
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        loss_f = None if loss is None else float(loss)
        self._skipped_total += int(bool(skipped))
        recorded = self._observing or self._shadowing

        raised = self._nonfinite.check(s, loss_f) + self._jumps.check(s)
        if recorded:
            records = self._recorder.records(s) + self._shadow.records(s)
            if self._gemms is not None:
                records += self._gemms.records(s)
            for rec in records:
                self.latest[(rec["layer"], rec["role"])] = rec
                self._emit(rec)
            for rec in records:
                for detector in self._layer_detectors:
                    raised += detector.check(s, rec)
        stats = self._recorder.stats
        raised += self._loss.check(s, loss_f, stats if self._observing else {})
        if recorded:
            if grad_norm is None and self._observing:
                grad_norm = model_grad_norm(self.model)
            self._emit(
                {
                    "step": s,
                    "kind": "step",
                    "loss": loss_f,
                    "loss_median": self._loss.median(),
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "loss_scale": None if loss_scale is None else float(loss_scale),
                    "skipped": bool(skipped),
                    "skipped_total": self._skipped_total,
                }
            )
        self._loss.end_step(loss_f, stats)
        for rec in raised:
            self._emit(rec)
            self.warnings.append(rec)
            warnings.warn(rec["message"], HealthWarning, stacklevel=2)
        if raised and not self._observing:
            self._force_next = True  # look at the layers right after the event
        self._recorder.clear()
        self._shadow.clear()
        self.step_count = s + 1
        if self._attached:
            self._configure()
        return raised

    # ------------------------------------------------- for fp8train.Guard (and others)
    @property
    def step_stats(self) -> dict[tuple[str, str], OperandStats]:
        """The current step's pooled statistics by ``(layer, role)`` so far (observed
        steps; empty otherwise). Cleared by :meth:`step`."""
        return self._recorder.stats

    def gemm_errors(self) -> dict[tuple[str, str], float]:
        """The current step's GEMM errors by ``(layer, gemm)`` (``gemm_check`` on an
        observed step; empty otherwise): :mod:`fp8train.monitor.gemms`."""
        return {} if self._gemms is None or not self._observing else self._gemms.errors()

    def enable_gemm_check(self) -> None:
        """Switch the GEMM check on (see ``gemm_check``) from the next observed step."""
        if self._gemms is None:
            self._gemms = GemmCheck(self.layers)
            self._recorder.gemms = self._gemms

    def observe_now(self) -> None:
        """Forget what the current step recorded so far and observe the rest of it (for
        a step run again to be looked at, e.g. by :class:`fp8train.Guard`)."""
        if not self._attached:
            raise ValueError("observe_now() needs an attached monitor; call attach() first")
        self._recorder.clear()
        self._shadow.clear()
        if not self._observing:
            self._uninstall()
            self._observing = True
            self._recorder.install()

    def restart_at(self, step: int) -> None:
        """Continue counting steps from ``step`` (e.g. after a rollback), dropping what
        the current step recorded so far."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._recorder.clear()
        self._shadow.clear()
        self.step_count = step
        if self._attached:
            self._configure()

    def emit(self, record: dict[str, Any]) -> None:
        """Write ``record`` (a JSON-ready dict with ``"step"`` and ``"kind"``) to every
        sink, e.g. a guard's diagnosis."""
        self._emit(record)

    def _emit(self, record: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.write(record)
