"""The loss scaler of a data-parallel run: one skip decision for every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fp8train.loss_scaler import LossScaler

__all__ = ["DistributedLossScaler"]


class DistributedLossScaler(LossScaler):
    """:class:`~fp8train.LossScaler` whose skip decision is the same on every rank.

    ``unscale_`` (and ``step``, which calls it) all-reduces the found-inf flag with max
    over ``process_group`` (default: the world), so a non-finite gradient on any rank
    skips the step and backs the scale off everywhere, and the scale stays identical on
    every rank. Every rank must call ``unscale_``/``step`` for the same optimizers in the
    same order (it is a collective). Without a process group it is a LossScaler.
    """

    def __init__(
        self, *args: Any, process_group: dist.ProcessGroup | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._group = process_group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self.enabled or not dist.is_initialized():
            return
        state = self._opt_state(optimizer)  # the flag LossScaler.unscale_ just set
        flag = torch.tensor([1.0 if state.found_inf else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        state.found_inf = bool(flag.item())
