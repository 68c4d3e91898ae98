"""Every layer of the lab's models runs in FP8 whatever its width: the emulation takes any
shape and the CUDA route pads to its kernels' multiples, so a width such as 72 or the
digits classifier's 10-way head no longer leaves layers in high precision."""

from __future__ import annotations

import torch
from torch import nn

import fp8train
from fp8train.lab.config import FP8_RECIPES
from fp8train.lab.gpt import GPT
from fp8train.lab.train import apply_precision


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_gpt_of_width_72_converts_every_linear() -> None:
    # 72 is not a multiple of 16: before padding, no GEMM of this GPT could run in FP8.
    model = GPT(seq=16, d_model=72, layers=2, heads=4)
    apply_precision(model, "tensorwise")
    linears = _linears(model)
    assert linears and all(isinstance(m, fp8train.Fp8Linear) for m in linears)
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    logits.float().sum().backward()
    assert all(m.weight.grad is not None for m in linears)


def test_digits_classifier_runs_both_layers_in_fp8() -> None:
    # The digits task's 64 -> 128 -> 10 MLP: the 10-way head is FP8 too, every recipe.
    for precision in FP8_RECIPES:
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        apply_precision(model, precision)
        assert all(isinstance(m, fp8train.Fp8Linear) for m in _linears(model)), precision
        model(torch.randn(8, 64)).sum().backward()
