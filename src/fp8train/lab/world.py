"""Where a lab run trains: one process, or the ranks of a data-parallel group.

The training loop (``fp8train.lab.train.train_run``) is written once against
:class:`World`; :func:`world_for` picks the implementation from ``config.dist``:

* :class:`SingleProcess`: the model as built, the whole batch, the loss as it is, and
  one ``torch.save`` checkpoint file.
* :class:`DataParallel` (under torchrun; the caller has joined the process group): the
  converted model made data-parallel with ``fp8train.distributed.setup`` (DDP, with the
  gradient communication hook ``config.grad_comm`` names, or FSDP2 with FP8 weight
  all-gather where the recipe allows it); every rank draws the same
  global batch and trains on its ``batch_shard``; the logged loss is the mean over ranks,
  i.e. the global batch's; the loss scaler is a ``DistributedLossScaler`` (one skip
  decision for all ranks); checkpoints are ``torch.distributed.checkpoint`` folders
  written by every rank. Saved bytes for backward are not measured (under FSDP2 the
  unsharded weights would count as saved).

Both write checkpoints atomically: a crash leaves either the old checkpoint or the new
one. A checkpoint holds the run state the loop hands over (step, random states, history,
config) plus the model, the optimiser, the FP8 recipe state and the loss scaler.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import fp8train
from fp8train import distributed as fd
from fp8train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    state_checksums,
    unique_tmp_path,
    verify_state_checksums,
)
from fp8train.lab.config import LabConfig, LabError, recipe_of, runs_fp8

__all__ = [
    "CHECKPOINT_FORMAT",
    "DataParallel",
    "SingleProcess",
    "World",
    "fp8_all_gather_for",
    "read_checkpoint",
    "register_grad_comm",
    "world_for",
]

# Bumped when the checkpoint layout changes; older checkpoints are refused, not misread.
# 2: every checkpoint carries its tensors' checksums.
CHECKPOINT_FORMAT = 2


class World(Protocol):
    """What the training loop needs to know about where it runs."""

    # Whether this process writes files, shows progress and runs the monitor.
    is_main: bool
    # Whether step 1 counts the bytes autograd saves for backward.
    measures_saved_bytes: bool

    def wrap(self, model: nn.Module, precision: str) -> tuple[nn.Module, bool]:
        """The converted ``model`` as the steps run it (built before the optimiser:
        FSDP2 replaces the Parameters), and whether its weights are all-gathered in FP8."""
        ...

    def loss_scaler(self, precision: str) -> fp8train.LossScaler | None:
        """Dynamic loss scaling for the FP8 recipes (E5M2 gradients underflow without
        it); None for fp32 and bf16, whose exponent range matches fp32's."""
        ...

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of the global batch."""
        ...

    def grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm``; return their norm over the whole model."""
        ...

    def mean(self, loss: torch.Tensor) -> float:
        """The global batch's loss from this process's loss."""
        ...

    def save(
        self,
        path: Path,
        run_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
    ) -> None:
        """Checkpoint ``run_state`` with the model, optimiser, recipe and scaler state."""
        ...

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
        same_run: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any] | None:
        """Restore the checkpoint at ``path`` into model, optimiser and scaler and return
        its run state, or None when there is no checkpoint yet. ``same_run(run_state)``
        raises ``LabError`` when the checkpoint belongs to another run."""
        ...


def world_for(config: LabConfig) -> World:
    """The world ``config.dist`` asks for: one process, or the current process group."""
    return SingleProcess() if config.dist is None else DataParallel(config)


