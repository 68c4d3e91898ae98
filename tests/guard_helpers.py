"""Shared by tests/test_diagnosis.py and tests/test_guard.py: a small FP8 MLP, a data
stream whose position is its state, a training loop through the guard, and faults
injected into one layer's operand at one step."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fp8train
from fp8train.guard import Guard, GuardThresholds
from fp8train.monitor import HealthWarning

D_IN, HIDDEN, D_OUT, BATCH = 32, 64, 16, 24
# The loss and gradient triggers judge from 8 steps on (16 by default): short test runs.
TH = GuardThresholds(min_history=8)


def make_model(recipe: str = "tensorwise") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, D_OUT),
    )
    return fp8train.convert(model, recipe)


class Batches:
    """A deterministic stream of regression batches whose position is its state."""

    def __init__(self, seed: int = 1) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.target = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(7))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(BATCH, D_IN, generator=self.gen)
        return x, x @ self.target

    def state_dict(self) -> Any:
        return self.gen.get_state()

    def load_state_dict(self, state: Any) -> None:
        self.gen.set_state(state)


def train(
    guard: Guard, data: Batches, steps: int, before: Callable[[int], None] | None = None
) -> list[float]:
    """Train until ``guard.step_count == steps``; ``before(step)`` runs before each."""
    model = guard.model
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HealthWarning)
        while guard.step_count < steps:
            if before is not None:
                before(guard.step_count)
            x, y = data.next()

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses.append(guard.step(closure))
    return losses


class Fault:
    """Injects a fault into one layer at one step, while that layer runs in FP8."""

    def __init__(self, model: nn.Module, layer: str, at: int, kind: str) -> None:
        self.module = model.get_submodule(layer)
        self.at, self.kind, self.step = at, kind, -1
        if kind == "grad_output":
            self.module.register_full_backward_pre_hook(self._grad_hook)
        else:
            self.module.register_forward_pre_hook(self._input_hook)

    def before(self, step: int) -> None:
        self.step = step

    def _active(self) -> bool:
        return self.step == self.at and not self.module.fp8_state.high_precision

    def _grad_hook(self, module: nn.Module, grad_output: Any) -> Any:
        if not self._active():
            return None
        g = grad_output[0].clone()
        g[0, 0] = g.abs().max() * 1e12  # one outlier: E5M2's scale flushes the rest
        return (g,)

    def _input_hook(self, module: nn.Module, args: Any) -> Any:
        if not self._active():
            return None
        x = args[0].clone()
        x[0, 0] = math.nan if self.kind == "nan" else x.abs().max() * 1e7
        return (x,)
