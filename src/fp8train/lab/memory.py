"""The memory ledger of a training step: where the bytes go, and the measured peak.

``LiveTensorBytes`` measures the peak on any device, the CPU included: a
``TorchDispatchMode`` that sees every tensor an operator takes or returns while it is
active and keeps the sum of the bytes of the storages still alive (each storage once,
counted at its full ``nbytes()``, forgotten when the storage is freed). Tensors that
exist before the step (parameters, optimizer states, the batch) are registered with
``track()``. The peak is the largest such sum at any operator boundary: the quantity
``torch.cuda.max_memory_allocated`` reports on a GPU, without the allocator's
rounding, caching and fragmentation, and without memory that is not a tensor
(Python objects, the interpreter, libraries' workspaces).

fp8train's compiled quantisation kernels are inductor code called directly: their
outputs are allocated without passing the dispatcher, so the mode first sees one when an
operator takes it as an input, or when autograd saves it: ``pack`` / ``unpack`` are
saved-tensor hooks (and ``pack`` an ``Fp8SavedActivations`` observer) that count what
is kept for backward when it is kept. A compiled kernel's intermediates are never
tensors and are not counted; neither is an output that nothing uses or saves.

``ledger()`` puts the step's parts side by side: parameters, gradients, optimizer
states (each the bytes of its tensors after the step), saved activations (measured by
``fp8train.lab.train.SavedTensorBytes`` on the first step) and the peak.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LEDGER_PARTS", "LiveTensorBytes", "ledger", "tensor_bytes"]

# The ledger's rows, in the order the report stacks them.
LEDGER_PARTS = ("parameters", "gradients", "optimizer_states", "saved_activations")


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        return None  # a wrapper subclass: its inner tensors come through the dispatcher
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # no storage (meta, sparse)
        return None


class LiveTensorBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Bytes of live tensor storages while active, and their peak (module docstring).

    Use as ``with LiveTensorBytes() as live: live.track(tensors); step()``; then
    ``live.peak`` (bytes) and ``live.current``. Storages are keyed by identity (torch
    keeps one Python object per storage while it lives), so a view or an in-place
    result adds nothing, and a weak reference's callback subtracts a storage's bytes
    when it is freed.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def track(self, tensors: Iterable[Any]) -> None:
        """Count tensors that were allocated before the mode started (non-tensors and
        ``None`` are skipped)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Saved-tensor hook: count ``t`` (kept for backward) and return it unchanged."""
        self._add(t)
        self.peak = max(self.peak, self.current)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _add(self, t: torch.Tensor) -> None:
        s = _storage(t)
        if s is None or s.device.type == "meta":
            return
        key = id(s)
        if key in self._live:
            return
        nbytes = s.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self._refs[key] = weakref.ref(s, functools.partial(self._free, key))

    def _free(self, key: int, _ref: object = None) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Inputs too: a compiled kernel's output reaches the mode first as an input.
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._add(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages among ``tensors`` (non-tensors skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = _storage(t)
            if s is not None:
                seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (moments, scales, step counters)."""
    return [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]


def ledger(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    saved_activations: int | None,
    peak: int,
) -> dict[str, int | None]:
    """The step's parts in bytes, measured after backward and the optimizer step, before
    the gradients are dropped: parameters (their storages), gradients, optimizer states
    and the saved activations of the first step, with the step's measured peak."""
    return {
        "parameters": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params),
        "optimizer_states": tensor_bytes(optimizer_tensors(optimizer)),
        "saved_activations": saved_activations,
        "peak": peak,
    }