def _check_format(path: Path, state: dict[str, Any]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise LabError(
            f"checkpoint {path} has format {state.get('format')}, this fp8train reads "
            f"{CHECKPOINT_FORMAT}; start a new run"
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state in a single-process checkpoint file, its format and every tensor's
    checksum verified; ``LabError`` names the file and what is wrong with it.

    Loaded with ``weights_only=True``: tensors and plain values, never code."""
    try:
        if path.stat().st_size == 0:
            raise LabError(
                f"cannot read checkpoint {path}: the file is empty (0 bytes); "
                "remove it to restart the run"
            )
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except LabError:
        raise
    except Exception as e:
        why = str(e).strip() or type(e).__name__
        raise LabError(f"cannot read checkpoint {path}: {why}") from e
    if not isinstance(state, dict):
        raise LabError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}")
    _check_format(path, state)
    checksums = state.pop("checksums", None)
    try:
        if not isinstance(checksums, dict):
            raise CheckpointError("it holds no checksums")
        verify_state_checksums(state, checksums)
    except CheckpointError as e:
        raise LabError(f"checkpoint {path} is corrupted: {e}; remove it to restart") from e
    return state


class SingleProcess:
    """One process trains the whole batch; its checkpoint is one file."""

    is_main = True
    measures_saved_bytes = True

    def wrap(self, model: nn.Module, precision: str) -> tuple[nn.Module, bool]:
        return model, False

    def loss_scaler(self, precision: str) -> fp8train.LossScaler | None:
        return fp8train.LossScaler(mode="dynamic") if runs_fp8(precision) else None

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, loss: torch.Tensor) -> float:
        return loss.item()

    def save(
        self,
        path: Path,
        run_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
    ) -> None:
        has_fp8 = any(True for _ in fp8train.nn.fp8_layers(model))
        state = {
            **run_state,
            "model": model.state_dict(),
            # Amax histories and counters of the FP8 layers, outside state_dict().
            "recipe_state": fp8train.recipe_state_dict(model) if has_fp8 else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # Checksums of every tensor, in the same file: one atomic replace writes both.
        state["checksums"] = state_checksums(state)
        tmp = unique_tmp_path(path)  # another writer's temporary is never ours
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
        same_run: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any] | None:
        if not path.exists():
            return None
        state = read_checkpoint(path)
        same_run(state)  # before the state dicts, whose errors would say less
        model.load_state_dict(state["model"])
        if state["recipe_state"] is not None:
            fp8train.load_recipe_state_dict(model, state["recipe_state"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        return state


class DataParallel:
    """Every rank of the current process group trains its rows of each global batch
    (``config.dist``: "ddp" or "fsdp2"); checkpoints are folders of
    ``torch.distributed.checkpoint`` shards, one ``step-N`` per checkpoint, with a
    ``latest`` file naming the newest complete one."""

    measures_saved_bytes = False

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.is_main = fd.is_main()

    def wrap(self, model: nn.Module, precision: str) -> tuple[nn.Module, bool]:
        fp8_ag = fp8_all_gather_for(self.config, precision)
        try:
            wrapped = fd.setup(model, self.config.dist or "", fp8_all_gather=fp8_ag)
        except ValueError as e:  # the library's API errors say what to fix
            raise LabError(f"fp8train.distributed.setup refused the {precision} model: {e}") from e
        register_grad_comm(wrapped, self.config.grad_comm)
        return wrapped, fp8_ag

    def loss_scaler(self, precision: str) -> fp8train.LossScaler | None:
        return fd.DistributedLossScaler(mode="dynamic") if runs_fp8(precision) else None

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return fd.batch_shard(batch)

    def grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(norm, DTensor):  # FSDP2: the norm over every rank's shards
            norm = norm.full_tensor()
        return norm

    def mean(self, loss: torch.Tensor) -> float:
        return fd.mean_over_ranks(loss)  # the mean of the ranks' mean losses

    def save(
        self,
        path: Path,
        run_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
    ) -> None:
        """Every rank writes its shards to ``path/step-N``; then the main rank points
        ``path/latest`` at it (``os.replace``) and removes the older ones. A crash
        mid-write leaves ``latest`` naming the previous complete one."""
        name = f"step-{run_state['step']:06d}"
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(path / name, ignore_errors=True)  # left by a crash at this step
        torch.distributed.barrier()  # nobody writes into the folder before it is clean
        # Model, optimiser, recipe state and scaler: the library's DCP checkpoint.
        fd.save_checkpoint(path / name, model, optimizer, loss_scaler=scaler, extra=run_state)
        if self.is_main:
            atomic_write_bytes(path / "latest", f"{name}\n".encode())
            for old in path.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old)
        torch.distributed.barrier()  # nobody reads latest before it is written

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: fp8train.LossScaler | None,
        same_run: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any] | None:
        """Restore on every rank (resharded if the number of ranks changed)."""
        from torch.distributed.checkpoint.api import CheckpointException

        pointer = path / "latest"
        if not pointer.exists():
            return None
        latest = path / pointer.read_text().strip()
        try:
            # A rank's grad_output amaxes scale with 1 / its rows (the loss is a mean);
            # rescale_grad_histories corrects the delayed-scaling histories for a resume
            # on another number of ranks (nothing changes on the same number).
            state = fd.load_checkpoint(
                latest, model, optimizer, loss_scaler=scaler, rescale_grad_histories=True
            )
        except (CheckpointException, ValueError) as e:  # not a lost peer: that propagates
            raise LabError(f"cannot read checkpoint {latest}: {e}") from e
        _check_format(latest, state)
        same_run(state)
        return state


def register_grad_comm(model: nn.Module, grad_comm: str) -> None:
    """Give a DDP ``model`` the communication hook ``grad_comm`` names (``LabConfig``):
    nothing for "fp32" (DDP's own all-reduce), torch's ``bf16_compress_hook`` for "bf16"
    (as ``fd.bf16_allreduce_hook``),
    fp8train's ``fp8_compress_hook`` (E4M3, 128-element blocks) for "fp8". The config
    has refused anything but "fp32" outside DDP."""
    if grad_comm == "fp32":
        return
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise LabError(f"--grad-comm {grad_comm} needs --dist ddp, got a {type(model).__name__}")
    if grad_comm == "bf16":
        # torch's bf16_compress_hook, renamed: DDP refuses that name without NCCL.
        # The state is the process group; None: the default (world) group.
        model.register_comm_hook(None, fd.bf16_allreduce_hook)
    elif grad_comm == "fp8":
        model.register_comm_hook(fd.Fp8CommState(), fd.fp8_compress_hook)
    else:
        raise LabError(f"unknown --grad-comm {grad_comm!r}")


def fp8_all_gather_for(config: LabConfig, precision: str) -> bool:
    """Whether a ``config.dist`` run of ``precision`` all-gathers its weights in FP8.

    Only FSDP2 gathers weights, and only the FP8 recipes have FP8 weights. ``None``
    (the default) turns it on for every recipe whose weight scales allow it (the
    library decides: see ``fp8train.distributed``); it changes the bytes on the wire,
    not the numbers. ``True`` makes an unsupported recipe a ``LabError``.
    """
    recipe = recipe_of(precision)
    if config.dist != "fsdp2" or config.fp8_all_gather is False or recipe is None:
        return False
    reason = fd.fp8_all_gather_unsupported_reason(fp8train.Recipe.from_name(recipe))
    if reason is not None and config.fp8_all_gather:
        raise LabError(
            f"--fp8-all-gather: recipe {precision} cannot all-gather FP8 weights: {reason}; "
            "drop --fp8-all-gather (the default uses it wherever the recipe allows)"
        )
    return reason is None
