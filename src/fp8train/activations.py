"""FP8 storage of the activations autograd saves for backward (COAT-style).

An FP8 linear already saves its input as the FP8 payload. The other large tensors a
transformer block saves are not inputs of a Linear: the residual stream LayerNorm keeps
(fp32 under autocast), the GELU input, and the query, key, value and output attention
keeps. :class:`Fp8SavedActivations` is a ``saved_tensors_hooks`` context: every such
tensor saved inside it is stored as an FP8 payload with the recipe's activation scales
and dequantised when backward asks for it::

    with fp8train.Fp8SavedActivations("tensorwise"):
        logits = model(x)            # forward: saved activations go to FP8
    loss_fn(logits, y).backward()    # backward: dequantised on use

What is stored, and how:

* **Which tensors.** Floating tensors in fp32/bf16/fp16 with at least ``min_numel``
  elements. Leaves that require grad (parameters, the caller's inputs) and casts or views
  of them (autocast's bf16 weight copies) are left alone: they are held anyway, and
  quantising a weight is the recipe's business, not storage's. Tensors that are already
  FP8 payloads are left alone.
* **Scales.** The recipe's ``input`` spec with current scaling: one scale per tensor
  (tensorwise, delayed, int8), per row of the last dimension (rowwise), per 1x128 tile
  (blockwise), per 1x32 block with E8M0 scales (mxfp8). Delayed scaling keeps no history
  for stored activations: each saved tensor is read once, so the current amax is free.
* **Non-finite tensors** (NaN/inf) are stored as they are: an FP8 scale must never come
  from a NaN, and the NaN has to reach the gradients, where the loss scaler skips the
  step. ``kept_nonfinite`` counts them.
* **A tensor saved twice** (by two ops) is stored once.

What it changes: backward sees each stored activation rounded to FP8 (the forward is
unchanged). Attention's backward recomputes its probabilities from the rounded query and
key while its saved output and log-sum-exp come from the exact ones, so the
probabilities it rebuilds no longer sum exactly to one; the lab measures what this costs
in loss (``<recipe>+fp8act`` precisions).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from fp8train._kernels import KernelChoice, Kernels
from fp8train.recipes import Recipe, RecipeName
from fp8train.scaling import ScaleSpec

__all__ = ["Fp8SavedActivations"]

_STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Stored:
    """One saved activation in FP8: the 2-D payload, its scales and how to rebuild it."""

    payload: torch.Tensor  # (M, K) in the spec's format
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


# Backward nodes of ops that view or cast a tensor without computing on it.
_VIEW_OR_CAST = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "SliceBackward0",
        "SelectBackward0",
    }
)


def _held_anyway(t: torch.Tensor) -> bool:
    """A leaf that requires grad (a Parameter, or an input the caller holds), or a cast,
    view or transpose of one (autocast's bf16 weight): storing an FP8 copy of it would
    add bytes, not save them, and quantising weights is the recipe's business."""
    fn = t.grad_fn
    if fn is None:
        return t.requires_grad
    for _ in range(4):  # e.g. TBackward0 -> ToCopyBackward0 -> AccumulateGrad
        if type(fn).__name__ not in _VIEW_OR_CAST:
            return False
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
    return False


class Fp8SavedActivations:
    """Context manager: tensors saved for backward inside it are stored in FP8.

    ``recipe``: a :class:`~fp8train.Recipe` or its name; its ``input`` spec sets the format
    and scale granularity. ``min_numel``: smaller tensors are stored as they are (norm
    statistics, scales). ``kernels``: ``"auto"`` (the default), ``"eager"`` or
    ``"compiled"``, as for ``convert``; all give the same bits. ``observer``: called with
    every tensor actually kept for backward (payloads and scales of stored activations,
    the tensor itself otherwise), so a memory meter sees what is held.

    Reusable: each ``with`` block installs the hooks afresh. Counters (``stored``,
    ``stored_bytes``, ``original_bytes``, ``kept_nonfinite``) accumulate across blocks.
    """

    def __init__(
        self,
        recipe: Recipe | RecipeName | str,
        *,
        min_numel: int = 4096,
        kernels: KernelChoice = "auto",
        observer: Callable[[torch.Tensor], object] | None = None,
    ) -> None:
        self.recipe = Recipe.from_name(recipe)
        if min_numel < 1:
            raise ValueError(f"min_numel must be >= 1, got {min_numel}")
        self.spec: ScaleSpec = self.recipe.input
        self.min_numel = min_numel
        self.kernels = Kernels(kernels)
        self.observer = observer
        self.stored = 0
        self.stored_bytes = 0
        self.original_bytes = 0
        self.kept_nonfinite = 0
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], _Stored]] = {}
        self._hooks: Any = None

    def __repr__(self) -> str:
        return (
            f"Fp8SavedActivations({self.recipe.name!r}: {self.spec.describe()}, "
            f"min_numel={self.min_numel})"
        )

    def __enter__(self) -> Fp8SavedActivations:
        if self._hooks is not None:
            raise RuntimeError("Fp8SavedActivations is already active; nest a second object")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        hooks, self._hooks = self._hooks, None
        self._seen.clear()  # only a forward's own duplicates share a stored copy
        hooks.__exit__(exc_type, exc, tb)

    def _observe(self, *tensors: torch.Tensor) -> None:
        if self.observer is not None:
            for t in tensors:
                self.observer(t)

    def _wanted(self, t: torch.Tensor) -> bool:
        return (
            t.dtype in _STORED_DTYPES
            and t.numel() >= self.min_numel
            and t.dim() >= 1
            and t.layout is torch.strided
            and not _held_anyway(t)
        )

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Stored:
        if not self._wanted(t):
            self._observe(t)
            return t
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t:
            return seen[1]
        x2d = t.detach().reshape(-1, t.shape[-1])  # (M, K): scales run along the last dim
        amax, scale, payload, _ = self.kernels.quantize_current(x2d, self.spec, None)
        assert payload is not None  # no operand asked for: the payload is always made
        if not bool(torch.isfinite(amax).all()):
            self.kept_nonfinite += 1
            self._observe(t)
            return t
        stored = _Stored(payload, scale, t.shape, t.dtype)
        self._seen[id(t)] = (weakref.ref(t), stored)
        self.stored += 1
        self.stored_bytes += payload.numel() * payload.element_size()
        self.original_bytes += t.numel() * t.element_size()
        self._observe(payload, scale)
        return stored

    def unpack(self, p: torch.Tensor | _Stored) -> torch.Tensor:
        if isinstance(p, torch.Tensor):
            return p
        x2d = self.kernels.payload_to_operand(p.payload, p.scale, self.spec, p.dtype)
        return x2d.reshape(p.shape)
