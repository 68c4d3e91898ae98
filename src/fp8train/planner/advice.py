"""Numerics from a short CPU calibration run, and the per-layer recommendation.

:func:`calibrate` trains a copy of the model under the recipe with
:class:`fp8train.Monitor` observing every step and keeps, per layer and operand role,
the worst underflow and clipping shares and the lowest SQNR it saw. :func:`recommend`
then decides per layer, in this order:

1. ``bf16`` when ``convert`` would not convert it (shape, filter) or the GPU's GEMM
   cannot take the recipe's scaling;
2. ``bf16`` when the predicted speed-up is below 1 ("too small: predicted 0.81x");
3. when an operand's underflow share exceeds the monitor's ``underflow`` threshold
   (5%) or its clipped share its ``overflow`` threshold (0.1%): ``finer``, naming the
   first finer-grained recipe that this GPU takes and that is still predicted faster
   than bf16 ("grad_output underflow 46%; rowwise predicted 1.41x"), else ``bf16``;
4. ``fp8`` otherwise.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fp8train.monitor import HealthWarning, Monitor, Thresholds
from fp8train.planner.gpus import Gpu
from fp8train.planner.model import plan_linear
from fp8train.recipes import Recipe
from fp8train.scaling import Granularity

if TYPE_CHECKING:
    from fp8train.planner.walk import LayerRow

__all__ = ["MEDIUM_SQNR_DB", "Numerics", "OperandNumerics", "calibrate", "recommend"]

# Below this SQNR an operand counts as medium risk: E4M3's rounding alone gives ~31 dB
# and E5M2's ~25 dB on well-scaled data, so 20 dB means values were lost to the range.
MEDIUM_SQNR_DB = 20.0
# A share of flushed values above this (but under the warning threshold) is medium risk.
MEDIUM_UNDERFLOW = 0.01


@dataclass
class OperandNumerics:
    """Worst values over the calibration steps for one operand role."""

    underflow: float = 0.0
    clipped: float = 0.0
    sqnr_db: float = math.inf


@dataclass
class Numerics:
    """One layer's operands (``input``, ``weight``, ``grad_output`` and their ``.t``
    re-quantisations) after calibration."""

    operands: dict[str, OperandNumerics] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def worst(self, what: str) -> tuple[str, float]:
        """``(role, value)`` with the highest ``underflow``/``clipped`` or lowest
        ``sqnr_db``; ``("", 0.0)`` or ``("", inf)`` without operands."""
        if not self.operands:
            return ("", math.inf if what == "sqnr_db" else 0.0)
        pick = min if what == "sqnr_db" else max
        role = pick(self.operands, key=lambda r: getattr(self.operands[r], what))
        return role, getattr(self.operands[role], what)

    @property
    def problem(self) -> str:
        """What breaks the monitor's thresholds ("grad_output underflow 46%"), or ""."""
        role, under = self.worst("underflow")
        if under > self.thresholds.underflow:
            return f"{role} underflow {under:.0%}"
        role, clip = self.worst("clipped")
        if clip > self.thresholds.overflow:
            return f"{role} clipped {clip:.2%}"
        return ""

    @property
    def risk(self) -> str:
        """``"high"`` (a threshold broken), ``"medium"`` (over 1% flushed, anything
        clipped, or SQNR under 20 dB) or ``"low"``."""
        if self.problem:
            return "high"
        if (
            self.worst("underflow")[1] > MEDIUM_UNDERFLOW
            or self.worst("clipped")[1] > 0
            or self.worst("sqnr_db")[1] < MEDIUM_SQNR_DB
        ):
            return "medium"
        return "low"

    def summary(self) -> str:
        role_u, u = self.worst("underflow")
        role_s, s = self.worst("sqnr_db")
        return f"max underflow {u:.1%} ({role_u}), min SQNR {s:.1f} dB ({role_s})"


