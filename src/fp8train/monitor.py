"""Opt-in training health monitor for FP8 layers: statistics, warnings, sinks.

``Monitor(model, every=N)`` watches every :class:`~fp8train.nn.Fp8Linear` of ``model``.
On *observed* steps (``step % every == 0``) it installs an observer on each layer's
:class:`~fp8train.autograd.LayerState` and records, per (layer, operand role):

* ``amax`` -- ``max |t|`` of the high-precision tensor being quantised;
* ``scale_min``/``scale_max`` -- over the scale grid (equal for tensorwise scaling),
  leaving out groups that are all zero (their scale comes from the amax floor and
  means nothing);
* ``underflow`` -- fraction of the *nonzero* elements of ``t`` whose FP8 payload is
  zero (flushed to zero). Elements that are zero in ``t`` are not counted at all;
* ``overflow`` -- fraction of all elements with ``|t * scale| >= fmt.max``, i.e. at or
  beyond the format's maximum *before* saturation: they sit at ``+-max`` in the
  payload. An element that lands exactly on ``max`` counts too, so current scaling
  without power-of-two rounding shows about one element per scale group (the amax
  element itself). Power-of-two scales (our FP8 recipes) mostly count real clipping,
  except when an operand already on the FP8 grid is re-quantised (``input.t`` from a
  saved FP8 payload): its max often lands exactly on ``fmt.max``;
* ``clipped`` -- fraction with ``|t * scale|`` beyond
  :func:`fp8train.cast.overflow_threshold` (``max`` plus half its step: 464 for E4M3,
  127.5 for INT8), i.e. values that would round past ``max`` and lost magnitude to
  saturation, beyond ordinary rounding (what the ``overflow`` warning watches; an
  fp32 product landing a hair above ``max`` does not count);
* ``sqnr_db`` -- ``10 log10(sum t^2 / sum (t - dequant(q))^2)`` in float64, ``+inf``
  when the quantisation is exact;
* ``staleness`` (delayed scaling only) -- current amax over the history amax the scale
  came from: > 1 means the tensor outgrew its scale (overflow risk), << 1 means the
  scale wastes range (underflow risk); 1.0 when the scale came from the current amax;
* ``calls``/``nonfinite_calls`` -- how many quantisations were pooled (a layer called
  twice per step, e.g. gradient accumulation, pools counts and sums; amax and scales
  take the extremes) and how many of them met NaN/inf (those have no scale).

Roles are ``input``, ``weight``, ``grad_output`` and, for recipes that quantise a
tensor again along the other axis for a backward GEMM, ``input.t``, ``weight.t`` and
``grad_output.t``. Forward quantisations made while grad mode is off (evaluation under
``torch.no_grad()``) are not recorded, so validation passes do not mix into the
training statistics. Off-interval steps install no observer at all: the layers run
exactly the code they run unmonitored, and ``step()`` costs a few dictionary lookups.

Per step, ``monitor.step(loss=..., grad_norm=..., loss_scale=..., skipped=...)`` ends
the step: it writes the layer records and a step record (observed steps only), runs
the warning checks and advances the step counter. Call it after ``backward()`` and
before ``optimizer.zero_grad()`` when you want the monitor to compute the gradient
norm itself (it does so on observed steps only, from ``p.grad``; pass ``grad_norm``,
e.g. the value ``clip_grad_norm_`` returns, to skip that pass or when the gradients
are still multiplied by a loss scale).

Warnings (:class:`HealthWarning` through :func:`warnings.warn`, and a ``"warning"``
record in every sink) name the step, the layer and the operand. They are edge
triggered: one warning when a quantity crosses its threshold, re-armed once it is
back below, so a persistent condition does not repeat every step. Kinds:

* ``loss_spike`` -- ``loss > loss_spike_factor * median(last loss_window losses)``
  (checked every step); when the step was observed, names the forward operand whose
  amax grew the most since its last observation;
* ``underflow``/``overflow`` -- the underflow or the clipped fraction rose past its
  threshold;
* ``scale_collapse``/``scale_explode`` -- ``scale_min`` fell, or ``scale_max`` rose,
  by more than ``2**scale_change_log2`` against the running median of its earlier
  observations (a new outlier, or a tensor decaying to zero);
* ``nonfinite`` -- NaN/inf first seen in an operand (every step, from the layers'
  non-finite counters), or in the loss. When several layers see NaN/inf in one step
  the one named is the earliest in execution order -- forward operands in
  registration order, then backward operands in reverse -- which is the culprit when
  the NaN propagated downstream; the others are listed.

A warning on an off-interval step makes the next step observed, so the records show
the layers right after the event.

Optional BF16 shadow check (``shadow_every=N``): on steps divisible by ``N`` a forward
hook recomputes each layer's output as a bf16 layer would (``F.linear`` of the bf16-
rounded input, weight and bias, fp32 accumulation, one bf16 rounding) and records
``bf16_rel_err = ||y_fp8 - y_bf16|| / ||y_bf16||`` (float64) as a
layer record with role ``"output"``.

Sinks: JSONL (``jsonl=path``; one JSON object per line, ``{"step", "kind": "layer" |
"step" | "warning", ...}``; non-finite floats are written as the strings ``"inf"``,
``"-inf"`` and ``"nan"`` so every line is strict JSON -- read them back with
``float(value)``), TensorBoard (``tensorboard=log_dir``, when the ``tensorboard``
package is installed; otherwise skipped with one log line), and any object with
``write(record)`` and ``close()`` passed in ``sinks``.

Not promised: statistics of steps the monitor did not observe; exact attribution when
a NaN enters two layers in the same step through different paths.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.autograd import LayerState
from fp8train.cast import overflow_threshold
from fp8train.matmul import gemm_dtype
from fp8train.nn import Fp8Linear, fp8_layers
from fp8train.scaling import AMAX_FLOOR, ScaleSpec, expand_scale, scale_from_amax
from fp8train.tensor import ScaledTensor

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_EVERY",
    "HealthWarning",
    "JsonlSink",
    "Monitor",
    "OperandStats",
    "Sink",
    "TensorBoardSink",
    "Thresholds",
    "operand_stats",
]

log = logging.getLogger("fp8train")

# Observe one step in this many by default. On the lab GPT (tensorwise, 2 CPU cores) an
# observed step measured 1.46x an unobserved one and an off-interval step 1.00x, so 1 in
# 25 costs 2.0% of step time, inside the 5% budget with room for noisier machines
# (benchmarks/monitor.py; 1 in 10 would be 4.8%).
DEFAULT_EVERY = 25

_FORWARD_ROLES = ("input", "weight", "input.t", "weight.t")


class HealthWarning(UserWarning):
    """A training-health event: the message names the step, the layer and the operand."""


@dataclass(frozen=True)
class Thresholds:
    """When the monitor warns. Build variants with ``dataclasses.replace``.

    * ``loss_spike_factor``/``loss_window``/``loss_min_history``: warn when the loss
      exceeds ``factor`` times the median of the previous ``loss_window`` losses, once
      at least ``loss_min_history`` losses were seen (a loss that halves is normal
      early in training; one that rises 1.5x in a step is not).
    * ``underflow``: fraction of nonzero values flushed to zero (default 5%). It counts
      values, not their weight: attention gradients routinely hold ~1% of values far
      below the rest (softmax tails) whose loss costs nothing measurable (the SQNR
      says how much signal was lost).
    * ``overflow``: fraction of values *clipped*, past the format's overflow threshold
      before saturation (default 0.1%). Values at max, or rounding to it, are not
      counted here (they lost nothing), although the ``overflow`` statistic includes
      them.
    * ``scale_change_log2``/``scale_window``/``scale_min_history``: warn when a scale
      moves more than ``2**scale_change_log2`` away from the median of its last
      ``scale_window`` observations (at least ``scale_min_history`` of them). A loss
      scaler backing off moves grad_output scales by 2x per skipped step, and in the
      first few dozen steps of the lab GPT gradient amaxes swing by up to 2^8; the
      default 2^6 with four earlier observations flags what is left.
    """

    loss_spike_factor: float = 1.5
    loss_window: int = 32
    loss_min_history: int = 8
    underflow: float = 0.05
    overflow: float = 0.001
    scale_change_log2: float = 6.0
    scale_window: int = 8
    scale_min_history: int = 4

    def __post_init__(self) -> None:
        if not self.loss_spike_factor > 1.0:
            raise ValueError(f"loss_spike_factor must be > 1, got {self.loss_spike_factor}")
        for name in ("loss_window", "loss_min_history", "scale_window", "scale_min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("underflow", "overflow"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"{name} threshold is a fraction in [0, 1), got {getattr(self, name)}"
                )
        if not self.scale_change_log2 > 0:
            raise ValueError(f"scale_change_log2 must be > 0, got {self.scale_change_log2}")


# --------------------------------------------------------------------------- statistics


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
        return self.flushed / self.nonzero if self.nonzero else 0.0

    @property
    def overflow(self) -> float:
        return self.saturated / self.numel if self.numel else 0.0

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.numel if self.numel else 0.0

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf if self.numel else math.nan
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def add(self, other: OperandStats) -> None:
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
    table, about twice as fast on CPU as torch's float8 conversion."""
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


