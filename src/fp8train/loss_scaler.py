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

The settings are one frozen :class:`LossScalerConfig`, validated when it is built (also
by ``dataclasses.replace``); ``LossScaler(...)`` takes the same fields as keywords.

Not supported: sparse gradients (``TypeError``) and optimizers that take a closure
(``ValueError``), because the closure would recompute scaled gradients after unscaling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

__all__ = ["LossScaler", "LossScalerConfig"]

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

_Scaler = TypeVar("_Scaler", bound="LossScaler")


def _check_real(name: str, value: object) -> float:
    # bool is an int subclass; True as a scale is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a real number (int or float), got {type(value).__name__} "
            f"{value!r}; pass a number, not a string or a bool"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}; pass a finite number")
    return value


@dataclass(frozen=True)
class LossScalerConfig:
    """The settings of a :class:`LossScaler`, validated on construction.

    Build variants with ``dataclasses.replace(config, growth_interval=500)``: the copy is
    validated again. Real-valued fields are stored as ``float`` (``init_scale=1024``
    becomes ``1024.0``), so that ``state_dict()`` holds the same types however the
    scaler was configured. Raises ``ValueError`` for a value out of range and
    ``TypeError`` for a value of the wrong type.
    """

    # "dynamic" grows and backs off the scale; "static" keeps init_scale for ever.
    mode: Mode = "dynamic"
    # 2**16: large enough that small gradients survive, small enough that the first
    # overflows back it off within a few steps.
    init_scale: float = 2.0**16
    # Multiplies the scale after growth_interval consecutive clean steps; > 1.
    growth_factor: float = 2.0
    # Multiplies the scale after every update() that saw a non-finite gradient; in (0, 1).
    backoff_factor: float = 0.5
    # Clean steps between growths; >= 1.
    growth_interval: int = 2000
    # 1: never amplify the gradients' rounding error by unscaling with a scale below 1.
    min_scale: float = 1.0
    # 2**24: long clean runs stop growing the scale before the scaled loss overflows.
    max_scale: float = 2.0**24
    # False turns every LossScaler method into a pass-through (scale 1, step always runs).
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(
                f"mode must be one of {_MODES}, got {self.mode!r}; use 'dynamic' for a "
                "scale that adapts or 'static' for a fixed one"
            )
        init = _check_real("init_scale", self.init_scale)
        growth = _check_real("growth_factor", self.growth_factor)
        backoff = _check_real("backoff_factor", self.backoff_factor)
        lo = _check_real("min_scale", self.min_scale)
        hi = _check_real("max_scale", self.max_scale)
        if lo <= 0.0:
            raise ValueError(
                f"min_scale must be > 0 (the scale is floored at it), got {lo!r}; "
                "use a positive floor such as 1.0"
            )
        if hi > _FP32_MAX:
            raise ValueError(
                f"max_scale must be at most the float32 maximum {_FP32_MAX!r} (the loss is "
                f"scaled in fp32), got {hi!r}; lower max_scale"
            )
        if lo > hi:
            raise ValueError(
                f"min_scale must be <= max_scale, got min_scale={lo!r}, max_scale={hi!r}; "
                "swap or widen the bounds"
            )
        if not lo <= init <= hi:
            raise ValueError(
                f"init_scale must lie in [min_scale, max_scale] = [{lo!r}, {hi!r}], got "
                f"{init!r}; change init_scale or widen the bounds"
            )
        if growth <= 1.0:
            raise ValueError(
                f"growth_factor must be > 1, got {growth!r}; for a scale that never grows "
                "use mode='static'"
            )
        if not 0.0 < backoff < 1.0:
            raise ValueError(
                f"backoff_factor must lie in (0, 1), got {backoff!r}; 0.5 halves the scale "
                "after an overflow"
            )
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int):
            raise TypeError(
                f"growth_interval must be an int (a number of steps), got "
                f"{type(self.growth_interval).__name__} {self.growth_interval!r}"
            )
        if self.growth_interval < 1:
            raise ValueError(
                f"growth_interval must be >= 1, got {self.growth_interval!r}; it counts the "
                "clean steps between growths"
            )
        if not isinstance(self.enabled, bool):
            raise TypeError(
                f"enabled must be a bool, got {type(self.enabled).__name__} {self.enabled!r}"
            )
        # Frozen: store the normalised floats once, before anyone can see the object.
        for name, value in (
            ("init_scale", init),
            ("growth_factor", growth),
            ("backoff_factor", backoff),
            ("min_scale", lo),
            ("max_scale", hi),
        ):
            object.__setattr__(self, name, value)


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

    The arguments are validated as one :class:`LossScalerConfig` (``config``); build a
    scaler from such a config with :meth:`from_config`.

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
        self._config = LossScalerConfig(
            mode,
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            min_scale=min_scale,
            max_scale=max_scale,
            enabled=enabled,
        )
        self._scale = self._config.init_scale
        self._growth_tracker = 0
        self._skipped_steps = 0
        self._last_step_skipped = False
        # Keyed by id(optimizer) and cleared by update(), so a recycled id cannot leak
        # state across iterations.
        self._per_optimizer: dict[int, _OptState] = {}
        # id(param) of every parameter unscaled this iteration: a parameter shared by two
        # optimizers must not be divided twice.
        self._unscaled_params: set[int] = set()

    @classmethod
    def from_config(cls: type[_Scaler], config: LossScalerConfig, **kwargs: Any) -> _Scaler:
        """A scaler with ``config``'s settings; ``kwargs`` go to subclasses' constructors
        (e.g. ``process_group`` of ``fp8train.distributed.DistributedLossScaler``)."""
        if not isinstance(config, LossScalerConfig):
            raise TypeError(
                f"config must be a LossScalerConfig, got {type(config).__name__}; build one "
                "with LossScalerConfig(...) or pass the settings to LossScaler(...) directly"
            )
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(**fields, **kwargs)

    # ------------------------------------------------------------------ read-only state

    @property
    def config(self) -> LossScalerConfig:
        """The settings; after load_state_dict(), ``init_scale`` is the loaded scale."""
        return self._config

    @property
    def mode(self) -> Mode:
        return self._config.mode

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def get_scale(self) -> float:
        """Current loss scale as a Python float (1.0 when disabled).

        A method, not a ``scale`` property, because ``scale(loss)`` is the GradScaler-style
        call; the name matches ``GradScaler.get_scale``.
        """
        return self._scale if self._config.enabled else 1.0

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
        if not self._config.enabled:
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
        if not self._config.enabled:
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
        if not self._config.enabled:
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

        Dynamic mode: if any optimizer saw a non-finite gradient,
        ``scale *= backoff_factor`` (floored at min_scale) and the growth tracker resets;
        otherwise the tracker counts up, and on reaching growth_interval
        ``scale *= growth_factor`` (capped at max_scale) and the tracker resets. Static
        mode only forgets the iteration.

        Raises:
            RuntimeError: no optimizer was unscaled or stepped since the last update().
        """
        if not self._config.enabled:
            return
        if not self._per_optimizer:
            raise RuntimeError(
                "update() found no gradients checked since the last update(); call "
                "scaler.step(optimizer) (or unscale_) before update()"
            )
        found_inf = any(s.found_inf for s in self._per_optimizer.values())
        self._per_optimizer.clear()
        self._unscaled_params.clear()
        config = self._config
        if config.mode == "static":
            return
        if found_inf:
            self._scale = max(self._scale * config.backoff_factor, config.min_scale)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= config.growth_interval:
            self._scale = min(self._scale * config.growth_factor, config.max_scale)
            self._growth_tracker = 0

    # ---------------------------------------------------------------------- state_dict

    def state_dict(self) -> dict[str, Any]:
        """Configuration and counters as plain Python values (``"version": 1``).

        Taken between update() and the next backward; the pending per-optimizer state of
        an unfinished iteration is not saved. ``init_scale`` is not saved: the current
        ``scale`` is where a loaded scaler starts.
        """
        config = self._config
        return {
            "version": _STATE_VERSION,
            "mode": config.mode,
            "enabled": config.enabled,
            "scale": self._scale,
            "growth_factor": config.growth_factor,
            "backoff_factor": config.backoff_factor,
            "growth_interval": config.growth_interval,
            "min_scale": config.min_scale,
            "max_scale": config.max_scale,
            "growth_tracker": self._growth_tracker,
            "skipped_steps": self._skipped_steps,
            "last_step_skipped": self._last_step_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything state_dict() saved, configuration included, exactly.

        The loaded configuration replaces this scaler's, with ``init_scale`` set to the
        saved scale (which is validated as an ``init_scale``). Load between update() and
        the next scale(): mid-iteration, gradients were scaled by the old scale.

        Raises:
            ValueError: unknown version, missing or unexpected keys, or invalid values.
            TypeError: a value of the wrong type (e.g. a float growth_interval).
            RuntimeError: called mid-iteration (after ``unscale_``/``step``, before ``update``).
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
        try:
            config = LossScalerConfig(
                state["mode"],
                init_scale=state["scale"],
                growth_factor=state["growth_factor"],
                backoff_factor=state["backoff_factor"],
                growth_interval=state["growth_interval"],
                min_scale=state["min_scale"],
                max_scale=state["max_scale"],
                enabled=state["enabled"],
            )
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"LossScaler state holds an invalid configuration (its 'scale' is checked "
                f"as init_scale): {e}"
            ) from e
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
        self._config = config
        self._scale = config.init_scale
        self._growth_tracker = tracker
        self._skipped_steps = skipped
        self._last_step_skipped = last
