"""Data-parallel training of converted models: DDP, FSDP2, FP8 all-gather, checkpoints.

Launch with ``torchrun --nproc-per-node N`` (gloo on CPU); every rank runs::

    info = init_from_env()                         # process group from torchrun's env
    model = convert(build_model(), "tensorwise")   # convert first, then distribute
    model = setup(model, "fsdp2", fp8_all_gather=True)   # or "ddp"
    opt = torch.optim.AdamW(model.parameters())    # after setup: FSDP2 swaps Parameters
    scaler = DistributedLossScaler()               # same skip decision on every rank
    with collective_errors():                      # a lost peer -> RankFailureError
        for step in ...:
            x, y = (batch_shard(t) for t in global_batch(step))   # this rank's rows
            loss = loss_fn(model(x), y)
            ...
            log(mean_over_ranks(loss))             # the global-batch loss, on is_main()
    save_checkpoint(path, model, opt, loss_scaler=scaler)   # torch.distributed.checkpoint
    load_checkpoint(path, model, opt, loss_scaler=scaler)   # on any number of ranks
    shutdown()

A run on N ranks computes what one process computes on the global batch split into N
micro-batches with averaged gradients, bit for bit for current-scaling recipes (the tests
check it); with delayed scaling, what one process computes on the whole global batch at
once, up to fp32 summation order.

What stays identical on every rank, and why:

* **Delayed-scaling histories.** :func:`setup` gives every FP8 layer's
  :class:`~fp8train.autograd.LayerState` an ``amax_reduce`` hook: the amax of each
  operand that has a history is all-reduced (max) before it is used and recorded, so all
  ranks record the same value and derive the same scales. A non-finite amax on one rank
  becomes inf on all of them, so every rank skips the same record. The max over ranks is
  also the amax a single process would see on the global batch. Current-scaling recipes
  keep per-rank activation and gradient scales (each rank quantises its own batch), as
  torchao and Transformer Engine do; only weights need one scale everywhere.
* **The loss scaler's skip decision.** :class:`DistributedLossScaler` all-reduces its
  found-inf flag (max), so one rank's overflow skips the step on every rank. Averaged
  gradients usually carry an inf to every rank anyway, but not always (a parameter
  outside the data-parallel wrapper, a gradient touched after the reduction); a rank that
  steps while another skips makes the replicas diverge silently, so one all-reduced flag
  per step rules it out instead of relying on it.

**FP8 weight all-gather (FSDP2, opt-in).** With ``fp8_all_gather=True`` each converted
weight becomes an :class:`Fp8AllGatherWeight`, a thin tensor subclass around the
high-precision master weight that implements FSDP2's ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` extension. Before the all-gather each rank computes the amax
grid of its shard, all-reduces it (max), derives the scales exactly as a single process
would from the full weight (for delayed scaling: from the history, then records the amax),
and casts its shard; the wire carries the 1-byte payload only (the scale grid is the same
on every rank, so it travels as metadata). After the gather the unsharded weight is an
:class:`Fp8GatheredWeight` carrying a :class:`~fp8train.tensor.ScaledTensor`;
``fp8train.autograd`` uses it as the forward GEMM's weight operand directly (no second
cast) and the grad_input GEMM reuses it; the weight gradient flows to the master weight
through FSDP's reduce-scatter as usual. The payload and scales are bitwise those of
``quantize(full_weight, recipe.weight)`` on one process. (With a bf16 ``param_dtype``
the FP8 path still casts the fp32 master once, while a bf16 all-gather rounds the
weight to bf16 before the FP8 cast: the two differ, and the FP8 path is the one that
matches the single-process fp32 recipe.) A backward re-gather casts the shard again
with the scales cached by the forward: no amax all-reduce, no second history record.
Measured on the tests' model: 0.505 of the bf16 all-gather's bytes; on the lab GPT, whose
embeddings stay bf16, 0.530 (``benchmarks/dist_fp8_all_gather.py``).

Which recipes support it (decided from each recipe's weight spec, not its name):

* ``tensorwise``, ``delayed``, ``int8`` -- one scale per weight: all-reduce one scalar.
* ``blockwise`` -- 128x128 weight blocks: the block amax grid is all-reduced (max), so a
  block split between two ranks' shards gets the scale of the whole block; any shard
  boundary works.
* ``rowwise``, ``int8_rowwise``, ``mxfp8`` -- **not supported** (``ValueError`` at setup).
  The forward weight (one scale per row / 1x32 block along K) could be cast shard-locally,
  since FSDP shards rows and a row is whole on one rank. But the grad_input GEMM contracts
  out_features, so it needs the weight quantised along the other axis (one scale per
  column / 32x1 blocks), and such a scale spans every rank's rows. Deriving it from the
  gathered FP8 weight rounds the weight twice (the result no longer matches a single
  process), and gathering a second, column-quantised FP8 copy puts 2 bytes per element on
  the wire: no saving over a bf16 all-gather.
* Any recipe with ``fp8_dgrad=False``: grad_input runs in high precision on the unsharded
  weight, which an FP8 all-gather does not have.

Not promised: FP8 all-gather under activation checkpointing with delayed scaling when
two forwards of one layer precede their backwards (backward reuses the latest scale).
Every rank must run every forward (evaluation included): FSDP and the amax all-reduces
are collectives.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from fp8train.autograd import _reusable_transposed, operand_scale
from fp8train.loss_scaler import LossScaler
from fp8train.nn import Fp8Linear, fp8_layers, load_recipe_state_dict, recipe_state_dict
from fp8train.recipes import Recipe
from fp8train.scaling import (
    Granularity,
    NonFiniteAmaxError,
    ScaleSpec,
)
from fp8train.tensor import ScaledTensor

__all__ = [
    "DistInfo",
    "DistributedLossScaler",
    "Fp8AllGatherWeight",
    "Fp8GatheredWeight",
    "RankFailureError",
    "batch_shard",
    "collective_errors",
    "fp8_all_gather_unsupported_reason",
    "init_from_env",
    "is_main",
    "load_checkpoint",
    "mean_over_ranks",
    "rank",
    "save_checkpoint",
    "setup",
    "shutdown",
    "world_size",
]

Mode = Literal["ddp", "fsdp2"]
MODES: tuple[str, ...] = ("ddp", "fsdp2")

# A stalled or dead peer must end the job, not hang it: 5 minutes covers a slow first
# step (and a checkpoint write) on a loaded CPU while still failing in finite time.
DEFAULT_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------- process group


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
    returned): a DDP reducer destroyed after its process group can hang at exit.
    """
    if dist.is_initialized():
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


