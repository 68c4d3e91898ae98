"""fp8train.optim.Fp8AdamW: bytes, exactness where promised, resume, and its users."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import fp8train
from fp8train.optim import SECOND_MOMENT_FORMS, Fp8AdamW
from fp8train.testing import assert_bitwise_equal

# The states' bytes per element of a matrix whose rows are whole 128-element blocks:
# two 1-byte payloads plus two fp32 scales per 128 elements.
BYTES_PER_ELEMENT = 2 + 2 * 4 / 128
# After a few steps on Gaussian gradients, the decoded moments sit within a few E4M3
# steps of fp32 AdamW's: E4M3 rounds to 2^-4 relative, and a stored moment carries the
# rounding of every earlier step, decayed by beta.
MOMENT_RTOL = 0.15


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 256, generator=g), torch.randn(16, 64, generator=g)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": matrices, "weight_decay": 0.1},
        {"params": vectors, "weight_decay": 0.0, "lr": 3e-3},
    ]


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    scaler: fp8train.LossScaler | None = None,
    clip: float | None = 1.0,
) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.unscale_(opt)
        else:
            loss.backward()  # type: ignore[no-untyped-call]
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_state_bytes_are_two_per_element_plus_scales() -> None:
    w = nn.Parameter(torch.randn(64, 256))
    b = nn.Parameter(torch.randn(64))
    opt = Fp8AdamW([w, b])
    assert opt.state_bytes() == 0
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    expected = BYTES_PER_ELEMENT * w.numel() + 8 * b.numel()  # the bias keeps fp32 moments
    assert opt.state_bytes() == expected
    assert Fp8AdamW.state_bytes_for([w, b]) == expected
    # A row shorter than a block still has one scale per row: 100 + 4 bytes per moment.
    assert Fp8AdamW.state_bytes_for([torch.empty(3, 100)]) == 2 * 3 * (100 + 4)
    # Rows of one element would pay 4 bytes of scale per payload byte: fp32 moments.
    column = nn.Parameter(torch.randn(5, 1))
    column.grad = torch.randn_like(column)
    opt = Fp8AdamW([column])
    opt.step()
    assert opt.state_bytes() == Fp8AdamW.state_bytes_for([column]) == 8 * 5
    assert opt.state[column]["exp_avg"].dtype == torch.float32


def test_vectors_step_bitwise_like_torch_adamw() -> None:
    """Parameters with fewer than 2 dims keep fp32 moments and torch's arithmetic."""
    ours = nn.Parameter(torch.randn(300))
    ref = nn.Parameter(ours.detach().clone())
    opt = Fp8AdamW([ours], lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(300)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert_bitwise_equal(ours.detach(), ref.detach())


@pytest.mark.parametrize("form", SECOND_MOMENT_FORMS)
def test_moments_track_fp32_adamw(form: str) -> None:
    ours = nn.Parameter(torch.randn(32, 256))
    ref = nn.Parameter(ours.detach().clone())
    opt = Fp8AdamW([ours], lr=1e-3, betas=(0.9, 0.95), second_moment=form)  # type: ignore[arg-type]
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(8):
        g = torch.randn(32, 256)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    moments = opt.moments(ours)
    assert moments is not None
    for got, want in zip(
        moments, (ref_opt.state[ref]["exp_avg"], ref_opt.state[ref]["exp_avg_sq"]), strict=True
    ):
        rel = float((got - want).norm() / want.norm())
        assert rel < MOMENT_RTOL, f"{form}: relative error {rel:.3f}, shape {tuple(got.shape)}"
    state = opt.state[ours]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn
    assert state["exp_avg"].shape == (32, 256) and state["exp_avg_scale"].shape == (32, 2)


def test_sqrt_form_keeps_a_block_spanning_35_binades() -> None:
    """One row whose gradients span 2^17 in magnitude: v spans 2^34, more than E4M3's
    17.8 binades but not sqrt(v)'s. Storing v itself turns the small ones to 0."""
    g = torch.logspace(0, -17, 128, base=2.0).reshape(1, 128)
    zeros = {}
    for form in ("sqrt-e4m3", "e4m3"):
        p = nn.Parameter(torch.zeros(1, 128))
        opt = Fp8AdamW([p], second_moment=form)  # type: ignore[arg-type]
        p.grad = g.clone()
        opt.step()
        moments = opt.moments(p)
        assert moments is not None
        zeros[form] = int((moments[1] == 0).sum())
    assert zeros["sqrt-e4m3"] == 0
    assert zeros["e4m3"] > 0


def test_bitwise_resume_through_state_dict() -> None:
    """Train 3 steps, save, load into a fresh optimizer (and model), train 3 more: the same
    bits as 6 uninterrupted steps, with a loss scaler and clipping in the loop."""
    model = _model()
    opt = Fp8AdamW(_groups(model), lr=1e-3)
    scaler = fp8train.LossScaler(init_scale=2.0**10)
    full = _train(model, opt, range(6), scaler)

    first = _model()
    opt1 = Fp8AdamW(_groups(first), lr=1e-3)
    scaler1 = fp8train.LossScaler(init_scale=2.0**10)
    _train(first, opt1, range(3), scaler1)
    buf = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "scaler": scaler1.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    second = _model(seed=7)  # different initial weights: everything must come from the file
    opt2 = Fp8AdamW(_groups(second), lr=0.5)  # settings come from the file too
    scaler2 = fp8train.LossScaler()
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"])
    state = opt2.state[next(second.parameters())]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn
    assert state["exp_avg_scale"].dtype == torch.float32
    resumed = _train(second, opt2, range(3, 6), scaler2)

    assert resumed == full[3:]
    for a, b in zip(model.parameters(), second.parameters(), strict=True):
        assert_bitwise_equal(a.detach(), b.detach())


def test_loss_scaler_skip_leaves_params_and_states_untouched() -> None:
    model = _model()
    opt = Fp8AdamW(model.parameters(), lr=1e-3)
    scaler = fp8train.LossScaler()
    _train(model, opt, range(2), scaler)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    x, y = _batch(9)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()  # type: ignore[no-untyped-call]
    first = next(model.parameters())
    assert first.grad is not None
    first.grad[0, 0] = torch.inf
    assert scaler.step(opt) is None
    scaler.update()
    for k, v in model.state_dict().items():
        assert_bitwise_equal(v, before[0][k])
    assert opt.state[first]["step"] == before[1]["state"][0]["step"]


@pytest.mark.slow  # ~12 s: two models, 30 steps each
def test_trains_an_unconverted_and_a_converted_model() -> None:
    for model in (_model(), fp8train.convert(_model(), "tensorwise", kernels="eager")):
        opt = Fp8AdamW(_groups(model), lr=3e-3)
        losses = _train(model, opt, range(30))
        assert losses[-1] < 0.9 * losses[0], losses


def test_param_group_settings_apply_per_group() -> None:
    a, b = nn.Parameter(torch.ones(4, 128)), nn.Parameter(torch.ones(4, 128))
    opt = Fp8AdamW([{"params": [a], "lr": 0.0, "weight_decay": 0.0}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert torch.equal(a, torch.ones_like(a))
    assert not torch.equal(b, torch.ones_like(b))


def test_bad_settings_and_inputs_raise() -> None:
    p = nn.Parameter(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="block"):
        Fp8AdamW([p], block=0)
    with pytest.raises(ValueError, match="second_moment"):
        Fp8AdamW([p], second_moment="e3m4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="betas"):
        Fp8AdamW([p], betas=(0.9, 1.0))
    half = nn.Parameter(torch.zeros(2, 8, dtype=torch.bfloat16))
    half.grad = torch.zeros_like(half)
    opt = Fp8AdamW([half])
    with pytest.raises(TypeError, match="float32 master weights"):
        opt.step()
