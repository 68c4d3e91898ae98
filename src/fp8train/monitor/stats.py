"""Statistics of one quantisation: amax, scale range, underflow, overflow, clipping, SQNR.

:func:`operand_stats` measures one ``ScaledTensor`` against the tensor it came from;
:class:`OperandStats` pools those measurements over a step's calls of one
(layer, role). Nothing here hooks a layer or decides what is worth a warning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fp8train.cast import overflow_threshold
from fp8train.scaling import AMAX_FLOOR, ScaleSpec, expand_scale, scale_from_amax
from fp8train.tensor import ScaledTensor

__all__ = ["FORWARD_ROLES", "OperandStats", "grad_norm", "operand_stats"]

# The roles quantised in the forward pass (the rest belong to backward).
FORWARD_ROLES = ("input", "weight", "input.t", "weight.t")


@dataclass
class OperandStats:
    """Pooled statistics of one (layer, role) over one step's quantisations.

    Counts and sums add across calls, so the fractions and the SQNR are those of all
    the elements quantised in the step together.
    """

    fmt: str = ""
    granularity: str = ""
    calls: int = 0
    nonfinite_calls: int = 0
    amax: float = 0.0
    scale_min: float = math.inf
    scale_max: float = -math.inf
    numel: int = 0
    nonzero: int = 0
    flushed: int = 0
    saturated: int = 0  # |t * scale| >= fmt.max
    clipped: int = 0  # |t * scale| past the overflow threshold: lost to saturation
    signal: float = 0.0  # sum t^2 (float64)
    noise: float = 0.0  # sum (t - dequant)^2 (float64)
    staleness: float | None = None

    @property
    def underflow(self) -> float:
        """Fraction of the nonzero elements flushed to zero (0.0 when none is nonzero)."""
        return self.flushed / self.nonzero if self.nonzero else 0.0

    @property
    def overflow(self) -> float:
        """Fraction of all elements at or beyond the format's maximum before saturation."""
        return self.saturated / self.numel if self.numel else 0.0

    @property
    def clipped_fraction(self) -> float:
        """Fraction of all elements past the overflow threshold (lost to saturation)."""
        return self.clipped / self.numel if self.numel else 0.0

    @property
    def sqnr_db(self) -> float:
        """``10 log10(signal / noise)``: ``+inf`` when exact, NaN when nothing was counted."""
        if self.noise == 0.0:
            return math.inf if self.numel else math.nan
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def add(self, other: OperandStats) -> None:
        """Pool ``other`` into these statistics: counts and sums add, extremes combine."""
        self.fmt, self.granularity = other.fmt or self.fmt, other.granularity or self.granularity
        self.calls += other.calls
        self.nonfinite_calls += other.nonfinite_calls
        self.amax = max(self.amax, other.amax) if not math.isnan(other.amax) else math.nan
        self.scale_min = min(self.scale_min, other.scale_min)
        self.scale_max = max(self.scale_max, other.scale_max)
        self.numel += other.numel
        self.nonzero += other.nonzero
        self.flushed += other.flushed
        self.saturated += other.saturated
        self.clipped += other.clipped
        self.signal += other.signal
        self.noise += other.noise
        if other.staleness is not None:
            self.staleness = (
                other.staleness if self.staleness is None else max(self.staleness, other.staleness)
            )

    def as_record(self) -> dict[str, Any]:
        """The statistics as a layer record's fields (``None`` where no call was finite)."""
        finite = self.calls > self.nonfinite_calls
        return {
            "fmt": self.fmt,
            "granularity": self.granularity,
            "amax": self.amax,
            "scale_min": self.scale_min if finite else None,
            "scale_max": self.scale_max if finite else None,
            "underflow": self.underflow if finite else None,
            "overflow": self.overflow if finite else None,
            "clipped": self.clipped_fraction if finite else None,
            "sqnr_db": self.sqnr_db if finite else None,
            "staleness": self.staleness,
            "calls": self.calls,
            "nonfinite_calls": self.nonfinite_calls,
        }