# ----------------------------------------------------------------------------- amax all-reduce


def _max_over_ranks(amax: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Elementwise max of ``amax`` over ``group``; NaN/inf anywhere becomes inf everywhere.

    NaN is mapped to inf first because a MAX reduction's NaN handling is backend-defined,
    while inf always wins: every rank then sees the same non-finite verdict.
    """
    reduced = torch.where(torch.isfinite(amax), amax, math.inf).float().contiguous()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    return reduced


@dataclass(frozen=True)
class _AmaxAllReduce:
    """The ``LayerState.amax_reduce`` hook: max of an amax over the data-parallel group."""

    group: dist.ProcessGroup | None

    def __call__(self, amax: torch.Tensor) -> torch.Tensor:
        return _max_over_ranks(amax, self.group)


# ----------------------------------------------------------------------------- FP8 all-gather


def fp8_all_gather_unsupported_reason(recipe: Recipe) -> str | None:
    """Why ``recipe``'s weights cannot be all-gathered in FP8, or None if they can."""
    spec = recipe.weight
    if (
        spec.fmt.torch_dtype is None
        or torch.empty((), dtype=spec.fmt.torch_dtype).element_size() != 1
    ):
        return f"its weight format {spec.fmt.name} is not one byte per element"
    if not recipe.fp8_dgrad:
        return (
            "fp8_dgrad=False runs the grad_input GEMM in high precision on the "
            "unsharded weight, which an FP8 all-gather does not have"
        )
    if not _reusable_transposed(spec):
        return (
            f"its weight scales ({spec.describe()}) change when the grad_input GEMM "
            "contracts out_features: that GEMM needs the weight re-quantised along the "
            "other axis, with scales spanning every rank's rows; re-quantising the "
            "gathered FP8 weight rounds it twice (no longer the single-process recipe) "
            "and gathering a second FP8 copy costs as many bytes as a bf16 all-gather"
        )
    return None


def _fsdp_row_offset(n_rows: int, shard_rank: int, shard_world: int) -> tuple[int, int]:
    """(first row, padded rows per rank) of ``shard_rank``'s FSDP dim-0 shard.

    FSDP2 shards dim 0 like ``torch.chunk``: ``ceil(n_rows / world)`` rows per rank, the
    last ranks possibly shorter or empty, every shard padded to that length.
    """
    per_rank = -(-n_rows // shard_world)
    return min(shard_rank * per_rank, n_rows), per_rank


def _align_to_blocks(shard: torch.Tensor, spec: ScaleSpec, row0: int) -> tuple[torch.Tensor, int]:
    """The shard with ``pad_top`` zero rows above it, so that its first row starts a
    block of the full weight (zeros change neither an amax nor a payload)."""
    if spec.granularity is Granularity.TENSOR:
        return shard, 0
    pad_top = row0 % spec.block[0]
    return (F.pad(shard, (0, 0, pad_top, 0)) if pad_top else shard), pad_top


def _amax_grid(
    aligned: torch.Tensor,
    spec: ScaleSpec,
    row0: int,
    n_rows: int,
    amax: Callable[[torch.Tensor, ScaleSpec], torch.Tensor],
) -> torch.Tensor:
    """This rank's contribution to the full weight's amax grid: its max wherever it
    holds rows of a scale group, zero elsewhere.

    TENSOR: the shard's amax, shape (). BLOCK: ``(ceil(N/br), ceil(K/bc))``.
    """
    if spec.granularity is Granularity.TENSOR:
        return amax(aligned, spec)
    br, bc = spec.block
    grid = torch.zeros(-(-n_rows // br), -(-aligned.shape[1] // bc), device=aligned.device)
    if aligned.shape[0]:
        local = amax(aligned, spec)  # (blocks this shard touches, ceil(K/bc))
        grid[row0 // br : row0 // br + local.shape[0]] = local
    return grid


def _in_backward() -> bool:
    # FSDP2 re-gathers resharded weights for backward from inside the autograd engine,
    # where a graph task is running; forward (and activation-checkpoint recompute outside
    # backward) runs with none.
    return bool(torch._C._current_graph_task_id() != -1)


# FSDP2 builds the sharded parameter with these ops (split, pad, narrow, copy, view;
# moves for CPU offload) and must get the subclass back so that its hooks survive. Every
# other op (optimizer updates, clones, norms) runs on the master tensor and returns a
# plain tensor, so optimizer state and user copies stay plain.
_KEEP_SUBCLASS = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
}


class Fp8AllGatherWeight(torch.Tensor):
    """A high-precision master weight whose FSDP2 all-gather carries FP8 payloads.

    Behaves as the wrapped tensor for every op (the optimizer updates the master in its
    own dtype); only FSDP2's all-gather is changed. Build it through :func:`setup`.
    """

    _tensor: torch.Tensor

    @staticmethod
    def __new__(cls, tensor: torch.Tensor) -> Fp8AllGatherWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor
        # (version of the master when last cast, its amax grid, the scale grid used):
        # backward re-gathers reuse the forward's scale instead of re-reducing (and, for
        # delayed scaling, re-recording) the amax.
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fp8AllGatherWeight({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func in _KEEP_SUBCLASS:
            return pytree.tree_map_only(torch.Tensor, cls, out)
        return out

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: None, outer_size: Any, outer_stride: Any
    ) -> Fp8AllGatherWeight:
        return Fp8AllGatherWeight(inner["_tensor"])

    # -- FSDP2 all-gather extension ------------------------------------------------------

    def fsdp_pre_all_gather(
        self,
        mesh: Any,
        outer_size: torch.Size,
        outer_stride: Any,
        module: nn.Module,
        mp_policy: Any,
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Cast this rank's shard to FP8 with the full weight's scales; return its bytes."""
        if not isinstance(module, Fp8Linear):
            raise TypeError(
                f"Fp8AllGatherWeight must be the weight of an Fp8Linear, found on "
                f"{type(module).__name__}"
            )
        spec, state = module.recipe.weight, module.fp8_state
        shard = self._tensor  # (rows of this rank, K), unpadded
        n_rows = int(outer_size[0])
        row0, per_rank = _fsdp_row_offset(n_rows, mesh.get_local_rank(), mesh.size())
        aligned, pad_top = _align_to_blocks(shard, spec, row0)
        version = shard._version
        if _in_backward() and self._cached is not None and self._cached[0] == version:
            _, amax, scale = self._cached
        else:
            # Max over ranks: every rank now holds the amax grid of the full weight.
            local = _amax_grid(aligned, spec, row0, n_rows, state.kernels.amax)
            amax = _max_over_ranks(local, mesh.get_group())
            if not bool(torch.isfinite(amax).all()):
                raise NonFiniteAmaxError(
                    f"layer {state.name!r}: the weight holds NaN/inf on at least one rank, so "
                    "it has no FP8 scale; training diverged (lower the learning rate or "
                    "resume from an earlier checkpoint)"
                )
            # One scale path for 1 and N ranks: history, then record (delayed scaling).
            scale = operand_scale(amax, spec, "weight", state)
            self._cached = (version, amax, scale)
        if spec.granularity is Granularity.TENSOR:
            local_scale = scale
        else:
            first = row0 // spec.block[0]
            local_scale = scale[first : first + -(-aligned.shape[0] // spec.block[0])]
        # The layer's own cast kernel (eager or compiled): the single-process bits.
        cast, _ = state.kernels.cast_with_operand(aligned, local_scale, spec, None)
        assert cast is not None  # no operand asked for: the payload is always made
        payload = cast[pad_top:]
        if payload.shape[0] != per_rank:  # FSDP gathers equal-sized (padded) shards
            payload = F.pad(payload.view(torch.uint8), (0, 0, 0, per_rank - payload.shape[0]))
        # Bytes on the wire: gloo has no float8 dtype, and FSDP packs mixed dtypes as uint8.
        return (payload.view(torch.uint8),), (amax, scale, spec)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """Wrap the gathered bytes (padded ``(ranks * rows, K)``) as the unsharded weight."""
        (data,) = all_gather_outputs
        amax, scale, spec = metadata
        assert spec.fmt.torch_dtype is not None  # checked at setup
        if out is not None:
            # Later gathers write into the same buffer, which ``out`` already views; only
            # the scale is new.
            if not isinstance(out, Fp8GatheredWeight):
                raise TypeError(
                    f"expected the unsharded weight to be an Fp8GatheredWeight, "
                    f"got {type(out).__name__}"
                )
            out._scaled = replace(out._scaled, scale=scale)
            out._amax = amax
            return None
        payload = data.view(spec.fmt.torch_dtype)
        weight = Fp8GatheredWeight(ScaledTensor(payload, scale, spec, param_dtype), amax)
        return weight, (data,)


class Fp8GatheredWeight(torch.Tensor):
    """The unsharded weight of an FP8 all-gather: shape and dtype of the parameter.

    ``fp8_gathered`` is the :class:`~fp8train.tensor.ScaledTensor` the FP8 GEMMs use;
    ``fp8_gathered_amax`` the (all-reduced) amax grid of the master weight its scales came
    from. Any other op sees the dequantised weight (``payload / scale`` in the parameter
    dtype): that is what a GEMM falling back to high precision (a non-finite input)
    multiplies by.
    """

    _scaled: ScaledTensor
    _amax: torch.Tensor

    @staticmethod
    def __new__(cls, scaled: ScaledTensor, amax: torch.Tensor) -> Fp8GatheredWeight:
        d = scaled.data
        return torch.Tensor._make_wrapper_subclass(
            cls,
            d.size(),
            strides=d.stride(),
            storage_offset=d.storage_offset(),
            dtype=scaled.orig_dtype,
            layout=d.layout,
            device=d.device,
        )

    def __init__(self, scaled: ScaledTensor, amax: torch.Tensor) -> None:
        self._scaled = scaled
        self._amax = amax

    @property
    def fp8_gathered(self) -> ScaledTensor:
        return self._scaled

    @property
    def fp8_gathered_amax(self) -> torch.Tensor:
        return self._amax

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fp8GatheredWeight({self._scaled!r})"

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(args[0]._scaled, args[0]._amax)
        if func is torch.ops.aten.as_strided.default:
            # FSDP2 views the padded gathered rows as the parameter's shape; the scale grid
            # already describes the unpadded weight.
            s: ScaledTensor = args[0]._scaled
            return cls(replace(s, payload=func(s.data, *args[1:], **kwargs)), args[0]._amax)
        args, kwargs = pytree.tree_map_only(
            cls, lambda t: t._scaled.dequantize(t.dtype), (args, kwargs)
        )
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- setup


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def setup(
    model: nn.Module,
    mode: Mode | str,
    *,
    fp8_all_gather: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    units: Callable[[nn.Module, str], bool] | None = None,
    reshard_after_forward: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Make a converted model data-parallel over the current process group; return it.

    ``mode``: ``"ddp"`` wraps the model in ``DistributedDataParallel`` (the returned module
    is the wrapper); ``"fsdp2"`` applies ``fully_shard`` in place to every unit and then
    the root (the returned module is ``model``). Build the optimizer *after* this call.

    FSDP2 only: ``fp8_all_gather`` all-gathers FP8 weights (see the module docstring for
    the recipes that support it; others raise ``ValueError`` naming the layer and why).
    ``param_dtype``/``reduce_dtype``: FSDP2's ``MixedPrecisionPolicy`` (unsharded
    parameters and gradient reduction; None keeps the parameters' dtype). ``units``:
    ``(module, qualified_name) -> bool`` selecting submodules sharded as their own unit
    (default: the elements of every ``nn.ModuleList``, e.g. transformer blocks).
    ``reshard_after_forward``: free unsharded weights after forward (re-gathered in
    backward; with FP8 all-gather the re-gather reuses the forward's scales).

    Every mode installs the amax all-reduce for delayed-scaling layers (see the module
    docstring). ``process_group``: the data-parallel group (default: the world).
    Raises ``ValueError`` for an unknown mode, options that do not apply to it, or no
    process group (call :func:`init_from_env` first).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dist.is_initialized():
        raise ValueError(
            "setup needs a process group: call fp8train.distributed.init_from_env() "
            "first, under torchrun"
        )
    if mode == "ddp" and (
        fp8_all_gather or param_dtype is not None or reduce_dtype is not None or units is not None
    ):
        raise ValueError(
            "fp8_all_gather, param_dtype, reduce_dtype and units are FSDP2 options; "
            "DDP keeps full replicas and all-reduces gradients (use mode='fsdp2')"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_get_fsdp_state"):
        raise ValueError("model is already data-parallel; pass the converted model itself")
    layers = list(fp8_layers(model))
    if fp8_all_gather:
        bad = {}
        for name, layer in layers:
            reason = fp8_all_gather_unsupported_reason(layer.recipe)
            if reason is not None:
                bad[name] = (layer.recipe.name, reason)
        if bad:
            (first, (recipe, reason)), more = next(iter(bad.items())), len(bad) - 1
            raise ValueError(
                f"fp8_all_gather does not support recipe {recipe!r} (layer {first!r}"
                f"{f' and {more} more' if more else ''}): {reason}. Supported: per-tensor "
                "(tensorwise, delayed, int8) and 128x128 block (blockwise) weight scales; "
                "use fp8_all_gather=False for this recipe"
            )
        if not layers:
            raise ValueError(
                "fp8_all_gather=True but the model has no Fp8Linear layers; "
                "call fp8train.convert first"
            )

    if dist.get_world_size(process_group) > 1:
        reduce = _AmaxAllReduce(process_group)
        for _, layer in layers:
            if layer.fp8_state.histories:
                layer.fp8_state.amax_reduce = reduce

    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, process_group=process_group)

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if fp8_all_gather:
        for _, layer in layers:
            w = layer.weight
            layer.weight = nn.Parameter(
                Fp8AllGatherWeight(w.detach()), requires_grad=w.requires_grad
            )
    group = process_group if process_group is not None else dist.group.WORLD
    if group is None:  # unreachable after the is_initialized() check; keeps types honest
        raise ValueError("no default process group; call init_from_env() first")
    mesh = DeviceMesh.from_group(group, "cpu")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    pick = units or _in_module_list(model)
    for name, module in list(model.named_modules()):
        if name and pick(module, name):
            fully_shard(
                module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
            )
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def _in_module_list(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    members = {id(m) for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    return lambda module, name: id(module) in members


# ----------------------------------------------------------------------------- loss scaling


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


# ----------------------------------------------------------------------------- checkpoints


def _plain_master_weights(sd: dict[str, Any]) -> dict[str, Any]:
    """Replace FP8-all-gather master weights by plain tensors sharing their memory.

    ``torch.distributed.checkpoint`` reads and writes tensor storage, which a wrapper
    subclass has none of; the master tensor is what the checkpoint holds anyway.
    """
    from torch.distributed.tensor import DTensor

    def plain(t: Any) -> Any:
        if isinstance(t, DTensor) and isinstance(t._local_tensor, Fp8AllGatherWeight):
            return DTensor.from_local(
                t._local_tensor._tensor,
                t.device_mesh,
                t.placements,
                run_check=False,
                shape=t.shape,
                stride=t.stride(),
            )
        if isinstance(t, Fp8AllGatherWeight):
            return t._tensor
        return t

    return {k: plain(v) for k, v in sd.items()}


def _fp8train_state(
    model: nn.Module, loss_scaler: LossScaler | None, extra: dict[str, Any] | None
) -> io.BytesIO:
    # Recipe state and the scaler are small and identical on every rank: one pickled
    # object, so that a history that is still empty (window None) on the loading side
    # does not have to match a tensor's shape.
    buf = io.BytesIO()
    torch.save(
        {
            "recipe": recipe_state_dict(_unwrap(model)),
            "loss_scaler": None if loss_scaler is None else loss_scaler.state_dict(),
            "world_size": world_size(),
            "extra": extra or {},
        },
        buf,
    )
    buf.seek(0)
    return buf


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss_scaler: LossScaler | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a ``torch.distributed.checkpoint`` directory; every rank must call it.

    Holds the model (FSDP2 shards, DDP or plain), the optimizer state keyed by parameter
    name, the recipe state (:func:`fp8train.recipe_state_dict`), the loss scaler and
    ``extra`` (small values of plain types -- numbers, strings, lists, dicts, tensors --
    e.g. the step; loaded with ``weights_only=True``). Loadable on any number of ranks
    and any mode by :func:`load_checkpoint`.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_saver import save

    state: dict[str, Any] = {"model": _plain_master_weights(get_model_state_dict(model))}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    state["fp8train"] = _fp8train_state(model, loss_scaler, extra)
    save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss_scaler: LossScaler | None = None,
    rescale_grad_histories: bool = False,
) -> dict[str, Any]:
    """Restore :func:`save_checkpoint` output in place; return its ``extra`` dict.

    Call after :func:`setup` (or on a plain model without a process group) and after
    building the optimizer; the checkpoint may come from a different number of ranks.

    ``rescale_grad_histories``: with a loss averaged over each rank's batch, a rank's
    output gradients, and so the delayed-scaling ``grad_output`` amaxes, are proportional
    to the number of ranks (the data-parallel average divides by it again). True
    multiplies the loaded ``grad_output`` windows by ``ranks now / ranks at save``, so a
    resume on another number of ranks casts gradients with the scales it would have had
    all along (exactly, for power-of-two ratios). False (default) loads them as saved;
    the scales are then off by that ratio until ``history_len`` new steps replace them.
    Leave it False for a loss summed over rows.

    Raises ``ValueError`` if the recipe state does not match the model's FP8 layers.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    model_sd = _plain_master_weights(get_model_state_dict(model))
    state: dict[str, Any] = {"model": model_sd, "fp8train": io.BytesIO()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    load(state, checkpoint_id=os.fspath(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    blob = state["fp8train"]
    if isinstance(blob, io.BytesIO):
        blob.seek(0)
        blob = torch.load(blob, weights_only=True)
    if rescale_grad_histories and blob["world_size"] != world_size():
        ratio = world_size() / blob["world_size"]
        for layer in blob["recipe"]["layers"].values():
            history = layer["histories"].get("grad_output")
            if history is not None and history["window"] is not None:
                history["window"] = history["window"] * ratio
    load_recipe_state_dict(_unwrap(model), blob["recipe"])
    if loss_scaler is not None:
        if blob["loss_scaler"] is None:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} holds no loss scaler state; "
                "load without loss_scaler="
            )
        loss_scaler.load_state_dict(blob["loss_scaler"])
    extra: dict[str, Any] = blob["extra"]
    return extra
