"""The process group: joining it, where this rank sits, scalar collectives, failures.

Everything here works without a process group too (one process, rank 0 of 1), so that
the same training script runs under ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "RankFailureError",
    "batch_shard",
    "collective_errors",
    "init_from_env",
    "is_main",
    "max_over_ranks",
    "mean_over_ranks",
    "rank",
    "shutdown",
    "world_size",
]

# A stalled or dead peer must end the job, not hang it: 5 minutes covers a slow first
# step (and a checkpoint write) on a loaded CPU while still failing in finite time.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` on its host."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(*, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by torchrun's environment; return this rank.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (set by ``torchrun``). Without ``WORLD_SIZE`` (a plain ``python`` launch) no group is
    created and ``DistInfo(0, 1, 0)`` is returned. ``backend``: ``"gloo"`` for CPU.
    ``timeout_s``: every collective fails after this long without its peers (see
    :func:`collective_errors`). Idempotent: a second call returns the current group.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if dist.is_initialized():
        return DistInfo(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with "
            "torchrun (which sets all of them) or set them yourself"
        )
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    )


def shutdown() -> None:
    """Destroy the process group if there is one (call at the end of every rank).

    Call it once the data-parallel model is gone (e.g. after the training function has
    returned): a DDP reducer destroyed after its process group can hang at exit, on some
    runs only. A DDP model still referenced here (a closure's default argument counts)
    gets a ``RuntimeWarning`` that says so.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    # type(), not isinstance: some objects warn when their __class__ is read.
    alive = sum(issubclass(type(o), DistributedDataParallel) for o in gc.get_objects())
    if alive:
        warnings.warn(
            f"fp8train.distributed.shutdown: {alive} DistributedDataParallel model(s) still "
            "referenced; destroying the process group under a live DDP reducer can hang this "
            "rank when the model is freed later. Drop every reference to the model first.",
            RuntimeWarning,
            stacklevel=2,
        )
    dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0 (the rank that logs and writes files)."""
    return rank() == 0


def batch_shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (dim 0), e.g. one drawn from a shared seed.

    Rank ``r`` of ``W`` gets rows ``[r * B/W, (r + 1) * B/W)``: every rank together sees
    the global batch exactly once. Raises ``ValueError`` unless ``W`` divides ``B``.
    """
    world, r = world_size(), rank()
    if batch.shape[0] % world:
        raise ValueError(
            f"global batch of {batch.shape[0]} rows does not split over {world} "
            "ranks; use a batch size that is a multiple of the world size"
        )
    per_rank = batch.shape[0] // world
    return batch[r * per_rank : (r + 1) * per_rank]


def mean_over_ranks(value: torch.Tensor | float) -> float:
    """The mean of a scalar over all ranks (e.g. the global-batch loss); a collective."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(())
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def max_over_ranks(amax: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Elementwise max of ``amax`` over ``group`` (fp32, same shape); a collective.

    NaN/inf anywhere becomes inf everywhere: NaN is mapped to inf first because a MAX
    reduction's NaN handling is backend-defined, while inf always wins, so every rank
    sees the same non-finite verdict.
    """
    reduced = torch.where(torch.isfinite(amax), amax, math.inf).float().contiguous()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    return reduced


class RankFailureError(RuntimeError):
    """A collective failed: a peer rank died, stalled past the timeout, or lost its link."""


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Re-raise a failed collective inside the block as :class:`RankFailureError`.

    A gloo collective whose peer has died fails at once ("connection closed"); one whose
    peer stalls fails after the process group's timeout. Both surface as backend errors
    deep inside FSDP or autograd; this names the cause and this rank. Wrap the training
    loop: ``with collective_errors(): train(...)``.
    """
    try:
        yield
    except RankFailureError:
        raise
    except (dist.DistError, RuntimeError) as e:
        if not isinstance(e, dist.DistError) and not _looks_like_collective_failure(e):
            raise
        where = f"rank {rank()} of {world_size()}" if dist.is_initialized() else "this rank"
        raise RankFailureError(
            f"{where}: a collective failed, so another rank most likely died, stalled past "
            f"the process-group timeout, or lost its connection; check the other ranks' "
            f"logs for the first error. Backend said: {e}"
        ) from e


def _looks_like_collective_failure(e: BaseException) -> bool:
    # gloo raises plain RuntimeErrors whose text names its source file
    # (".../gloo/transport/tcp/pair.cc: Connection closed by peer", "... Timed out waiting").
    msg = str(e).lower()
    return any(
        s in msg
        for s in (
            "gloo",
            "nccl",
            "connection closed",
            "connection reset",
            "broken pipe",
            "timed out waiting",
        )
    )
