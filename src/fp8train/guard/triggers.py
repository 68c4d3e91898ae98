"""When the guard looks closer: its thresholds, the per-GEMM error baselines, the triggers.

A trigger is cheap to test on every step (the loss, the gradient norm, the layers'
non-finite and amax-jump counters) except the GEMM check, which only runs on the steps
the monitor observes. :class:`GemmBaselines` keeps each ``(layer, gemm)``'s usual error
as an exponential moving average of its log and of the log's absolute deviation (the
spread), so a GEMM is judged against its own history: an E5M2 gradient GEMM's usual error
is not an E4M3 forward's.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["GemmBaselines", "GuardThresholds", "ScalarTriggers"]


@dataclass(frozen=True)
class GuardThresholds:
    """When :class:`fp8train.Guard` triggers. Every field is validated.

    The loss and gradient-norm triggers compare against the median of the last
    ``window`` finite values, once ``min_history`` are known:
    """

    loss_spike: float = 2.0  # the loss above this times the median loss
    grad_jump: float = 10.0  # the gradient norm above this times the median norm
    window: int = 32  # losses and gradient norms the medians are taken over
    min_history: int = 16  # values needed before the two triggers judge
    # A GEMM's error (fp8train.monitor.gemms) leaves its baseline when its log exceeds the
    # baseline's by log(gemm_factor) and by gemm_sigmas spreads, and it exceeds
    # gemm_floor: the usual FP8 GEMM error is a few percent, a flushed or clipped
    # operand loses whole rows or columns (an error near 1). Early in training a
    # gradient GEMM's error swings several-fold (0.06 to 0.35 on the lab GPT's head in
    # its first steps), hence a floor well above such swings.
    gemm_factor: float = 4.0
    gemm_sigmas: float = 4.0
    gemm_floor: float = 0.5
    gemm_warmup: int = 5  # observations before a baseline judges; until then:
    gemm_cap: float = 0.8  # an error above this is out of any baseline
    ema: float = 0.1  # weight of a new observation in the baselines

    def __post_init__(self) -> None:
        for name in ("loss_spike", "grad_jump", "gemm_factor"):
            if not getattr(self, name) > 1:
                raise ValueError(f"GuardThresholds.{name} must be > 1, got {getattr(self, name)}")
        for name in ("window", "min_history", "gemm_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GuardThresholds.{name} must be an int >= 1, got {value!r}")
        if self.min_history > self.window:
            raise ValueError(
                f"GuardThresholds.min_history ({self.min_history}) must be <= window "
                f"({self.window})"
            )
        if not self.gemm_sigmas >= 0:
            raise ValueError(f"GuardThresholds.gemm_sigmas must be >= 0, got {self.gemm_sigmas}")
        if not 0 < self.gemm_floor < self.gemm_cap:
            raise ValueError(
                f"GuardThresholds: need 0 < gemm_floor < gemm_cap, got {self.gemm_floor} and "
                f"{self.gemm_cap}"
            )
        if not 0 < self.ema <= 1:
            raise ValueError(f"GuardThresholds.ema must be in (0, 1], got {self.ema}")


class _Baseline:
    __slots__ = ("count", "mean", "recent", "spread")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0  # EMA of log(error)
        self.spread = 0.0  # EMA of |log(error) - mean|
        self.recent: deque[tuple[int, float]] = deque(maxlen=8)  # (step, error)


class GemmBaselines:
    """Each ``(layer, gemm)``'s usual error, and whether an error leaves it."""

    # An exact GEMM (error 0) enters the log as this: far below any FP8 error.
    _LOG_FLOOR = math.log(1e-12)

    def __init__(self, thresholds: GuardThresholds) -> None:
        self.thresholds = thresholds
        self._b: dict[tuple[str, str], _Baseline] = {}

    def _log(self, err: float) -> float:
        return math.log(err) if err > 0 else self._LOG_FLOOR

    def out(self, key: tuple[str, str], err: float) -> bool:
        """Whether ``err`` leaves ``key``'s baseline (NaN, a GEMM that met NaN/inf: yes)."""
        if math.isnan(err):
            return True
        th = self.thresholds
        if err <= th.gemm_floor:
            return False
        b = self._b.get(key)
        if b is None or b.count < th.gemm_warmup:
            return err > th.gemm_cap
        margin = max(math.log(th.gemm_factor), th.gemm_sigmas * b.spread)
        return self._log(err) > b.mean + margin

    def update(self, step: int, errors: dict[tuple[str, str], float]) -> None:
        """Fold a healthy step's finite errors into the baselines."""
        a = self.thresholds.ema
        for key, err in errors.items():
            if not math.isfinite(err):
                continue
            b = self._b.setdefault(key, _Baseline())
            x = self._log(err)
            if b.count == 0:
                b.mean = x
            else:
                b.spread = (1 - a) * b.spread + a * abs(x - b.mean)
                b.mean = (1 - a) * b.mean + a * x
            b.count += 1
            b.recent.append((step, err))

    def state_dict(self) -> list[list[Any]]:
        """``[layer, gemm, count, mean, spread, recent]`` per baseline (plain Python)."""
        return [
            [*key, b.count, b.mean, b.spread, [list(r) for r in b.recent]]
            for key, b in self._b.items()
        ]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        """Replace the baselines with ``state`` (from :meth:`state_dict`); ``ValueError``
        naming the entry, before any change, if one is malformed."""
        if not isinstance(state, list):
            raise ValueError(f"guard state: the GEMM baselines are malformed: {state!r}")
        loaded: dict[tuple[str, str], _Baseline] = {}
        for i, entry in enumerate(state):
            try:
                layer, gemm, count, mean, spread, recent = entry
                b = _Baseline()
                b.count, b.mean, b.spread = int(count), float(mean), float(spread)
                b.recent.extend((int(st), float(err)) for st, err in recent)
                ok = isinstance(layer, str) and isinstance(gemm, str) and b.count >= 0
                ok = ok and math.isfinite(b.mean) and math.isfinite(b.spread) and b.spread >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"guard state: GEMM baseline {i} is malformed: {entry!r}")
            loaded[(layer, gemm)] = b
        self._b = loaded

    def describe(self, key: tuple[str, str]) -> dict[str, Any]:
        """The baseline of ``key`` as evidence: typical error, spread factor, count and
        the latest observations."""
        b = self._b.get(key)
        if b is None:
            return {"observations": 0}
        return {
            "observations": b.count,
            "typical": math.exp(b.mean),
            "spread_factor": math.exp(b.spread),
            "recent": [list(r) for r in b.recent],
        }


