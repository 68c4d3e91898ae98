"""One decision for every rank: the guard's choices, reduced over a process group.

Under DDP or FSDP2 each rank sees its own batch, loss and operands, so ranks may disagree
on whether to act and on whom. Diverging would be fatal (one rank skipping an optimizer
step the others take, or demoting a layer the others keep in FP8), so every choice goes
through :func:`agree`: an element-wise max over the ranks of small integer vectors, which
the guard encodes so that the max is the right answer (the most severe action; the
earliest culprit layer in model order; any rank's "look closer").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["ReduceMax", "agree", "all_reduce_max"]

# In place or not, returns the element-wise max of the argument over the ranks.
ReduceMax = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_max(
    group: dist.ProcessGroup | None = None, device: torch.device | None = None
) -> ReduceMax | None:
    """The max over ``group`` (default: the default group) as a :data:`ReduceMax`; None
    when torch.distributed is not initialised or the group has one rank. ``device``:
    where the vector travels (a CUDA device for NCCL; default CPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device or torch.device("cpu"))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t

    return reduce


def agree(values: Sequence[int], reduce_max: ReduceMax | None) -> list[int]:
    """``values`` maxed element-wise over the ranks (``values`` itself on one process).

    Every rank must call it at the same point with as many values."""
    if reduce_max is None:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64)
    return [int(v) for v in reduce_max(t).cpu().tolist()]
