"""Checkpoints of a data-parallel run, through ``torch.distributed.checkpoint``.

One checkpoint holds the model (FSDP2 shards, DDP or plain), the optimizer, the recipe
state, the loss scaler and small user values, and loads on any number of ranks and in
any mode.

Loading verifies before it restores, and never runs code from the folder:

* Checksums: after the save, rank 0 writes ``fp8train-manifest.json``, the SHA-256 of
  ``.metadata`` and of every stored item (each rank's tensor shards and byte values,
  located by the metadata's file, offset and length). Why a manifest of the written
  items rather than checksums of the state dict gathered before the save: it needs no
  gather of FSDP2 shards onto one rank, covers the bytes as they lie on disk (what a
  later bit flip changes), and still names the tensor, since DCP records which tensor
  (and which chunk of it) each byte range holds. Rank 0 verifies them on load (one
  reading of the folder, not one per rank) and tells every rank the outcome.
* No code: ``torch.distributed.checkpoint`` reads ``.metadata`` with plain
  ``pickle.load`` and non-tensor values with ``torch.load(weights_only=False)``; a
  crafted folder would run code. Here ``.metadata`` goes through an unpickler that
  allows only the metadata classes it holds (and torch dtypes, ``torch.Size``, paths),
  and byte values are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from fp8train.checkpoint import CheckpointError, atomic_write_bytes
from fp8train.distributed.fp8_all_gather import Fp8AllGatherWeight
from fp8train.distributed.process_group import world_size
from fp8train.distributed.wrap import unwrap
from fp8train.loss_scaler import LossScaler
from fp8train.nn import load_recipe_state_dict, recipe_state_dict

__all__ = ["MANIFEST_NAME", "load_checkpoint", "read_metadata", "save_checkpoint"]

# Written by rank 0 beside the shards once every rank has saved (see the module doc).
MANIFEST_NAME = "fp8train-manifest.json"
_METADATA_NAME = ".metadata"

# Every global a torch.distributed.checkpoint ``.metadata`` pickle refers to; anything
# else (os.system, builtins.eval, a class with a crafted __reduce__) is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise CheckpointError(
                f"{self.where} refers to {module}.{name}, which checkpoint metadata never "
                "holds; refusing to unpickle it (it could run code)"
            )
        return super().find_class(module, name)


def read_metadata(path: str | os.PathLike[str]) -> Metadata:
    """The ``.metadata`` of a checkpoint folder, unpickled with an allow-list (the
    metadata classes, torch dtypes, ``torch.Size``, paths): never runs code.

    Raises :class:`fp8train.checkpoint.CheckpointError` naming the file otherwise."""
    where = Path(path) / _METADATA_NAME
    try:
        data = where.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {where}: {e.strerror or e}") from e
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), where).load()
    except CheckpointError:
        raise
    except Exception as e:
        why = str(e).strip() or type(e).__name__
        raise CheckpointError(f"cannot read {where}: {why}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` through :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path)
        # As DCP's own reader does: older metadata has no storage_meta.
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with byte values loaded ``weights_only=True``: plain
    values and tensors (the optimizer's hyper-parameters, our recipe-state blob)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # DCP pickles a BytesIO value (our recipe-state blob) as the object itself; a
        # BytesIO unpickles to a buffer of bytes, nothing more, so it may pass too.
        with torch.serialization.safe_globals([io.BytesIO]):
            loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _item_name(index: MetadataIndex) -> str:
    """``model.head.weight``, or with its chunk's offset where a tensor is sharded."""
    if index.offset is not None and any(index.offset):
        return f"{index.fqn} (chunk at {list(index.offset)})"
    return index.fqn


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_manifest(path: Path) -> None:
    meta_bytes = (path / _METADATA_NAME).read_bytes()
    metadata = read_metadata(path)
    items = []
    for index, info in metadata.storage_data.items():
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        items.append(
            {
                "tensor": _item_name(index),
                "file": info.relative_path,
                "offset": info.offset,
                "length": info.length,
                "sha256": _sha256(data),
            }
        )
    manifest = {"metadata_sha256": _sha256(meta_bytes), "items": items}
    atomic_write_bytes(path / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def _verify(path: Path) -> None:
    """Compare the folder with its manifest; raise ``CheckpointError`` naming the file
    (and the tensor) that differs."""
    where = path / MANIFEST_NAME
    if not where.exists():
        raise CheckpointError(
            f"{where} is missing: the folder was not written by "
            "fp8train.distributed.save_checkpoint, or its save did not finish"
        )
    try:
        manifest = json.loads(where.read_text())
        expected_meta, items = manifest["metadata_sha256"], manifest["items"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {where}: {e}") from e
    meta = path / _METADATA_NAME
    try:
        meta_bytes = meta.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {meta}: {e.strerror or e}") from e
    if _sha256(meta_bytes) != expected_meta:
        raise CheckpointError(f"{meta} does not match its checksum: the file is corrupted")
    read_metadata(path)  # refuses anything but metadata classes, whatever the manifest says
    for item in items:
        file = path / item["file"]
        try:
            with open(file, "rb") as f:
                f.seek(item["offset"])
                data = f.read(item["length"])
        except OSError as e:
            raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from e
        if len(data) != item["length"] or _sha256(data) != item["sha256"]:
            raise CheckpointError(
                f"{file}: tensor {item['tensor']} does not match its checksum: "
                "the file is corrupted"
            )


def _verify_on_rank0(path: Path) -> None:
    """Rank 0 (or the only process) verifies; every rank raises the same error."""
    problem: str | None = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            _verify(path)
        except CheckpointError as e:
            problem = str(e)
    if dist.is_initialized():
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise CheckpointError(problem)


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
    # DCP's save ends with rank 0 writing .metadata, so rank 0 sees every rank's items.
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_manifest(Path(path))
    if dist.is_initialized():
        dist.barrier()  # nobody loads the folder before its manifest is there


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

    Raises ``ValueError`` if the recipe state does not match the model's FP8 layers,
    and its subclass :class:`fp8train.checkpoint.CheckpointError`, naming the file and
    the tensor, if the folder does not match its checksums or its metadata refers to
    anything but metadata classes (see the module doc); nothing is restored then.
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
    _verify_on_rank0(Path(path))
    load(
        state,
        checkpoint_id=os.fspath(path),
        storage_reader=_SafeReader(os.fspath(path)),
        planner=_SafePlanner(),
    )
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
