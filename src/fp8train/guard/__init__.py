"""The divergence guard: find where FP8 training starts to go wrong, and act on it.

:class:`Guard` runs each training step; on a trigger (a loss spike, a gradient-norm
jump, NaN/inf, an amax jump, or a GEMM whose error against high precision left its
baseline) it names the first layer, GEMM and operand that went wrong
(:class:`Diagnosis`) and acts by its policy: warn, skip the batch, demote the layer one
rung down a ladder (a finer recipe, then high precision), or roll back to a snapshot
and replay with the layer demoted.

One job per module: :mod:`~fp8train.guard.triggers` (thresholds, baselines, triggers),
:mod:`~fp8train.guard.diagnosis` (localisation), :mod:`~fp8train.guard.decision` (one
decision over the ranks) and :mod:`~fp8train.guard.guard` (the step, snapshots and
policies). The GEMM check itself is the monitor's (:mod:`fp8train.monitor.gemms`).
"""

from fp8train.guard.decision import agree, all_reduce_max
from fp8train.guard.diagnosis import Diagnosis, localise
from fp8train.guard.guard import (
    DEFAULT_GUARD_EVERY,
    HIGH_PRECISION,
    POLICIES,
    Guard,
    Policy,
    Stateful,
)
from fp8train.guard.triggers import GemmBaselines, GuardThresholds

__all__ = [
    "DEFAULT_GUARD_EVERY",
    "HIGH_PRECISION",
    "POLICIES",
    "Diagnosis",
    "GemmBaselines",
    "Guard",
    "GuardThresholds",
    "Policy",
    "Stateful",
    "agree",
    "all_reduce_max",
    "localise",
]