class ScalarTriggers:
    """The loss-spike and gradient-norm-jump triggers over windows of recent values."""

    def __init__(self, thresholds: GuardThresholds) -> None:
        self.thresholds = thresholds
        self.losses: deque[float] = deque(maxlen=thresholds.window)
        self.norms: deque[float] = deque(maxlen=thresholds.window)

    def _median(self, values: deque[float]) -> float | None:
        if len(values) < self.thresholds.min_history:
            return None
        return statistics.median(values)

    def check(self, loss: float, grad_norm: float | None) -> list[tuple[str, str]]:
        """``(trigger, why)`` for this step's values (non-finite ones included)."""
        th = self.thresholds
        out: list[tuple[str, str]] = []
        if not math.isfinite(loss):
            out.append(("nonfinite", f"the loss is {loss}"))
        else:
            median = self._median(self.losses)
            if median is not None and median > 0 and loss > th.loss_spike * median:
                out.append(
                    (
                        "loss_spike",
                        f"loss {loss:.4g} is {loss / median:.3g}x the median {median:.4g}",
                    )
                )
        if grad_norm is not None:
            median = self._median(self.norms)
            if not math.isfinite(grad_norm):
                out.append(("nonfinite", f"the gradient norm is {grad_norm}"))
            elif median is not None and median > 0 and grad_norm > th.grad_jump * median:
                out.append(
                    (
                        "grad_jump",
                        f"gradient norm {grad_norm:.4g} is {grad_norm / median:.3g}x the "
                        f"median {median:.4g}",
                    )
                )
        return out

    def state_dict(self) -> dict[str, list[float]]:
        """The windows of recent losses and gradient norms."""
        return {"losses": list(self.losses), "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Replace the windows with ``state`` (from :meth:`state_dict`); ``ValueError``,
        before any change, unless each is a list of finite floats."""
        windows = {}
        for name in ("losses", "norms"):
            values = state.get(name) if isinstance(state, dict) else None
            try:
                floats = [float(v) for v in values]  # type: ignore[union-attr]
                ok = all(math.isfinite(v) for v in floats)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"guard state: the {name} window is malformed: {values!r}")
            windows[name] = floats
        self.losses = deque(windows["losses"], maxlen=self.thresholds.window)
        self.norms = deque(windows["norms"], maxlen=self.thresholds.window)

    def end_step(self, loss: float, grad_norm: float | None) -> None:
        """A healthy step's values join the windows."""
        if math.isfinite(loss):
            self.losses.append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.norms.append(grad_norm)