# --------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """Where records go: ``write`` one record (a JSON-ready dict), ``close`` at the end."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf", "-inf", "nan"), so each line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JsonlSink:
    """Appends one JSON object per line to ``path`` (created with its folder), flushed
    after every step so a crashed run keeps its log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JSONL sink {self.path} is closed")
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        if record.get("kind") != "layer":  # a step record or a warning ends a batch
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink:
    """Scalars to TensorBoard: ``<layer>/<role>/<stat>``, ``train/<stat>``, warnings as
    text. Needs the ``tensorboard`` package (``pip install 'fp8train[tensorboard]'``)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self._writer: Any = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, record: dict[str, Any]) -> None:
        step, kind = record["step"], record["kind"]
        if kind == "warning":
            self._writer.add_text("warnings", record["message"], step)
            return
        prefix = "train" if kind == "step" else f"{record['layer']}/{record['role']}"
        for key, value in record.items():
            if key in ("step", "kind", "layer", "role") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------- monitor


@dataclass
class _Edge:
    """Edge trigger: fires when the condition turns true, re-arms when it turns false."""

    active: set[tuple[str, ...]] = field(default_factory=set)

    def rises(self, key: tuple[str, ...], condition: bool) -> bool:
        if condition and key not in self.active:
            self.active.add(key)
            return True
        if not condition:
            self.active.discard(key)
        return False


