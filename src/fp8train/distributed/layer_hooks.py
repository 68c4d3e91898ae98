"""What an FP8 layer asks of the data-parallel group: the ``DistributedHooks`` of autograd.

:func:`fp8train.distributed.setup` gives every FP8 layer's
:class:`~fp8train.autograd.LayerState` one :class:`Fp8LayerHooks` (``distributed``), so
that ``fp8train.autograd`` reaches the process group and the FP8 all-gather through one
typed interface instead of attributes looked up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fp8train.distributed.fp8_all_gather import Fp8GatheredWeight
from fp8train.distributed.process_group import max_over_ranks
from fp8train.tensor import ScaledTensor

__all__ = ["Fp8LayerHooks"]


@dataclass(frozen=True)
class Fp8LayerHooks:
    """``fp8train.autograd.DistributedHooks`` over ``group`` (None: the world).

    One instance serves every layer of a model; it holds no per-layer state.
    """

    group: dist.ProcessGroup | None = None

    def reduce_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The elementwise max of ``amax`` over the group: every rank then records the same
        amax in its delayed-scaling history and derives the same scale, and a non-finite
        amax on one rank is inf on every rank, so all of them skip the same record.

        Also the amax one process would see on the global batch. Returns ``amax`` itself
        on a one-rank group (no collective); otherwise an fp32 tensor of its shape.
        """
        if dist.get_world_size(self.group) == 1:
            return amax
        return max_over_ranks(amax, self.group)

    @property
    def stream_rank(self) -> int:
        """This process's rank in the group: its random streams differ from the others'."""
        return dist.get_rank(self.group)

    def gathered(self, weight: torch.Tensor) -> tuple[ScaledTensor, torch.Tensor] | None:
        """``(quantised weight, amax its scales came from)`` if FSDP2 all-gathered
        ``weight`` in FP8 (an :class:`Fp8GatheredWeight`), else None.

        The GEMMs then use the gathered payload as it is: its scales were derived (and, for
        delayed scaling, recorded) before the gather, from the amax of the full weight.
        """
        if isinstance(weight, Fp8GatheredWeight):
            scaled, amax = weight.fp8_gathered, weight.fp8_gathered_amax
            # None: the gather brought the full weight (a demoted layer quantises it).
            return None if scaled is None or amax is None else (scaled, amax)
        return None


if TYPE_CHECKING:  # mypy checks that the class satisfies autograd's protocol
    from fp8train.autograd import DistributedHooks

    _conforms: DistributedHooks = Fp8LayerHooks()
