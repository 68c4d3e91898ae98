"""FP8 weight all-gather for FSDP2: the weight subclasses and which recipes allow it.

With ``setup(model, "fsdp2", fp8_all_gather=True)`` each converted weight becomes an
:class:`Fp8AllGatherWeight`, a thin tensor subclass around the high-precision master
weight that implements FSDP2's ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``
extension. Before the all-gather each rank computes the amax grid of its shard,
all-reduces it (max), derives the scales exactly as a single process would from the full
weight (for delayed scaling: from the history, then records the amax), and casts its
shard; the wire carries the 1-byte payload only (the scale grid is the same on every
rank, so it travels as metadata). After the gather the unsharded weight is an
:class:`Fp8GatheredWeight` carrying a :class:`~fp8train.tensor.ScaledTensor`;
``fp8train.autograd`` uses it as the forward GEMM's weight operand directly (no second
cast) and the grad_input GEMM reuses it; the weight gradient flows to the master weight
through FSDP's reduce-scatter as usual. The payload and scales are bitwise those of
``quantize(full_weight, recipe.weight)`` on one process. (With a bf16 ``param_dtype``
the FP8 path still casts the fp32 master once, while a bf16 all-gather rounds the
weight to bf16 before the FP8 cast: the two differ, and the FP8 path is the one that
matches the single-process fp32 recipe.) A backward re-gather casts the shard again
with the scales cached by the forward: no amax all-reduce, no second history record.
``benchmarks/dist_fp8_all_gather.py`` measures the bytes on the wire against a bf16
all-gather.

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

A layer demoted by :class:`fp8train.Guard` (``LayerState.demote``) gathers for the
recipe it runs now: in FP8 with that recipe's weight spec when the recipe allows it (a
delayed layer moved to tensorwise), else -- moved to rowwise, mxfp8 or high precision
-- the master shards in the parameter dtype through one collective of our own
(:func:`_gather_full`); FSDP's fixed-size buffer then carries zeros (its size was set by
the first gather and cannot change), so such a layer moves its bytes plus one byte per
element. The unsharded weight then holds the full high-precision weight: the layer
quantises it with its recipe (or multiplies it in the compute dtype) exactly as a
single process would.

Not promised: FP8 all-gather under activation checkpointing with delayed scaling when
two forwards of one layer precede their backwards (backward reuses the latest scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from fp8train.autograd import _reusable_transposed, operand_scale
from fp8train.distributed.process_group import max_over_ranks
from fp8train.nn import Fp8Linear
from fp8train.recipes import Recipe
from fp8train.scaling import Granularity, NonFiniteAmaxError, ScaleSpec
from fp8train.tensor import ScaledTensor

__all__ = ["Fp8AllGatherWeight", "Fp8GatheredWeight", "fp8_all_gather_unsupported_reason"]


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


def _gather_full(
    shard: torch.Tensor, n_rows: int, per_rank: int, group: Any, dtype: torch.dtype
) -> torch.Tensor:
    """The full weight ``(n_rows, K)`` in ``dtype`` from every rank's ``shard``: FSDP's
    dim-0 shards padded to ``per_rank`` rows, gathered in rank order, the padding cut."""
    local = shard.to(dtype)
    if local.shape[0] != per_rank:
        local = F.pad(local, (0, 0, 0, per_rank - local.shape[0]))
    world = dist.get_world_size(group)
    out = torch.empty((world * per_rank, *local.shape[1:]), dtype=dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out[:n_rows]


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
    own dtype); only FSDP2's all-gather is changed. Build it through
    :func:`fp8train.distributed.setup`.
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
        # (version of the master when last cast, the weight spec, its amax grid, the
        # scale grid used): backward re-gathers reuse the forward's scale instead of
        # re-reducing (and, for delayed scaling, re-recording) the amax.
        self._cached: tuple[int, ScaleSpec, torch.Tensor, torch.Tensor] | None = None

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
        # The recipe the layer runs now: a demotion (fp8train.Guard) may have changed it.
        state = module.fp8_state
        spec = state.recipe.weight
        shard = self._tensor  # (rows of this rank, K), unpadded
        n_rows = int(outer_size[0])
        row0, per_rank = _fsdp_row_offset(n_rows, mesh.get_local_rank(), mesh.size())
        if state.high_precision or fp8_all_gather_unsupported_reason(state.recipe) is not None:
            # Demoted past what an FP8 gather serves: the master shards, gathered whole;
            # FSDP's buffer (sized by the first gather) carries zeros.
            dtype = mp_policy.param_dtype or shard.dtype
            full = _gather_full(shard, n_rows, per_rank, mesh.get_group(), dtype)
            zeros = shard.new_zeros((per_rank, *shard.shape[1:]), dtype=torch.uint8)
            return (zeros,), (None, None, spec, full)
        aligned, pad_top = _align_to_blocks(shard, spec, row0)
        version = shard._version
        cached = self._cached
        if _in_backward() and cached is not None and cached[:2] == (version, spec):
            _, _, amax, scale = cached
        else:
            # Max over ranks: every rank now holds the amax grid of the full weight.
            local = _amax_grid(aligned, spec, row0, n_rows, state.kernels.amax)
            amax = max_over_ranks(local, mesh.get_group())
            if not bool(torch.isfinite(amax).all()):
                raise NonFiniteAmaxError(
                    f"layer {state.name!r}: the weight holds NaN/inf on at least one rank, so "
                    "it has no FP8 scale; training diverged (lower the learning rate or "
                    "resume from an earlier checkpoint)"
                )
            # One scale path for 1 and N ranks: history, then record (delayed scaling).
            scale = operand_scale(amax, spec, "weight", state)
            self._cached = (version, spec, amax, scale)
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
        return (payload.view(torch.uint8),), (amax, scale, spec, None)

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
        amax, scale, spec, full = metadata
        if out is not None:
            # Later gathers write into the same buffer, which ``out`` already views; only
            # the scale (and the spec, after a demotion) is new, or the full weight.
            if not isinstance(out, Fp8GatheredWeight):
                raise TypeError(
                    f"expected the unsharded weight to be an Fp8GatheredWeight, "
                    f"got {type(out).__name__}"
                )
            out._full = full
            if full is None:
                assert out._scaled is not None  # a demotion never goes back to FP8
                assert spec.fmt.torch_dtype is not None  # checked at setup and demotion
                payload = out._scaled.data.view(spec.fmt.torch_dtype)  # 1 byte either way
                out._scaled = replace(out._scaled, payload=payload, scale=scale, spec=spec)
                out._amax = amax
            return None
        if full is not None:  # demoted before its first gather (a resumed checkpoint)
            return Fp8GatheredWeight(None, None, full), (data,)
        assert spec.fmt.torch_dtype is not None  # checked at setup
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

    For a layer demoted past what the FP8 gather serves (module docstring), ``full`` is
    the gathered high-precision weight: ``fp8_gathered`` is then None (the layer
    quantises the weight itself) and every op sees ``full``.
    """

    _scaled: ScaledTensor | None
    _amax: torch.Tensor | None
    _full: torch.Tensor | None

    @staticmethod
    def __new__(
        cls,
        scaled: ScaledTensor | None,
        amax: torch.Tensor | None,
        full: torch.Tensor | None = None,
    ) -> Fp8GatheredWeight:
        like = full if full is not None else None if scaled is None else scaled.data
        if like is None:
            raise ValueError("Fp8GatheredWeight needs the FP8 weight or the full weight")
        return torch.Tensor._make_wrapper_subclass(
            cls,
            like.size(),
            strides=like.stride(),
            storage_offset=like.storage_offset(),
            dtype=full.dtype if full is not None else scaled.orig_dtype,  # type: ignore[union-attr]
            layout=like.layout,
            device=like.device,
        )

    def __init__(
        self,
        scaled: ScaledTensor | None,
        amax: torch.Tensor | None,
        full: torch.Tensor | None = None,
    ) -> None:
        self._scaled = scaled
        self._amax = amax
        self._full = full

    @property
    def fp8_gathered(self) -> ScaledTensor | None:
        return None if self._full is not None else self._scaled

    @property
    def fp8_gathered_amax(self) -> torch.Tensor | None:
        return None if self._full is not None else self._amax

    def _value(self) -> torch.Tensor:
        """What an op other than the FP8 GEMMs sees."""
        if self._full is not None:
            return self._full
        assert self._scaled is not None  # one of the two is always set (__new__)
        return self._scaled.dequantize(self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        if self._full is not None:
            return f"Fp8GatheredWeight(full={self._full!r})"
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
            return cls(args[0]._scaled, args[0]._amax, args[0]._full)
        if func is torch.ops.aten.as_strided.default:
            # FSDP2 views the padded gathered rows as the parameter's shape; the scale grid
            # already describes the unpadded weight (and the full weight is unpadded).
            s: ScaledTensor | None = args[0]._scaled
            full = args[0]._full
            return cls(
                None if s is None else replace(s, payload=func(s.data, *args[1:], **kwargs)),
                args[0]._amax,
                None if full is None else func(full, *args[1:], **kwargs),
            )
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._value(), (args, kwargs))
        return func(*args, **kwargs)
