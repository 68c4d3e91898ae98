"""The GEMM check: each FP8 layer's three GEMMs against the same GEMMs in high precision.

On the steps the monitor observes, the operand observer (:mod:`~fp8train.monitor.recorder`)
hands every quantised operand of a training step to :class:`GemmCheck`, which pairs them
up per GEMM (``fp8train/autograd.py`` writes the three out):

* ``output``      ``y  = x . W^T``  -- ``input``,        ``weight``
* ``grad_input``  ``dx = dy . W``   -- ``grad_output``,  ``weight.t`` (else ``weight``)
* ``grad_weight`` ``dW = dy^T . x`` -- ``grad_output.t`` (else ``grad_output``),
  ``input.t`` (else ``input``)

and, at the end of the step, computes each GEMM twice in fp32: from the dequantised
operands (what the FP8 GEMM multiplies: FP8 values times power-of-two scales are exact in
fp32) and from the high-precision tensors they were quantised from. Its error is

    rel_err = max(median over rows, median over columns) of ||C_fp8 - C|| / ||C||

on a strided sample of at most :data:`SAMPLE_ROWS` output rows (every column). Why
medians of row and column errors and not one Frobenius ratio: the usual FP8 failure is
an outlier whose scale flushes the rest of its tensor to zero; the outlier's own row or
column of the product stays right and dominates a global norm, while every other row
(an outlier in ``x`` or ``dy``) or column (an outlier in ``W``) is lost. Medians read the
typical row and column, so they show exactly that, and ignore a few tiny rows.

Not measured: the rounding of the GEMM's output to its dtype, and GEMMs that a recipe
runs in high precision (``fp8_fprop`` and friends off) or that met NaN/inf (those are
reported as non-finite instead). A layer called several times in a step pairs each
backward with the latest unpaired forward of the same token count and keeps the worst
error per GEMM. Evaluation passes (grad mode off) are left out by the recorder.
Memory on an observed step: each layer's weight (high precision and dequantised) is
copied, since FSDP2 frees an unsharded weight after its forward; the step's inputs and
output gradients are held until its end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from fp8train.nn import Fp8Linear
from fp8train.tensor import ScaledTensor

__all__ = ["GEMMS", "SAMPLE_ROWS", "GemmCheck", "gemm_rel_err"]

# The three GEMMs of a layer, in execution order within its forward and backward.
GEMMS = ("output", "grad_input", "grad_weight")

# Output rows each GEMM is checked on: enough that the medians are stable, few enough that
# the two extra fp32 GEMMs cost a small fraction of the real one on a large layer.
SAMPLE_ROWS = 32


class _Operand(NamedTuple):
    t: torch.Tensor  # the high-precision tensor as quantised, 2-D
    q: ScaledTensor | None  # None: it held NaN/inf
    deq: torch.Tensor | None = None  # the dequantised operand, where taken at once


def _rows(n: int) -> torch.Tensor:
    """A strided sample of at most SAMPLE_ROWS of ``n`` row indices."""
    stride = max(1, -(-n // SAMPLE_ROWS))
    return torch.arange(0, n, stride)


def _median_rel(err: torch.Tensor, ref: torch.Tensor, dim: int) -> float:
    """Median over the rows (``dim=1``) or columns (``dim=0``) with a nonzero reference
    of ``||err|| / ||ref||``; 0.0 when every reference row is zero."""
    num, den = err.norm(dim=dim), ref.norm(dim=dim)
    keep = den > 0
    if not bool(keep.any()):
        return 0.0
    return float((num[keep] / den[keep]).median())


def _dequantized(q: ScaledTensor) -> torch.Tensor:
    """The operand the FP8 GEMM multiplies, in its own dtype: the emulation's operand
    where the layer made one (FP8 values times power-of-two scales: exact in bf16), else
    the payload dequantised."""
    if q.operand is not None:
        return q.operand.reshape(q.shape)
    return q.dequantize(torch.float32)


def gemm_rel_err(a: _Operand, b: _Operand, transpose_a: bool, transpose_b: bool) -> float:
    """The error of the FP8 GEMM ``op(a) @ op(b)`` against the same GEMM on the tensors
    they were quantised from (module docstring); ``op`` transposes where asked. NaN when
    an operand held NaN/inf (no FP8 GEMM ran) or the products are not finite."""
    if a.q is None or b.q is None:
        return math.nan
    a_q = a.deq if a.deq is not None else _dequantized(a.q)
    b_q = b.deq if b.deq is not None else _dequantized(b.q)
    a_hp, b_hp = a.t, b.t
    if transpose_a:
        a_hp, a_q = a_hp.t(), a_q.t()
    if transpose_b:
        b_hp, b_q = b_hp.t(), b_q.t()
    rows = _rows(a_hp.shape[0]).to(a_hp.device)
    # Only the sampled rows of A are converted; fp32 products of exact operands.
    ref = a_hp[rows].float() @ b_hp.float()  # (R, N): the sampled output rows, every column
    err = a_q[rows].float() @ b_q.float() - ref
    if not bool(torch.isfinite(err).all() and torch.isfinite(ref).all()):
        return math.nan
    return max(_median_rel(err, ref, 1), _median_rel(err, ref, 0))


class GemmCheck:
    """Pairs a step's quantised operands per GEMM and measures each GEMM's error.

    :meth:`observe` is fed by the monitor's operand observer; :meth:`errors` computes the
    step's errors by ``(layer, gemm)`` once (a NaN error: an operand was NaN/inf);
    :meth:`clear` forgets the step.
    """

    def __init__(self, layers: Sequence[tuple[str, Fp8Linear]]) -> None:
        self._layers = dict(layers)
        self._order = {name: i for i, (name, _) in enumerate(layers)}
        self._calls: dict[str, list[list[tuple[str, _Operand]]]] = {}  # layer -> calls
        self._errors: dict[tuple[str, str], float] | None = None

    def observe(self, layer: str, role: str, t: torch.Tensor, q: ScaledTensor | None) -> None:
        """One quantised operand of a training step, in the order the layer made them."""
        calls = self._calls.setdefault(layer, [])
        # A forward starts at "input" (or at "weight" when a NaN/inf weight came alone),
        # a backward at "grad_output"; the rest join the current call.
        current = {r for r, _ in calls[-1]} if calls else set()
        starts = role in ("input", "grad_output") or (
            role == "weight" and (current & {"weight", "grad_output"} or not current)
        )
        if starts or not calls:
            calls.append([])
        if role.startswith("weight"):
            # Copied now: FSDP2 frees an unsharded weight (and an FP8-gathered one) after
            # its forward, long before the step's end, where the errors are computed.
            deq = None if q is None else _dequantized(q).clone()
            calls[-1].append((role, _Operand(t.detach().clone(), q, deq)))
        else:
            calls[-1].append((role, _Operand(t.detach(), q)))
        self._errors = None

    def clear(self) -> None:
        """Forget this step's operands and errors."""
        self._calls = {}
        self._errors = None

    def errors(self) -> dict[tuple[str, str], float]:
        """This step's error per ``(layer, gemm)``, layers in model order (the worst over
        a layer's calls)."""
        if self._errors is None:
            out: dict[tuple[str, str], float] = {}
            for layer in sorted(self._calls, key=lambda n: self._order.get(n, 0)):
                module = self._layers.get(layer)
                for gemm, err in self._layer_errors(self._calls[layer], module):
                    key = (layer, gemm)
                    old = out.get(key)
                    if old is None or math.isnan(err) or (not math.isnan(old) and err > old):
                        out[key] = err
            self._errors = out
        return self._errors

    def records(self, s: int) -> list[dict[str, Any]]:
        """Step ``s``'s layer records, role ``"gemm.<name>"``, field ``rel_err``."""
        return [
            {"step": s, "kind": "layer", "layer": layer, "role": f"gemm.{gemm}", "rel_err": err}
            for (layer, gemm), err in self.errors().items()
        ]

    @staticmethod
    def _layer_errors(
        calls: list[list[tuple[str, _Operand]]], module: Fp8Linear | None
    ) -> list[tuple[str, float]]:
        recipe = None if module is None else module.recipe
        fprop = recipe is None or recipe.fp8_fprop
        dgrad = recipe is None or recipe.fp8_dgrad
        wgrad = recipe is None or recipe.fp8_wgrad
        forwards: list[dict[str, _Operand]] = []  # unpaired forwards, oldest first
        out: list[tuple[str, float]] = []
        for call in calls:
            ops = dict(call)
            if "input" in ops or "weight" in ops:
                x, w = ops.get("input"), ops.get("weight")
                if fprop and x is not None and w is not None:
                    out.append(("output", gemm_rel_err(x, w, False, True)))
                elif fprop and any(op.q is None for op in ops.values()):
                    out.append(("output", math.nan))  # NaN/inf met: no FP8 GEMM ran
                forwards.append(ops)
                continue
            dy = ops.get("grad_output")
            if dy is None:
                continue
            # The latest unpaired forward of as many tokens (backward runs in reverse).
            fwd: dict[str, _Operand] = {}
            for i in range(len(forwards) - 1, -1, -1):
                x = forwards[i].get("input")
                if x is not None and x.t.shape[0] == dy.t.shape[0]:
                    fwd = forwards.pop(i)
                    break
            w = ops.get("weight.t", fwd.get("weight"))
            if dgrad and w is not None:
                out.append(("grad_input", gemm_rel_err(dy, w, False, False)))
            x = ops.get("input.t", fwd.get("input"))
            if wgrad and x is not None:
                dy_t = ops.get("grad_output.t", dy)
                out.append(("grad_weight", gemm_rel_err(dy_t, x, True, False)))
        return out