@functools.cache
def _code_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 value of each of the 256 codes of a one-byte float dtype (NaN codes give NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def _payload_values(data: torch.Tensor) -> torch.Tensor:
    """``data.float()``, bit for bit; one-byte float payloads go through a 256-entry
    table, a gather that is cheaper on CPU than torch's float8 conversion."""
    if data.dtype.is_floating_point and data.element_size() == 1:
        table = _code_values(data.dtype).to(data.device)
        return torch.take(table, data.view(torch.uint8).long())  # (same shape as data)
    return data.float()


@functools.cache
def _floor_scale(spec: ScaleSpec) -> float:
    """The scale an all-zero scaling group gets (its amax clamped to AMAX_FLOOR)."""
    return float(scale_from_amax(torch.tensor(AMAX_FLOOR), spec))


def _scale_range(q: ScaledTensor) -> tuple[float, float]:
    """(min, max) of the scale grid over the groups that hold a nonzero value.

    An all-zero group (a dead ReLU column, say) gets the huge scale of AMAX_FLOOR, which
    is harmless -- any scale reproduces zeros -- and would only hide the real range.
    When every group is zero the floor scale itself is reported.
    """
    scale = q.scale
    if scale.numel() > 1:
        real = scale[scale != _floor_scale(q.spec)]
        if real.numel():
            scale = real
    lo, hi = torch.aminmax(scale)
    return float(lo), float(hi)


def operand_stats(t: torch.Tensor, q: ScaledTensor | None) -> OperandStats:
    """Statistics of one quantisation ``q`` of ``t`` (2-D, any float dtype).

    Read-only: no in-place op touches ``t`` or ``q`` and no random numbers are drawn,
    so computing them cannot change training. ``q is None`` (``t`` held NaN/inf) gives
    a record with ``nonfinite_calls == 1`` and the amax only.

    How (each a pass the monitor can afford every ``every`` steps):
    flushed = (zeros in the payload) - (zeros in ``t``), since a zero always encodes
    as zero; overflow is counted only when ``amax * max(scale)`` (fp32, as the cast
    computes it, and rounding is monotonic) reaches ``fmt.max``; the error
    ``t - dequant(q)`` is taken in fp32, where it is exact (the two are within a
    factor 2 of each other, or the payload is zero: Sterbenz), and both sums of
    squares in float64.
    """
    with torch.no_grad():
        x = t.detach()
        x2d = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)  # (M, K)
        numel = x2d.numel()
        if numel == 0:
            return OperandStats(calls=1, fmt="" if q is None else q.spec.fmt.name)
        lo, hi = torch.aminmax(x2d)
        amax = max(abs(float(lo)), abs(float(hi)))
        if q is None:
            return OperandStats(calls=1, nonfinite_calls=1, amax=amax)
        fmt = q.spec.fmt
        shape2d = (x2d.shape[0], x2d.shape[1])
        x32 = x2d.float()  # upcast first, as the cast does: the same products, bit for bit
        saturated = clipped = 0
        if float(torch.maximum(lo.float().abs(), hi.float().abs()) * q.scale.max()) >= fmt.max:
            scaled = x32 * expand_scale(q.scale, shape2d, q.spec)
            mag = scaled.abs()
            saturated = int(torch.count_nonzero(mag >= fmt.max))
            clipped = int(torch.count_nonzero(mag > overflow_threshold(fmt)))
        scale_lo, scale_hi = _scale_range(q)
        nonzero = int(torch.count_nonzero(x2d))
        operand = q.operand
        if operand is not None and (
            operand.dtype == torch.float32
            or (operand.dtype == torch.bfloat16 and q.spec.scales_are_power_of_two)
        ):
            # The GEMM operand the cast already made: dequantize()'s values, exact in
            # bf16 when the scales are powers of two. A payload is zero iff its
            # dequantised value is (scales keep nonzero values far from fp32's floor).
            deq = operand.reshape(shape2d).float()
            flushed = nonzero - int(torch.count_nonzero(deq))
        else:
            values = _payload_values(q.data).reshape(shape2d)
            flushed = nonzero - int(torch.count_nonzero(values))
            # As ScaledTensor.dequantize: payload times the fp32 reciprocal of the scale.
            deq = values * expand_scale(q.scale.reciprocal(), shape2d, q.spec)
        err = (x32 - deq).reshape(-1).double()
        ref = x32.reshape(-1).double()
        return OperandStats(
            fmt=fmt.name,
            granularity=q.spec.describe(),
            calls=1,
            amax=amax,
            scale_min=scale_lo,
            scale_max=scale_hi,
            numel=numel,
            nonzero=nonzero,
            flushed=flushed,
            saturated=saturated,
            clipped=clipped,
            signal=float(torch.dot(ref, ref)),
            noise=float(torch.dot(err, err)),
        )


def grad_norm(model: nn.Module) -> float | None:
    """Global L2 norm of ``model``'s ``p.grad`` (fp32 per tensor), ``None`` without any."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    return float(torch.linalg.vector_norm(norms))
