"""Delayed scaling under activation checkpointing and gradient accumulation
(fp8train/autograd.py, ``LayerState``): a recomputed forward uses exactly the scales of
the forward it recomputes and records nothing, so training with
``torch.utils.checkpoint`` (reentrant or not) is bitwise equal to training without it;
one forward of a layer is one history step, so micro-batches each record."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fp8train import RECIPE_NAMES, Fp8Linear
from fp8train.testing import assert_bitwise_equal

D = 64  # width of every layer (small: these tests train)
STEPS = 4


class _Net(nn.Module):
    """Three FP8 linears with GELUs between; ``ckpt``: checkpoint the first two as one
    segment and the last as another (``"reentrant"``, ``"non_reentrant"``) or not."""

    def __init__(self, recipe: str, ckpt: str | None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.fcs = nn.ModuleList(
            Fp8Linear(D, D, recipe=recipe, name=f"fc{i}", kernels="eager") for i in range(3)
        )
        with torch.no_grad():
            for fc in self.fcs:
                fc.weight.copy_(torch.randn(D, D, generator=g) / math.sqrt(D))
                fc.bias.copy_(torch.randn(D, generator=g) * 0.1)
        self.ckpt = ckpt

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fcs[1](nn.functional.gelu(self.fcs[0](x))))

    def _last(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fcs[2](x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ckpt is None:
            return self._last(self._first(x))
        reentrant = self.ckpt == "reentrant"
        h = checkpoint(self._first, x, use_reentrant=reentrant)
        out: torch.Tensor = checkpoint(self._last, h, use_reentrant=reentrant)
        return out


def _train(
    recipe: str, ckpt: str | None, steps: int = STEPS, micro: int = 1
) -> tuple[_Net, list[torch.Tensor], list[list[torch.Tensor]]]:
    """Train with SGD on inputs that grow step by step (so that a scale taken from a
    window holding this step's amax differs from the forward's). Returns the model,
    the inputs in order, and every parameter gradient of every optimizer step."""
    model = _Net(recipe, ckpt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(11)
    inputs, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x = torch.randn(8, D, generator=g) * (1.5 ** (step * micro + m))
            # The reentrant checkpoint needs an input that requires grad to build a graph.
            x.requires_grad_(ckpt == "reentrant")
            inputs.append(x)
            model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
    return model, inputs, grads


def _assert_same_training(a: tuple[_Net, object, list[list[torch.Tensor]]], b: object) -> None:
    model_a, _, grads_a = a
    model_b, _, grads_b = b  # type: ignore[misc]
    for ga, gb in zip(grads_a, grads_b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            assert_bitwise_equal(x, y)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert_bitwise_equal(pa.detach(), pb.detach())
    for fa, fb in zip(model_a.fcs, model_b.fcs, strict=True):
        ha, hb = fa.fp8_state.histories, fb.fp8_state.histories
        assert set(ha) == set(hb)
        for role in ha:
            assert ha[role].count == hb[role].count, (fa.fp8_state.name, role)
            assert ha[role].window is not None and hb[role].window is not None
            assert_bitwise_equal(ha[role].window, hb[role].window)


@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
def test_delayed_scaling_is_bitwise_equal_under_checkpointing(ckpt: str) -> None:
    plain = _train("delayed", None)
    checkpointed = _train("delayed", ckpt)
    for fc in checkpointed[0].fcs:
        # One record per forward and per backward: the recompute records nothing.
        assert {r: h.count for r, h in fc.fp8_state.histories.items()} == dict.fromkeys(
            ("input", "weight", "grad_output"), STEPS
        )
    _assert_same_training(checkpointed, plain)


@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("recipe", [r for r in RECIPE_NAMES if r != "delayed"])
def test_current_scaling_is_bitwise_equal_under_checkpointing(recipe: str, ckpt: str) -> None:
    _assert_same_training(_train(recipe, ckpt, steps=2), _train(recipe, None, steps=2))


@pytest.mark.parametrize("ckpt", [None, "reentrant", "non_reentrant"])
def test_each_micro_batch_forward_is_one_history_step(ckpt: str | None) -> None:
    """2 micro-batches x 3 optimizer steps: 6 records per operand, in forward order."""
    model, inputs, _ = _train("delayed", ckpt, steps=3, micro=2)
    fc0 = model.fcs[0].fp8_state
    assert len(inputs) == 6
    for role in ("input", "weight", "grad_output"):
        assert fc0.histories[role].count == 6
    window = fc0.histories["input"].window
    assert window is not None
    recorded = window[:6]  # history_len (16) > 6: no slot was overwritten
    expected = torch.stack([x.detach().abs().amax() for x in inputs])
    assert_bitwise_equal(recorded, expected)


def test_checkpointed_micro_batches_equal_plain_micro_batches() -> None:
    plain = _train("delayed", None, steps=3, micro=2)
    for ckpt in ("reentrant", "non_reentrant"):
        _assert_same_training(_train("delayed", ckpt, steps=3, micro=2), plain)