class Monitor:
    """Watch the FP8 layers of ``model``; see the module docstring for what is recorded.

    ``every``: observe steps whose number is a multiple of this (step numbers count
    ``step()`` calls from ``start``; pass the training step when resuming). ``jsonl``:
    file to append records to. ``tensorboard``: log folder for TensorBoard, skipped
    with a log line when tensorboard is not installed. ``sinks``: further sinks.
    ``shadow_every``: run the BF16 shadow check on steps that are multiples of this.
    ``thresholds``: when to warn (:class:`Thresholds`).

    Use as a context manager (``with Monitor(model) as mon:``) or call ``attach()`` and
    ``detach()``; ``close()`` detaches and closes the sinks. A layer can have one
    observer at a time: attaching while another monitor is attached raises.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = DEFAULT_EVERY,
        *,
        jsonl: str | Path | None = None,
        tensorboard: str | Path | None = None,
        sinks: Sequence[Sink] = (),
        shadow_every: int | None = None,
        thresholds: Thresholds | None = None,
        start: int = 0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be a positive int (observe 1 step in every), got {every!r}"
            )
        if shadow_every is not None and (not isinstance(shadow_every, int) or shadow_every < 1):
            raise ValueError(f"shadow_every must be a positive int or None, got {shadow_every!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.model = model
        self.every = every
        self.shadow_every = shadow_every
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.step_count = start
        self.layers: list[tuple[str, Fp8Linear]] = list(fp8_layers(model))
        if not self.layers:
            log.info(
                "fp8train monitor: the model has no Fp8Linear layers; recording the "
                "loss and gradient norm only"
            )
        self._sinks: list[Sink] = []
        if jsonl is not None:
            self._sinks.append(JsonlSink(jsonl))
        if tensorboard is not None:
            if TensorBoardSink.available():
                self._sinks.append(TensorBoardSink(tensorboard))
            else:
                log.info(
                    "fp8train monitor: tensorboard is not installed; TensorBoard sink "
                    "skipped (pip install 'fp8train[tensorboard]')"
                )
        self._sinks.extend(sinks)
        self.warnings: list[dict[str, Any]] = []  # every warning record, in order
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}  # last record per (layer, role)

        self._attached = False
        self._observing = False
        self._shadowing = False
        self._force_next = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._stats: dict[tuple[str, str], OperandStats] = {}
        self._shadow: dict[str, list[float]] = {}  # layer -> [sum err^2, sum ref^2]
        self._grad_mode: dict[str, bool] = {}  # layer -> grad mode at its last forward
        self._history_amax: dict[tuple[str, str], float | None] = {}
        self._order = {name: i for i, (name, _) in enumerate(self.layers)}
        # Records use the qualified module name (a hand-built Fp8Linear's state may carry
        # another name).
        self._names = {id(m.fp8_state): name for name, m in self.layers}
        self._nonfinite_seen: set[tuple[str, str]] = set()
        self._nonfinite_counts = {n: dict(m.fp8_state.nonfinite) for n, m in self.layers}
        self._losses: deque[float] = deque(maxlen=self.thresholds.loss_window)
        self._scale_logs: dict[tuple[str, str, str], deque[float]] = {}
        self._prev_amax: dict[tuple[str, str], float] = {}  # amax at the last observation
        self._edges = _Edge()
        self._skipped_total = 0

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Self:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def observing(self) -> bool:
        """Whether the current step is recorded."""
        return self._observing

    def attach(self) -> Self:
        """Start watching (from the current step). Idempotent."""
        if self._attached:
            return self
        for name, layer in self.layers:
            if layer.fp8_state.observer is not None:
                raise ValueError(
                    f"layer {name!r} already has an observer ({layer.fp8_state.observer!r}); "
                    "detach the other monitor first: one observer per layer"
                )
        self._nonfinite_counts = {n: dict(m.fp8_state.nonfinite) for n, m in self.layers}
        self._attached = True
        self._configure()
        return self

    def detach(self) -> None:
        """Stop watching: remove every observer and hook. Sinks stay open."""
        self._uninstall()
        self._attached = False

    def close(self) -> None:
        """Detach and close every sink."""
        self.detach()
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def _configure(self) -> None:
        """Install or remove observers and hooks for the step about to run."""
        s = self.step_count
        observe = self._attached and (s % self.every == 0 or self._force_next)
        shadow = self._attached and self.shadow_every is not None and s % self.shadow_every == 0
        self._force_next = False
        if observe == self._observing and shadow == self._shadowing:
            return
        self._uninstall()
        self._observing, self._shadowing = observe, shadow
        for name, layer in self.layers:
            state = layer.fp8_state
            if observe:
                state.observer = self._observe
                self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(name)))
                # The scale the next quantisation uses comes from the history as it is now.
                for role, h in state.histories.items():
                    self._history_amax[(name, role)] = None if h.empty else float(h.reduced())
            if shadow:
                self._hooks.append(layer.register_forward_hook(self._shadow_hook(name)))

    def _uninstall(self) -> None:
        for _, layer in self.layers:
            if layer.fp8_state.observer == self._observe:
                layer.fp8_state.observer = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._observing = self._shadowing = False

    # ------------------------------------------------------------------- hooks
    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._grad_mode[name] = torch.is_grad_enabled()

        return hook

    def _observe(
        self, state: LayerState, role: str, t: torch.Tensor, q: ScaledTensor | None
    ) -> None:
        name = self._names.get(id(state), state.name)
        history = state.histories.get(role)
        training = role not in _FORWARD_ROLES or self._grad_mode.get(name, True)
        if training:
            stats = operand_stats(t, q)
            if history is not None and q is not None:
                used = self._history_amax.get((name, role))
                stats.staleness = 1.0 if used is None else stats.amax / used
            acc = self._stats.get((name, role))
            if acc is None:
                self._stats[(name, role)] = stats
            else:
                acc.add(stats)
        if history is not None and q is not None:
            # The history has recorded this amax; the next quantisation's scale uses it.
            self._history_amax[(name, role)] = float(history.reduced())

    def _shadow_hook(self, name: str) -> Any:
        def hook(module: Fp8Linear, args: Any, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():  # evaluation pass: not a training step
                return
            x = args[0]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                w, b = module.weight, module.bias
                # The bf16 layer: operands rounded to bf16, fp32 accumulation, one bf16
                # rounding; in fp32 where bf16 GEMMs are not native (20-100x faster
                # there, the same arithmetic up to summation order).
                work = gemm_dtype(torch.bfloat16, True, x.device.type)
                ref = F.linear(
                    x.detach().to(torch.bfloat16).to(work),
                    w.detach().to(torch.bfloat16).to(work),
                    None if b is None else b.detach().to(torch.bfloat16).to(work),
                ).to(torch.bfloat16)
                ref64 = ref.reshape(-1).double()
                err = output.detach().reshape(-1).double() - ref64
                acc = self._shadow.setdefault(name, [0.0, 0.0])
                acc[0] += float(torch.dot(err, err))
                acc[1] += float(torch.dot(ref64, ref64))

        return hook

    # -------------------------------------------------------------------- step
    def step(
        self,
        loss: float | torch.Tensor | None = None,
        *,
        grad_norm: float | torch.Tensor | None = None,
        loss_scale: float | None = None,
        skipped: bool = False,
    ) -> list[dict[str, Any]]:
        """End the current step: record it (observed steps), check for warnings, and
        advance. Returns this step's warning records (also emitted as
        :class:`HealthWarning`). ``loss``: the step's loss (a tensor is read with
        ``float()``). ``grad_norm``: global gradient norm; computed from ``p.grad`` on
        observed steps when not given. ``loss_scale``: e.g. ``scaler.get_scale()``.
        ``skipped``: whether the optimizer step was skipped (non-finite gradients).
        """
        s = self.step_count
        raised: list[dict[str, Any]] = []
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        loss_f = None if loss is None else float(loss)
        self._skipped_total += int(bool(skipped))

        raised += self._check_nonfinite(s, loss_f)
        if self._observing or self._shadowing:
            layer_records = self._layer_records(s)
            for rec in layer_records:
                self._emit(rec)
            raised += self._check_layers(s, layer_records)
        raised += self._check_loss(s, loss_f)
        for key, st in self._stats.items():
            if st.amax > 0 and math.isfinite(st.amax):
                self._prev_amax[key] = st.amax
        if self._observing or self._shadowing:
            if grad_norm is None and self._observing:
                grad_norm = self._grad_norm()
            self._emit(
                {
                    "step": s,
                    "kind": "step",
                    "loss": loss_f,
                    "loss_median": statistics.median(self._losses) if self._losses else None,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "loss_scale": None if loss_scale is None else float(loss_scale),
                    "skipped": bool(skipped),
                    "skipped_total": self._skipped_total,
                }
            )
        if loss_f is not None and math.isfinite(loss_f):
            self._losses.append(loss_f)
        for rec in raised:
            self._emit(rec)
            self.warnings.append(rec)
            warnings.warn(rec["message"], HealthWarning, stacklevel=2)
        if raised and not self._observing:
            self._force_next = True  # look at the layers right after the event
        self._stats = {}
        self._shadow = {}
        self._grad_mode = {}
        self.step_count = s + 1
        if self._attached:
            self._configure()
        return raised

    def _emit(self, record: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.write(record)

    def _grad_norm(self) -> float | None:
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return float(torch.linalg.vector_norm(norms))

    def _sort_key(self, layer: str, role: str) -> tuple[int, int, str]:
        """Execution order: forward operands by layer order, then backward in reverse."""
        i = self._order.get(layer, 0)
        if role.split(".")[0] in ("input", "weight"):
            return (0, i, role)
        return (1, -i, role)

    def _layer_records(self, s: int) -> list[dict[str, Any]]:
        records = []
        keys = sorted(self._stats, key=lambda k: (self._order.get(k[0], 0), k[1]))
        for layer, role in keys:
            rec = {
                "step": s,
                "kind": "layer",
                "layer": layer,
                "role": role,
                **self._stats[(layer, role)].as_record(),
            }
            self.latest[(layer, role)] = rec
            records.append(rec)
        for layer in sorted(self._shadow, key=lambda n: self._order.get(n, 0)):
            err2, ref2 = self._shadow[layer]
            if not (math.isfinite(err2) and math.isfinite(ref2)):
                rel = math.nan  # NaN/inf in the layer's input or output
            else:
                rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
            rec = {
                "step": s,
                "kind": "layer",
                "layer": layer,
                "role": "output",
                "bf16_rel_err": rel,
            }
            self.latest[(layer, "output")] = rec
            records.append(rec)
        return records

    # ----------------------------------------------------------------- warnings
    @staticmethod
    def _warning(
        s: int, kind: str, layer: str | None, operand: str | None, message: str, **extra: Any
    ) -> dict[str, Any]:
        where = (
            f"layer {layer!r} operand {operand!r}" if layer is not None else f"operand {operand!r}"
        )
        return {
            "step": s,
            "kind": "warning",
            "type": kind,
            "layer": layer,
            "operand": operand,
            "message": f"fp8train monitor: step {s}: {where}: {message}",
            **extra,
        }

    def _check_nonfinite(self, s: int, loss: float | None) -> list[dict[str, Any]]:
        new: list[tuple[str, str, int]] = []
        for name, layer in self.layers:
            counts = layer.fp8_state.nonfinite
            before = self._nonfinite_counts.setdefault(name, {})
            for role, n in counts.items():
                if n > before.get(role, 0):
                    new.append((name, role, n - before.get(role, 0)))
                    before[role] = n
        out = []
        if new:
            new.sort(key=lambda e: self._sort_key(e[0], e[1]))
            first_seen = [e for e in new if (e[0], e[1]) not in self._nonfinite_seen]
            self._nonfinite_seen.update((e[0], e[1]) for e in new)
            if first_seen:
                culprit, role, n = new[0]  # the earliest event this step: the likely cause
                others = [f"{e[0]}:{e[1]}" for e in new[1:]]
                also = f"; also seen downstream: {', '.join(others)}" if others else ""
                out.append(
                    self._warning(
                        s,
                        "nonfinite",
                        culprit,
                        role,
                        f"NaN/inf first seen ({n} event(s); no scale was computed and the GEMM "
                        f"ran in high precision){also}",
                        affected=[{"layer": e[0], "operand": e[1], "events": e[2]} for e in new],
                    )
                )
        first_bad_loss = ("", "loss") not in self._nonfinite_seen
        if loss is not None and not math.isfinite(loss) and first_bad_loss:
            self._nonfinite_seen.add(("", "loss"))
            out.append(
                self._warning(
                    s, "nonfinite", None, "loss", f"the loss is {loss} (first non-finite loss)"
                )
            )
        return out

    def _check_layers(self, s: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        th = self.thresholds
        out = []
        for rec in records:
            if rec["role"] == "output" or rec.get("underflow") is None:
                continue
            layer, role, fmt = rec["layer"], rec["role"], rec["fmt"]
            u, c = rec["underflow"], rec["clipped"]
            if self._edges.rises((layer, role, "underflow"), u > th.underflow):
                out.append(
                    self._warning(
                        s,
                        "underflow",
                        layer,
                        role,
                        f"{u:.2%} of nonzero values flushed to zero in {fmt} (threshold "
                        f"{th.underflow:.2%}); amax {rec['amax']:.3g}, "
                        f"scale {rec['scale_max']:.3g}",
                        value=u,
                        threshold=th.underflow,
                    )
                )
            # Clipped, not "at or beyond": a value landing on max lost nothing (re-quantising
            # an FP8 payload with a power-of-two scale does that often, and an INT8 scale
            # of 127/amax puts amax a rounding error above 127).
            if self._edges.rises((layer, role, "overflow"), c > th.overflow):
                out.append(
                    self._warning(
                        s,
                        "overflow",
                        layer,
                        role,
                        f"{c:.2%} of values beyond +-max of {fmt} were clipped (threshold "
                        f"{th.overflow:.2%}); amax {rec['amax']:.3g}, scale {rec['scale_max']:.3g}"
                        + (
                            f", amax/history amax {rec['staleness']:.3g}"
                            if rec.get("staleness") is not None
                            else ""
                        ),
                        value=c,
                        threshold=th.overflow,
                    )
                )
            for which, kind, sign in (
                ("scale_min", "scale_collapse", -1.0),
                ("scale_max", "scale_explode", 1.0),
            ):
                value = rec[which]
                if not value > 0 or not math.isfinite(value):
                    continue
                hist = self._scale_logs.setdefault(
                    (layer, role, which), deque(maxlen=th.scale_window)
                )
                lg = math.log2(value)
                moved = False
                if len(hist) >= th.scale_min_history:
                    ref = statistics.median(hist)
                    moved = sign * (lg - ref) > th.scale_change_log2
                    if self._edges.rises((layer, role, kind), moved):
                        verb = "fell" if sign < 0 else "rose"
                        out.append(
                            self._warning(
                                s,
                                kind,
                                layer,
                                role,
                                f"{which} {verb} by 2^{abs(lg - ref):.1f} to {value:.3g} against "
                                f"its running median {2.0**ref:.3g} (threshold "
                                f"2^{th.scale_change_log2:g}); amax {rec['amax']:.3g}",
                                value=value,
                                reference=2.0**ref,
                            )
                        )
                hist.append(lg)
        return out

    def _check_loss(self, s: int, loss: float | None) -> list[dict[str, Any]]:
        th = self.thresholds
        if loss is None or not math.isfinite(loss) or len(self._losses) < th.loss_min_history:
            return []
        median = statistics.median(self._losses)
        spike = median > 0 and loss > th.loss_spike_factor * median
        if not self._edges.rises(("", "loss", "spike"), spike):
            return []
        layer, role, why = self._suspect(s)
        return [
            self._warning(
                s,
                "loss_spike",
                layer,
                role,
                f"loss {loss:.4g} is {loss / median:.2f}x the median {median:.4g} of the last "
                f"{len(self._losses)} steps (threshold {th.loss_spike_factor:g}x); {why}",
                value=loss,
                reference=median,
                suspect_layer=layer,
                suspect_operand=role,
            )
        ]

    def _suspect(self, s: int) -> tuple[str | None, str, str]:
        """The forward operand whose amax grew the most since its previous observation
        (gradients grow after a loss spike, so only forward operands are suspects)."""
        if not self._observing or not self._stats:
            return None, "loss", ("step not observed; the next step will be, to find the layer")
        best: tuple[float, str, str] | None = None
        for (layer, role), st in self._stats.items():
            if role not in _FORWARD_ROLES:  # the loss is made in the forward pass
                continue
            prev = self._prev_amax.get((layer, role))
            if prev and st.amax > 0 and math.isfinite(st.amax):
                growth = st.amax / prev
                if best is None or growth > best[0]:
                    best = (growth, layer, role)
        if best is None:
            return None, "loss", "no earlier observation to compare amax against"
        growth, layer, role = best
        return layer, role, f"largest amax growth since the last observation: {growth:.3g}x"
