"""Stress settings (a fault injected into training, the same for every precision) and
the guard's settings that answer them.

``LabConfig.stress`` names one; :func:`parse_stress` reads it and :class:`OutlierStress`
applies it. The guard's comparison (docs/guard.md) runs bf16, a plain FP8 recipe and the
guarded one under the same stress, seed and batches, so any difference between them is
the arithmetic's.

``"outlier:<layer>:<every>:<factor>"``: on every step whose number (1-based) is a
multiple of ``every``, one element of the input of the Linear layer ``<layer>`` (its
qualified name in the model, e.g. ``blocks.1.mlp.proj``) is set to ``factor`` times
that input's amax: row 0, position 0, feature 0 of the batch. It stands for the one bad
token or activation spike that real runs meet. Every training forward of that step
sees it (each micro-batch's, and a guard's re-run of the step); validation does not.
Under delayed scaling the outlier's amax stays in the layer's input history for
``history_len`` steps, and with ``factor`` beyond the format's range
(``fp8train.autograd.amax_jump_limit``, about 2.3e5 for E4M3) every other value of
that input quantises to zero for as long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["GUARD_POLICIES", "GuardSpec", "OutlierStress", "parse_guard", "parse_stress"]

_SYNTAX = "outlier:<layer>:<every>:<factor>, e.g. outlier:blocks.1.mlp.proj:40:1e6"


@dataclass(frozen=True)
class OutlierStress:
    """One outlier in ``layer``'s input on every step numbered a multiple of ``every``."""

    layer: str  # qualified name of an nn.Linear (or Fp8Linear) of the model
    every: int  # steps between outliers (1-based step numbers every, 2*every, ...)
    factor: float  # the outlier is this many times the input's amax

    def hits(self, step: int) -> bool:
        """Whether the step with 0-based index ``step`` carries the outlier."""
        return (step + 1) % self.every == 0

    def attach(self, model: nn.Module) -> _OutlierHook:
        """Hook the layer's forward; the returned handle's ``step`` must be set by the
        loop before each step (training forwards only)."""
        try:
            module = model.get_submodule(self.layer)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"stress outlier: {self.layer!r} is not a Linear layer of the model; its "
                f"Linear layers: {', '.join(linears)}"
            )
        hook = _OutlierHook(self)
        hook.handle = module.register_forward_pre_hook(hook)
        return hook


class _OutlierHook:
    """The forward pre-hook; ``step`` (0-based) is the loop's, None outside training."""

    def __init__(self, stress: OutlierStress) -> None:
        self.stress = stress
        self.step: int | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.step is None or not module.training or not self.stress.hits(self.step):
            return None
        (x, *rest) = args
        x = x.clone()
        # The outlier's size follows the input's own scale, so the ratio to the other
        # values (what delayed scaling cannot hold) is ``factor`` whatever the layer.
        amax = x.detach().abs().amax().float()
        x[(0,) * x.dim()] = (amax * self.stress.factor).to(x.dtype)
        return (x, *rest)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def parse_stress(text: str) -> OutlierStress:
    """Read a ``LabConfig.stress`` string (module docstring); ``ValueError`` saying what
    is wrong and the syntax."""
    if not isinstance(text, str):
        raise ValueError(f"stress must be a string ({_SYNTAX}), got {text!r}")
    kind, _, rest = text.partition(":")
    if kind != "outlier":
        raise ValueError(f"unknown stress {kind!r} in {text!r}; known: {_SYNTAX}")
    parts = rest.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"stress {text!r}: expected {_SYNTAX}")
    layer, every_s, factor_s = parts
    try:
        every, factor = int(every_s), float(factor_s)
    except ValueError:
        raise ValueError(
            f"stress {text!r}: <every> must be an int and <factor> a number ({_SYNTAX})"
        ) from None
    if every < 1:
        raise ValueError(f"stress {text!r}: <every> must be >= 1, got {every}")
    if not (math.isfinite(factor) and factor > 1):
        raise ValueError(
            f"stress {text!r}: <factor> must be a finite number > 1 (times the input's "
            f"amax), got {factor}"
        )
    return OutlierStress(layer, every, factor)


# The policies a "+guard" precision may run (fp8train.Guard's).
GUARD_POLICIES = ("warn", "skip", "demote", "rollback")
_GUARD_SYNTAX = (
    "<policy>[:<rung>,<rung>...] with policy warn, skip, demote or rollback and, for "
    "demote and rollback, a ladder of recipes ending optionally with 'high', e.g. "
    "demote:rowwise,high"
)


@dataclass(frozen=True)
class GuardSpec:
    """What ``LabConfig.guard`` asks of a ``+guard`` precision's :class:`fp8train.Guard`."""

    policy: str
    demote_to: tuple[str, ...] | None  # None: the Guard's default ladder ("high",)


def parse_guard(text: str) -> GuardSpec:
    """Read ``LabConfig.guard``: ``"<policy>[:<ladder>]"``; ``ValueError`` with the
    syntax. The ladder's recipes are checked against the model when the Guard is built."""
    if not isinstance(text, str):
        raise ValueError(f"guard must be a string ({_GUARD_SYNTAX}), got {text!r}")
    policy, sep, ladder = text.partition(":")
    if policy not in GUARD_POLICIES:
        raise ValueError(f"guard {text!r}: unknown policy {policy!r}; expected {_GUARD_SYNTAX}")
    if not sep:
        return GuardSpec(policy, None)
    if policy not in ("demote", "rollback"):
        raise ValueError(f"guard {text!r}: only demote and rollback take a ladder")
    rungs = tuple(r.strip() for r in ladder.split(","))
    if not all(rungs):
        raise ValueError(f"guard {text!r}: empty rung in the ladder; expected {_GUARD_SYNTAX}")
    return GuardSpec(policy, rungs)