class _Worst:
    """A monitor sink keeping each (layer, role)'s worst statistics."""

    def __init__(self) -> None:
        self.by_layer: dict[str, Numerics] = {}

    def write(self, record: dict[str, Any]) -> None:
        if record.get("kind") != "layer" or record.get("role") == "output":
            return
        ops = self.by_layer.setdefault(record["layer"], Numerics()).operands
        o = ops.setdefault(record["role"], OperandNumerics())
        if record.get("underflow") is not None:
            o.underflow = max(o.underflow, float(record["underflow"]))
        if record.get("clipped") is not None:
            o.clipped = max(o.clipped, float(record["clipped"]))
        if record.get("sqnr_db") is not None:
            o.sqnr_db = min(o.sqnr_db, float(record["sqnr_db"]))

    def close(self) -> None:
        pass


def calibrate(
    model: nn.Module,
    example_input: Any,
    recipe: Recipe,
    names: list[str],
    *,
    steps: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    call: Callable[[nn.Module, Any], Any],
    lr: float,
) -> tuple[dict[str, Numerics], list[dict[str, Any]]]:
    """Train a copy of ``model`` for ``steps`` steps with the layers ``names`` under
    ``recipe`` (eager kernels: no compilation for a few steps), the monitor observing
    every step. Returns the worst numerics per layer and the monitor's warnings (not
    re-emitted)."""
    from fp8train.nn import convert

    work = copy.deepcopy(model)
    wanted = set(names)
    convert(work, recipe, filter=lambda _m, n: n in wanted, kernels="eager")
    work.train()
    sink = _Worst()
    opt = torch.optim.AdamW(work.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        with Monitor(work, every=1, sinks=[sink]) as monitor:
            for _ in range(steps):
                loss = loss_fn(call(work, example_input), example_input)
                loss.backward()  # type: ignore[no-untyped-call]
                monitor.step(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            found = list(monitor.warnings)
    return sink.by_layer, found


_FINER = {"tensor": ("row", "block", "mx"), "row": ("block", "mx"), "block": ("mx",), "mx": ()}
_RECIPE_OF = {"row": "rowwise", "block": "blockwise", "mx": "mxfp8"}
_GRAN = {
    Granularity.TENSOR: "tensor",
    Granularity.ROW: "row",
    Granularity.BLOCK: "block",
    Granularity.MX: "mx",
}


def _finer(row: LayerRow, gpu: Gpu, recipe: Recipe) -> tuple[str, float] | None:
    """The first finer-grained FP8 recipe this GPU takes that is predicted faster than
    bf16 for this layer, with its speed-up."""
    if recipe.input.fmt.name.lower().startswith("int8"):
        return None  # INT8 recipes are for comparison; no finer FP8 advice
    for g in _FINER[_GRAN[recipe.input.granularity]]:
        name = _RECIPE_OF[g]
        candidate = Recipe.from_name(name)
        if gpu.scaling_factor(g) is None or candidate.unsupported_reason(row.k, row.n):
            continue
        p = plan_linear(max(row.m, 1), row.k, row.n, gpu=gpu, recipe=candidate)
        if p.speedup >= 1.0:
            return name, p.speedup
    return None


def recommend(row: LayerRow, gpu: Gpu, recipe: Recipe) -> None:
    """Set ``row.recommendation``, ``row.reason`` and ``row.suggested_recipe``."""
    if not row.convertible:
        row.recommendation, row.reason = "bf16", f"not converted: {row.why_not}"
        return
    if not row.plan.supported:
        row.recommendation, row.reason = "bf16", row.plan.reason
        return
    speed = row.plan.speedup
    if speed < 1.0:
        row.recommendation, row.reason = "bf16", f"too small: predicted {speed:.2f}x"
        return
    problem = row.numerics.problem if row.numerics is not None else ""
    if problem:
        finer = _finer(row, gpu, recipe)
        if finer is None:
            row.recommendation = "bf16"
            row.reason = f"{problem}; no finer recipe on {gpu.label} beats bf16 here"
        else:
            row.recommendation, row.suggested_recipe = "finer", finer[0]
            row.reason = f"{problem}; {finer[0]} predicted {finer[1]:.2f}x"
        return
    row.recommendation = "fp8"
    row.reason = f"predicted {speed:.2f}x" + (
        f"; {row.numerics.summary()}" if row.numerics is not None else "; numerics not measured"
    )
