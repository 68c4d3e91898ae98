"""Loss scaling: keep small gradients representable, skip steps whose gradients overflow.

Used like ``torch.amp.GradScaler``::

    scaler = LossScaler()
    for x, y in data:
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.unscale_(opt)            # optional: only needed to clip or inspect grads
        clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)                # skipped if any grad of `opt` is inf/NaN
        scaler.update()                 # back off or grow the scale (dynamic mode)
        log(scaler.get_scale(), scaler.skipped_steps)

The scale direction is stated once: multiply the loss by ``scale`` before backward, divide
the gradients by ``scale`` before the optimizer sees them. With a power-of-two scale (the
default, and every value the default factors reach) both operations are exact in binary
floating point, so a run without overflow is bitwise identical to an unscaled run (up to
gradients in the subnormal range, which unscaling rounds).

Modes:

* ``"dynamic"`` -- a step with a non-finite gradient multiplies the scale by
  ``backoff_factor``; ``growth_interval`` consecutive clean steps multiply it by
  ``growth_factor``. Large scale = fewer underflowing gradients, more skipped steps.
* ``"static"`` -- the scale stays ``init_scale`` for ever (the classic fixed factor such as
  128 or 1024); steps with non-finite gradients are still skipped and counted.

The scale is a Python float and only ever changes by those two factors, clamped to
``[min_scale, max_scale]``: it can never become inf, NaN or zero. ``min_scale`` (default 1)
stops a burst of overflows from driving the scale into underflow territory; ``max_scale``
(default 2**24) stops long clean runs from growing it until the scaled loss itself
overflows.

Not supported: sparse gradients (``TypeError``) and optimizers that take a closure
(``ValueError``), because the closure would recompute scaled gradients after unscaling.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

__all__ = ["LossScaler"]

Mode = Literal["dynamic", "static"]
_MODES = ("dynamic", "static")
_STATE_VERSION = 1
# Keys of state_dict(); load_state_dict() requires exactly these.
_STATE_KEYS = frozenset(
    {
        "version",
        "mode",
        "enabled",
        "scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "min_scale",
        "max_scale",
        "growth_tracker",
        "skipped_steps",
        "last_step_skipped",
    }
)
# The scale multiplies in fp32; a larger scale would itself round to inf there.
_FP32_MAX = torch.finfo(torch.float32).max
# Gradients in these dtypes are unscaled in fp32 and written back (see unscale_).
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_real(name: str, value: object) -> float:
    # bool is an int subclass; True as a scale is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_config(
    mode: object,
    init_scale: object,
    growth_factor: object,
    backoff_factor: object,
    growth_interval: object,
    min_scale: object,
    max_scale: object,
    enabled: object,
) -> tuple[Mode, float, float, float, int, float, float, bool]:
    """Validate and normalise the configuration; shared by __init__ and load_state_dict."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    init = _check_real("init_scale", init_scale)
    growth = _check_real("growth_factor", growth_factor)
    backoff = _check_real("backoff_factor", backoff_factor)
    lo = _check_real("min_scale", min_scale)
    hi = _check_real("max_scale", max_scale)
    if lo <= 0.0:
        raise ValueError(f"min_scale must be > 0, got {lo!r}")
    if hi > _FP32_MAX:
        raise ValueError(
            f"max_scale must be at most the float32 maximum {_FP32_MAX!r} (the loss is "
            f"scaled in fp32), got {hi!r}"
        )
    if lo > hi:
        raise ValueError(f"min_scale must be <= max_scale, got min_scale={lo!r}, max_scale={hi!r}")
    if not lo <= init <= hi:
        raise ValueError(
            f"init_scale must lie in [min_scale, max_scale] = [{lo!r}, {hi!r}], got {init!r}; "
            "change init_scale or widen the bounds"
        )
    if growth <= 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth!r}")
    if not 0.0 < backoff < 1.0:
        raise ValueError(f"backoff_factor must lie in (0, 1), got {backoff!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
        raise TypeError(
            f"growth_interval must be an int, got {type(growth_interval).__name__} "
            f"{growth_interval!r}"
        )
    if growth_interval < 1:
        raise ValueError(f"growth_interval must be >= 1, got {growth_interval!r}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    return mode, init, growth, backoff, growth_interval, lo, hi, enabled  # type: ignore[return-value]


class _OptState:
    """What one optimizer did since the last update(): unscaled? stepped? non-finite grads?"""

    __slots__ = ("found_inf", "stepped", "unscaled")

    def __init__(self) -> None:
        self.unscaled = False
        self.stepped = False
        self.found_inf = False


class LossScaler:
    """Dynamic or static loss scaling with non-finite step skipping.

    Args:
        mode: ``"dynamic"`` (grow and back off) or ``"static"`` (fixed ``init_scale``).
        init_scale: starting scale; must lie in ``[min_scale, max_scale]``.
        growth_factor: > 1; applied after ``growth_interval`` consecutive clean steps.
        backoff_factor: in (0, 1); applied after every update() that saw a non-finite grad.
        growth_interval: >= 1 clean steps between growths.
        min_scale: floor of the scale (default 1: never amplify gradients' rounding error).
        max_scale: ceiling of the scale (default 2**24; at most the float32 maximum).
        enabled: ``False`` turns every method into a pass-through (scale 1, step always runs).

    Per iteration, each optimizer may be unscaled once and stepped once; update() ends the
    iteration. With several optimizers each one is skipped on its *own* gradients (an
    optimizer that already stepped cannot be undone), while update() backs off once if any
    of them saw a non-finite gradient.
    """

    def __init__(
        self,
        mode: Mode = "dynamic",
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        enabled: bool = True,
    ) -> None:
        (
            self._mode,
            self._scale,
            self._growth_factor,
            self._backoff_factor,
            self._growth_interval,
            self._min_scale,
            self._max_scale,
            self._enabled,
        ) = _check_config(
            mode,
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            min_scale,
            max_scale,
            enabled,
        )
        self._growth_tracker = 0
        self._skipped_steps = 0
        self._last_step_skipped = False
        # Keyed by id(optimizer) and cleared by update(), so a recycled id cannot leak
        # state across iterations.
        self._per_optimizer: dict[int, _OptState] = {}
        # id(param) of every parameter unscaled this iteration: a parameter shared by two
        # optimizers must not be divided twice.
        self._unscaled_params: set[int] = set()

    # ------------------------------------------------------------------ read-only state

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """Current loss scale as a Python float (1.0 when disabled).

        A method, not a ``scale`` property, because ``scale(loss)`` is the GradScaler-style
        call; the name matches ``GradScaler.get_scale``.
        """
        return self._scale if self._enabled else 1.0

    @property
    def skipped_steps(self) -> int:
        """Total optimizer.step calls skipped (one per optimizer per skipped iteration)."""
        return self._skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        """Whether the most recent step() call skipped optimizer.step."""
        return self._last_step_skipped

    @property
    def growth_tracker(self) -> int:
        """Consecutive clean update() calls since the scale last changed (dynamic mode)."""
        return self._growth_tracker

    # ------------------------------------------------------------------------ the loop

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss * scale`` with the dtype and shape of ``loss``; call backward on it.

        fp16/bf16 losses are multiplied in fp32 and cast back, so the only rounding is the
        final cast; a product past the dtype's range becomes inf, and the resulting
        non-finite gradients make step() skip and update() back off. Note that an fp16
        loss cannot carry a scale of 2**16 or more (the gradient of the cast is the scale
        itself, which is inf in fp16): compute the loss in fp32, as autocast does.
        Disabled: returns ``loss`` itself.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"scale() expects the loss as a torch.Tensor, got {type(loss).__name__}; "
                "scale the tensor before calling .item()"
            )
        if not loss.is_floating_point():
            raise TypeError(f"scale() expects a floating-point loss, got dtype {loss.dtype}")
        if not self._enabled:
            return loss
        if loss.dtype in _LOW_PRECISION:
            return (loss.float() * self._scale).to(loss.dtype)
        return loss * self._scale

    def _opt_state(self, optimizer: torch.optim.Optimizer) -> _OptState:
        return self._per_optimizer.setdefault(id(optimizer), _OptState())

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every ``.grad`` of ``optimizer``'s parameters by the scale, in place.

        Low-precision gradients (fp16, bf16) are divided in fp32 and written back; fp32 and
        fp64 gradients are divided in their own dtype. Records whether any gradient is
        inf or NaN *after* unscaling (so an overflow on write-back is caught too).
        At most once per optimizer per iteration; only needed before touching gradients
        (clipping, logging), since step() unscales otherwise.

        Raises:
            RuntimeError: called twice, or after step(), for the same optimizer before update().
            TypeError: a gradient is sparse (only dense gradients are supported).
        """
        if not self._enabled:
            return
        state = self._opt_state(optimizer)
        if state.unscaled:
            raise RuntimeError(
                "unscale_() was already called for this optimizer in this iteration "
                "(explicitly or by step()); call it at most once between update() calls"
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            if id(p) in self._unscaled_params:
                raise RuntimeError(
                    f"parameter of shape {tuple(p.shape)} belongs to two optimizers and was "
                    "already unscaled in this iteration; give each parameter one optimizer"
                )
        # One flag tensor per device, read once at the end: a single host sync per call.
        flags: dict[torch.device, torch.Tensor] = {}
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise TypeError(
                    f"LossScaler supports dense gradients only, got layout {g.layout} for a "
                    f"parameter of shape {tuple(p.shape)}; use dense gradients (e.g. "
                    "nn.Embedding(sparse=False))"
                )
            with torch.no_grad():
                if g.dtype in _LOW_PRECISION:
                    # fp32 math so a non-power-of-two scale rounds once, not twice.
                    g.copy_(g.float().div_(self._scale))
                else:
                    g.div_(self._scale)
                bad = ~torch.isfinite(g).all()
            flags[g.device] = flags[g.device] | bad if g.device in flags else bad
        self._unscaled_params.update(id(p) for p in params)
        state.unscaled = True
        state.found_inf = any(bool(f.item()) for f in flags.values())

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless already done), then run ``optimizer.step(*args, **kwargs)``.

        Returns what ``optimizer.step`` returns, or ``None`` when the step is skipped
        because one of this optimizer's gradients is inf or NaN; a skip leaves the
        parameters and the optimizer state untouched and increments ``skipped_steps``.

        Raises:
            RuntimeError: step() called twice for the same optimizer before update().
            ValueError: a closure is passed (it would recompute scaled gradients).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or any(callable(a) for a in args):
            raise ValueError(
                "LossScaler.step does not support optimizer closures: the closure would "
                "recompute scaled gradients after they were checked; call "
                "scaler.scale(loss).backward() yourself, then scaler.step(optimizer)"
            )
        state = self._opt_state(optimizer)
        if state.stepped:
            raise RuntimeError(
                "step() was already called for this optimizer in this iteration; "
                "call update() before stepping it again"
            )
        if not state.unscaled:
            self.unscale_(optimizer)
        state.stepped = True
        self._last_step_skipped = state.found_inf
        if state.found_inf:
            self._skipped_steps += 1
            return None
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        """End the iteration: apply the scale rule and forget per-optimizer state.

        Dynamic mode: if any optimizer saw a non-finite gradient, scale *= backoff_factor
        (floored at min_scale) and the growth tracker resets; otherwise the tracker counts
        up, and on reaching growth_interval the scale *= growth_factor (capped at
        max_scale) and the tracker resets. Static mode only forgets the iteration.

        Raises:
            RuntimeError: no optimizer was unscaled or stepped since the last update().
        """
        if not self._enabled:
            return
        if not self._per_optimizer:
            raise RuntimeError(
                "update() found no gradients checked since the last update(); call "
                "scaler.step(optimizer) (or unscale_) before update()"
            )
        found_inf = any(s.found_inf for s in self._per_optimizer.values())
        self._per_optimizer.clear()
        self._unscaled_params.clear()
        if self._mode == "static":
            return
        if found_inf:
            self._scale = max(self._scale * self._backoff_factor, self._min_scale)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= self._growth_interval:
            self._scale = min(self._scale * self._growth_factor, self._max_scale)
            self._growth_tracker = 0

    # ---------------------------------------------------------------------- state_dict

    def state_dict(self) -> dict[str, Any]:
        """Configuration and counters as plain Python values (``"version": 1``).

        Taken between update() and the next backward; the pending per-optimizer state of
        an unfinished iteration is not saved.
        """
        return {
            "version": _STATE_VERSION,
            "mode": self._mode,
            "enabled": self._enabled,
            "scale": self._scale,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
            "growth_tracker": self._growth_tracker,
            "skipped_steps": self._skipped_steps,
            "last_step_skipped": self._last_step_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything state_dict() saved, configuration included, exactly.

        Raises:
            ValueError: unknown version, missing or unexpected keys, or invalid values.
            TypeError: a value of the wrong type (e.g. a float growth_interval).
            RuntimeError: called in the middle of an iteration (after unscale_/step,
                before update()), where gradients were scaled by the old scale.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"LossScaler state version must be {_STATE_VERSION}, got {version!r}; "
                "the checkpoint was written by an incompatible fp8train"
            )
        missing = _STATE_KEYS - state.keys()
        extra = state.keys() - _STATE_KEYS
        if missing or extra:
            raise ValueError(
                f"LossScaler state has missing keys {sorted(missing)} and unexpected keys "
                f"{sorted(extra)}; pass a dict produced by LossScaler.state_dict()"
            )
        if self._per_optimizer:
            raise RuntimeError(
                "load_state_dict() called mid-iteration (after unscale_/step, before "
                "update()); load between update() and the next scale()"
            )
        config = _check_config(
            state["mode"],
            state["scale"],
            state["growth_factor"],
            state["backoff_factor"],
            state["growth_interval"],
            state["min_scale"],
            state["max_scale"],
            state["enabled"],
        )
        tracker, skipped, last = (
            state["growth_tracker"],
            state["skipped_steps"],
            state["last_step_skipped"],
        )
        for name, value in (("growth_tracker", tracker), ("skipped_steps", skipped)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not isinstance(last, bool):
            raise TypeError(f"last_step_skipped must be a bool, got {type(last).__name__}")
        (
            self._mode,
            self._scale,
            self._growth_factor,
            self._backoff_factor,
            self._growth_interval,
            self._min_scale,
            self._max_scale,
            self._enabled,
        ) = config
        self._growth_tracker = tracker
        self._skipped_steps = skipped
        self._last_step_skipped = last
