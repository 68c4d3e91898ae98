"""Checkpoints of a data-parallel run, through ``torch.distributed.checkpoint``.

One checkpoint holds the model (FSDP2 shards, DDP or plain), the optimizer, the recipe
state, the loss scaler and small user values, and loads on any number of ranks and in
any mode.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch import nn

from fp8train.distributed.fp8_all_gather import Fp8AllGatherWeight
from fp8train.distributed.process_group import world_size
from fp8train.distributed.wrap import unwrap
from fp8train.loss_scaler import LossScaler
from fp8train.nn import load_recipe_state_dict, recipe_state_dict

__all__ = ["load_checkpoint", "save_checkpoint"]


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
            "recipe": recipe_state_dict(unwrap(model)),
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
    load_recipe_state_dict(unwrap(model), blob["recipe"])
    if loss_scaler is not None:
        if blob["loss_scaler"] is None:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} holds no loss scaler state; "
                "load without loss_scaler="
            )
        loss_scaler.load_state_dict(blob["loss_scaler"])
    extra: dict[str, Any] = blob["extra"]
    return extra
