"""The operand hooks: an observer on each layer's ``LayerState`` pools statistics.

:class:`OperandRecorder` installs itself as the ``observer`` of every watched layer's
:class:`~fp8train.autograd.LayerState` (called as ``observer(state, role, t, q)``, with
``q is None`` when ``t`` held NaN/inf) and a forward pre-hook that notes the grad mode,
so that forward quantisations under ``torch.no_grad()`` (evaluation) are left out. It
pools :func:`~fp8train.monitor.stats.operand_stats` per (layer, role) for the step and
turns them into layer records; given a :class:`~fp8train.monitor.gemms.GemmCheck`, it
hands it every training operand too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fp8train.autograd import LayerState
from fp8train.monitor.gemms import GemmCheck
from fp8train.monitor.stats import FORWARD_ROLES, OperandStats, operand_stats
from fp8train.nn import Fp8Linear
from fp8train.tensor import ScaledTensor

__all__ = ["OperandRecorder"]


class OperandRecorder:
    """Observer and grad-mode hooks on ``layers``; this step's pooled statistics."""

    def __init__(
        self, layers: Sequence[tuple[str, Fp8Linear]], gemms: GemmCheck | None = None
    ) -> None:
        self._layers = list(layers)
        self.gemms = gemms  # also fed every training operand, when given
        self._order = {name: i for i, (name, _) in enumerate(self._layers)}
        # Records use the qualified module name (a hand-built Fp8Linear's state may carry
        # another name).
        self._names = {id(m.fp8_state): name for name, m in self._layers}
        self.stats: dict[tuple[str, str], OperandStats] = {}  # this step, per (layer, role)
        self._grad_mode: dict[str, bool] = {}  # layer -> grad mode at its last forward
        # The history amax the next quantisation's scale comes from (staleness).
        self._history_amax: dict[tuple[str, str], float | None] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        """Become every layer's observer and hook its forward."""
        for name, layer in self._layers:
            state = layer.fp8_state
            state.observer = self.observe
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            # The scale the next quantisation uses comes from the history as it is now.
            for role, h in state.histories.items():
                self._history_amax[(name, role)] = None if h.empty else float(h.reduced())

    def uninstall(self) -> None:
        """Remove the observer (where it is still ours) and every hook."""
        for _, layer in self._layers:
            if layer.fp8_state.observer == self.observe:
                layer.fp8_state.observer = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def clear(self) -> None:
        """Forget this step's statistics (at the end of every step)."""
        self.stats = {}
        self._grad_mode = {}
        if self.gemms is not None:
            self.gemms.clear()

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._grad_mode[name] = torch.is_grad_enabled()

        return hook

    def observe(
        self, state: LayerState, role: str, t: torch.Tensor, q: ScaledTensor | None
    ) -> None:
        """The ``LayerState`` observer: pool the statistics of quantising ``t`` to ``q``."""
        name = self._names.get(id(state), state.name)
        history = state.histories.get(role)
        training = role not in FORWARD_ROLES or self._grad_mode.get(name, True)
        if training:
            stats = operand_stats(t, q)
            if history is not None and q is not None:
                used = self._history_amax.get((name, role))
                stats.staleness = 1.0 if used is None else stats.amax / used
            acc = self.stats.get((name, role))
            if acc is None:
                self.stats[(name, role)] = stats
            else:
                acc.add(stats)
            if self.gemms is not None:
                self.gemms.observe(name, role, t, q)
        if history is not None and q is not None:
            # The history has recorded this amax; the next quantisation's scale uses it.
            self._history_amax[(name, role)] = float(history.reduced())

    def records(self, s: int) -> list[dict[str, Any]]:
        """Step ``s``'s layer records, by layer order and then role."""
        records = []
        for layer, role in sorted(self.stats, key=lambda k: (self._order.get(k[0], 0), k[1])):
            stats = self.stats[(layer, role)].as_record()
            records.append({"step": s, "kind": "layer", "layer": layer, "role": role, **stats})
        return records
