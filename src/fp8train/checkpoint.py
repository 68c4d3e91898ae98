"""Checksums and atomic writes shared by the lab's and the distributed checkpoints.

A checkpoint is read back much later, often on another machine; a flipped bit in a
weight still unpickles and trains on, silently. Each checkpoint therefore carries the
SHA-256 of every tensor's bytes (dtype and shape included), and loading compares them
before anything is restored: a mismatch is a :class:`CheckpointError` naming the tensor.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "NON_TENSOR_VALUES",
    "CheckpointError",
    "atomic_write_bytes",
    "state_checksums",
    "tensor_sha256",
    "unique_tmp_path",
    "verify_state_checksums",
]

# The checksum key of everything in a state that is not a tensor (step, config, history
# numbers, optimiser hyper-parameters): one digest of their repr, in state order.
NON_TENSOR_VALUES = "<values other than tensors>"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupted, truncated or unsafe."""


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and element bytes (any dtype, FP8 included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)  # (numel,); 0-dim becomes (1,)
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, obj


def state_checksums(state: Mapping[str, Any]) -> dict[str, str]:
    """Checksums of a nested state (dicts, lists, tuples): one per tensor, keyed by its
    dotted path (``model.head.weight``), plus :data:`NON_TENSOR_VALUES` for the rest."""
    sums: dict[str, str] = {}
    rest = hashlib.sha256()
    for name, value in _leaves(state, ""):
        if isinstance(value, torch.Tensor):
            sums[name] = tensor_sha256(value)
        else:
            rest.update(f"{name}={value!r};".encode())
    sums[NON_TENSOR_VALUES] = rest.hexdigest()
    return sums


def verify_state_checksums(state: Mapping[str, Any], expected: Mapping[str, str]) -> None:
    """Raise :class:`CheckpointError` naming the first tensor (or the non-tensor values)
    whose checksum differs from ``expected``, or that is missing or extra."""
    actual = state_checksums(state)
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            raise CheckpointError(f"tensor {name} is missing (its checksum is recorded)")
        if name not in expected:
            raise CheckpointError(f"tensor {name} has no recorded checksum")
        if actual[name] != expected[name]:
            raise CheckpointError(
                f"tensor {name} does not match its checksum (sha256 {actual[name][:12]}, "
                f"recorded {expected[name][:12]}): the file is corrupted"
            )


def unique_tmp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses: pid and a random
    suffix, so two processes writing one file atomically never share a temporary."""
    # The suffix stays last: writers such as matplotlib pick the format from it.
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.{tag}.tmp{path.suffix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one."""
    tmp = unique_tmp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
