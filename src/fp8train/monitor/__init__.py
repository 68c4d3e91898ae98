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
training statistics.

Per step, ``monitor.step(loss=..., grad_norm=..., loss_scale=..., skipped=...)`` ends
the step: it writes the layer records and a step record (observed steps only), runs
the warning checks and advances the step counter. Call it after ``backward()`` and
before ``optimizer.zero_grad()`` when you want the monitor to compute the gradient
norm itself (it does so on observed steps only, from ``p.grad``; pass ``grad_norm``,
e.g. the value ``clip_grad_norm_`` returns, to skip that pass or when the gradients
are still multiplied by a loss scale).

Warnings (:class:`HealthWarning` through :func:`warnings.warn`, and a ``"warning"``
record in every sink) name the step, the layer and the operand, once per crossing of
a threshold: ``loss_spike``, ``underflow``, ``overflow``, ``scale_collapse``,
``scale_explode``, ``nonfinite`` and ``amax_jump`` (:mod:`fp8train.monitor.detectors`
says when each fires). A warning on an off-interval step makes the next step observed,
so the records show the layers right after the event.

Optional BF16 shadow check (``shadow_every=N``): on steps divisible by ``N`` each
layer's output is compared with a bf16 layer's, recorded as ``bf16_rel_err`` in a
layer record with role ``"output"`` (:mod:`fp8train.monitor.shadow`).

Sinks: JSONL (``jsonl=path``; one JSON object per line, ``{"step", "kind": "layer" |
"step" | "warning", ...}``, non-finite floats as the strings ``"inf"``, ``"-inf"`` and
``"nan"``), TensorBoard (``tensorboard=log_dir``, when the ``tensorboard`` package is
installed; otherwise skipped with one log line), and any object with
``write(record)`` and ``close()`` passed in ``sinks`` (:mod:`fp8train.monitor.sinks`).

Cost: off-interval steps install no observer at all, so the layers run exactly the
code they run unmonitored, and ``step()`` costs a few dictionary lookups and a read of
each layer's non-finite counters. An observed step makes the layers keep every FP8
payload and takes a few extra passes over each quantised operand (amax, counts of
nonzeros, flushed and clipped values, float64 sums of squares), which makes it
markedly slower than a plain step; ``every`` (default :data:`DEFAULT_EVERY`) spreads
that cost thin. The shadow check adds one high-precision GEMM per layer forward on
its steps. ``benchmarks/monitor.py`` measures all three on the lab GPT.

The package, one job per module: :mod:`~fp8train.monitor.stats` (the statistics of
one quantisation), :mod:`~fp8train.monitor.recorder` (the observer and hooks that pool
them per step), :mod:`~fp8train.monitor.shadow` (the BF16 shadow check),
:mod:`~fp8train.monitor.detectors` (thresholds and warnings),
:mod:`~fp8train.monitor.sinks` (where records go) and
:mod:`~fp8train.monitor.monitor` (the :class:`Monitor` that wires them to a model).

Not promised: statistics of steps the monitor did not observe; exact attribution when
a NaN enters two layers in the same step through different paths.
"""

from fp8train.monitor.detectors import HealthWarning, Thresholds
from fp8train.monitor.monitor import DEFAULT_EVERY, Monitor
from fp8train.monitor.sinks import JsonlSink, Sink, TensorBoardSink
from fp8train.monitor.stats import OperandStats, operand_stats

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
