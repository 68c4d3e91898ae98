"""Make a converted model data-parallel: DDP, or FSDP2 with optional FP8 all-gather.

Convert first (``fp8train.convert``), then call :func:`setup`, then build the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from fp8train.distributed.fp8_all_gather import (
    Fp8AllGatherWeight,
    fp8_all_gather_unsupported_reason,
)
from fp8train.distributed.layer_hooks import Fp8LayerHooks
from fp8train.nn import fp8_layers

__all__ = ["MODES", "Mode", "setup", "unwrap"]

Mode = Literal["ddp", "fsdp2"]
MODES: tuple[str, ...] = ("ddp", "fsdp2")


def unwrap(model: nn.Module) -> nn.Module:
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

    FSDP2 only: ``fp8_all_gather`` all-gathers FP8 weights (``fp8train.distributed.
    fp8_all_gather`` says which recipes support it; others raise ``ValueError`` naming
    the layer and why).
    ``param_dtype``/``reduce_dtype``: FSDP2's ``MixedPrecisionPolicy`` (unsharded
    parameters and gradient reduction; None keeps the parameters' dtype). ``units``:
    ``(module, qualified_name) -> bool`` selecting submodules sharded as their own unit
    (default: the elements of every ``nn.ModuleList``, e.g. transformer blocks).
    ``reshard_after_forward``: free unsharded weights after forward (re-gathered in
    backward; with FP8 all-gather the re-gather reuses the forward's scales).

    Every mode sets each FP8 layer's ``fp8_state.distributed`` to one
    :class:`~fp8train.distributed.Fp8LayerHooks` (delayed-scaling amaxes all-reduced,
    FP8-gathered weights used as they are; see the package docstring).
    ``process_group``: the data-parallel group (default: the world).
    Raises ``ValueError`` for an unknown mode, options that do not apply to it, or no
    process group (call :func:`init_from_env` first).
    """
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of {MODES}, got {mode!r}; use 'ddp' for full replicas or "
            "'fsdp2' for sharded weights"
        )
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

    # Every FP8 layer: autograd asks the hooks for the max of delayed-scaling amaxes over
    # the group and for the FP8 weight an all-gather produced (one instance serves all).
    hooks = Fp8LayerHooks(process_group)
    for _, layer in layers:
        layer.fp8_state.distributed = hooks

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
