"""The FP4 recipes in a layer: the random Hadamard transform of the grad_weight GEMM,
stochastic rounding of dy (bias and seeding), packed saved activations, the last layers
kept in high precision, the kernels they run and the recipe state that resumes them."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import fp8train
from fp8train.autograd import hadamard_matrix, hadamard_tokens, random_signs
from fp8train.cast import cast, unpack_e2m1
from fp8train.recipes import Recipe
from fp8train.scaling import ScaleSpec
from fp8train.testing import sqnr

M, K, N = 100, 64, 48  # M not a multiple of 16: the transform pads the tokens


def _layer(name: str | Recipe, seed: int = 0, kernels: str = "eager") -> fp8train.Fp8Linear:
    torch.manual_seed(seed)
    return fp8train.Fp8Linear(K, N, recipe=name, name="fc", kernels=kernels)  # type: ignore[arg-type]


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.zero_grad()
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(dy)
    assert xi.grad is not None and layer.weight.grad is not None
    return y.detach(), xi.grad, layer.weight.grad.clone()


# ------------------------------------------------------------------ the transform


def test_hadamard_transform_is_orthogonal() -> None:
    state = _layer("nvfp4").fp8_state
    for step in range(4):
        signs = random_signs(state, step, torch.device("cpu"))
        assert set(signs.tolist()) <= {-1.0, 1.0}
        h = hadamard_matrix(signs)
        # Every entry is +-1/4 and every product sum holds 16 terms of +-1/16: exact.
        assert torch.equal(h @ h.t(), torch.eye(16))
        assert torch.equal(h.t() @ h, torch.eye(16))
    signs = [tuple(random_signs(state, s, torch.device("cpu")).tolist()) for s in range(8)]
    assert len(set(signs)) > 1, "a fresh sign vector per backward"
    assert signs[3] == tuple(random_signs(state, 3, torch.device("cpu")).tolist()), "seeded"


def test_hadamard_keeps_dy_t_x_in_float64() -> None:
    x, dy = _data()
    h = hadamard_matrix(random_signs(_layer("nvfp4").fp8_state, 0, torch.device("cpu")))
    xh, dyh = hadamard_tokens(x, h), hadamard_tokens(dy, h)
    assert xh.shape == (112, K) and dyh.shape == (112, N)  # padded to 7 groups of 16
    exact = dy.double().t() @ x.double()
    # Float64 products of the fp32 transformed operands: only the transform's fp32
    # roundings (a few ulps of each element) remain, far below FP4's 2^-2.
    got = dyh.double().t() @ xh.double()
    assert float((got - exact).abs().max()) < 1e-4 * float(exact.abs().max())
    assert not torch.equal(xh[:M], x), "the transform changed the operand"


def test_wgrad_gemm_with_hadamard_against_float64() -> None:
    """dW is the float64 product of the transformed, quantised operands the layer showed
    its observer (to fp32 accumulation), and close to the exact dy^T x."""
    layer = _layer("nvfp4")
    seen: dict[str, fp8train.ScaledTensor] = {}
    layer.fp8_state.observer = lambda s, role, t, q: seen.__setitem__(role, q)  # type: ignore[assignment,misc,func-returns-value]
    x, dy = _data()
    _, _, dw = _step(layer, x, dy)
    assert set(seen) == {"input", "weight", "grad_output", "grad_output.t", "input.t"}
    g, xq = (
        seen["grad_output.t"].dequantize(torch.float64),
        seen["input.t"].dequantize(torch.float64),
    )
    assert g.shape == (112, N) and xq.shape == (112, K)
    ref = g.t() @ xq
    bound = 112 * 2.0**-23 * (g.abs().t() @ xq.abs()) + 1e-30
    assert bool(((dw.double() - ref).abs() <= bound).all())
    exact = dy.double().t() @ x.double()
    # Measured ~12 dB (two E2M1 roundings of x: saved, then after the transform).
    assert sqnr(exact, dw.double()) > 9.0
    # Without the transform the same GEMM quantises dy and x as they are.
    plain = _layer(replace(Recipe.from_name("nvfp4"), hadamard_wgrad=False))
    _, _, dw_plain = _step(plain, x, dy)
    assert not torch.equal(dw_plain, dw)
    assert sqnr(exact, dw_plain.double()) > 9.0


# -------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased() -> None:
    """Each of 64 values, rounded 20,000 times: the mean lies within 5 standard errors
    of the value. A round is lo or lo + step with p = frac, so SE = step * sqrt(p(1-p)/n).
    5 SE: a two-sided normal tail of 5.7e-7 per value, under 4e-5 for all 64 (the seeds
    are fixed, so the test does not flake; the bound says it would rarely fail if they
    were not). Round to nearest, checked the same way, fails it."""
    g = torch.Generator().manual_seed(5)
    values = torch.rand(64, generator=g) * 6.5 - 3.25  # inside E2M1's range, both signs
    values[0] = 0.3  # below the subnormal 0.5
    n = 20_000
    draws = cast(values.repeat(n, 1), "e2m1", rounding="stochastic", generator=g)
    mean = draws.double().mean(0)
    lo = cast(values, "e2m1", rounding="nearest").double()  # for the step only
    grid = torch.tensor(fp8train.E2M1.values, dtype=torch.float64)
    below = grid[torch.searchsorted(grid, values.double(), right=True) - 1]
    above = grid[torch.searchsorted(grid, values.double(), right=True).clamp(max=len(grid) - 1)]
    step = above - below
    p = (values.double() - below) / step
    se = step * torch.sqrt(p * (1 - p) / n)
    z = (mean - values.double()).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, f"max |z| = {float(z.max()):.2f}"
    assert float(((lo - values.double()).abs() / se.clamp_min(1e-12)).max()) > 5.0, "teeth"


def test_stochastic_rounding_of_dy_in_the_layer_is_unbiased() -> None:
    """dx = Q(dy) . W with Q stochastic: averaged over 100 backward passes (each its own
    seeded stream), dx approaches the product of dy rounded without bias, closer than
    any one pass and closer than round-to-nearest's fixed error."""
    layer = _layer("nvfp4")
    x, dy = _data()
    dy = dy[:16]
    x = x[:16]
    w_q = fp8train.quantize(layer.weight.detach(), layer.recipe.weight).dequantize(torch.float64)
    exact = dy.double() @ w_q  # dy unquantised, W as the layer quantises it
    total = torch.zeros_like(exact)
    n = 100
    for _ in range(n):
        _, dx, _ = _step(layer, x, dy)
        total += dx.double()
    one = sqnr(exact, dx.double())
    mean = sqnr(exact, total / n)
    nearest = _layer(
        replace(
            Recipe.from_name("nvfp4"),
            grad_output=replace(layer.recipe.grad_output, rounding="nearest"),
        )
    )
    _, dx_n, _ = _step(nearest, x, dy)
    # 100 rounds: unbiased noise averages down 100x (20 dB); a bias would not.
    assert mean > one + 14, (one, mean)
    assert mean > sqnr(exact, dx_n.double()) + 10


def test_random_streams_come_from_the_layer_state() -> None:
    """The same layer name, step count and data give the same bits whatever torch's
    global random state; the next step draws other numbers; eager and compiled agree."""
    x, dy = _data()
    a, b = _layer("nvfp4"), _layer("nvfp4")
    first = _step(a, x, dy)
    torch.manual_seed(1234)
    again = _step(b, x, dy)
    for u, v in zip(first, again, strict=True):
        assert torch.equal(u, v)
    second = _step(a, x, dy)
    assert not torch.equal(second[1], first[1]), "a new stream per backward"
    assert a.fp8_state.random_steps == 2
    compiled = _layer("nvfp4", kernels="compiled")
    for u, v in zip(first, _step(compiled, x, dy), strict=True):
        assert torch.equal(u, v)


def test_resumed_layer_continues_the_same_streams() -> None:
    x, dy = _data()
    model = nn.Sequential(_layer("nvfp4"))
    for _ in range(2):
        _step(model[0], x, dy)
    state = fp8train.recipe_state_dict(model)
    assert state["layers"]["0"]["random_steps"] == 2
    resumed = copy.deepcopy(model)
    fresh = nn.Sequential(_layer("nvfp4"))
    fresh.load_state_dict(model.state_dict())
    fp8train.load_recipe_state_dict(fresh, state)
    for u, v in zip(_step(resumed[0], x, dy), _step(fresh[0], x, dy), strict=True):
        assert torch.equal(u, v)
    # A recipe without random draws keeps the keys it always had.
    plain = nn.Sequential(_layer("mxfp4"))
    assert "random_steps" not in fp8train.recipe_state_dict(plain)["layers"]["0"]


# ------------------------------------------------------------ memory, kernels, convert


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_saved_input_is_packed(name: str) -> None:
    layer = _layer(name)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(M, K, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert ((M, K // 2), torch.uint8) in saved, saved  # half a byte per element
    assert not any(s == (M, K) for s, _ in saved), "no high-precision copy of x"
    if name == "nvfp4":
        assert ((N, K // 2), torch.uint8) in saved, "W's 16x16 payload, reused by dgrad"


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8"])
def test_saved_scales_cost_a_byte_per_block_and_come_back_bit_for_bit(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E8M0 and E4M3-under-fp32 scale grids are kept for backward as one byte per block
    (codes into a table of the tensor's distinct scales), as those formats store them,
    not as 4-byte fp32; the backward reads the same fp32 scales: its gradients are bitwise
    those of a layer that keeps the fp32 grids."""
    from fp8train import autograd

    x, dy = _data()
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        compact = _step(_layer(name), x, dy)
    block = Recipe.from_name(name).input.block[1]
    codes = [t for t in saved if t.dtype == torch.uint8 and t.shape == (M, K // block)]
    assert codes, [(tuple(t.shape), t.dtype) for t in saved]  # x's scales: a byte per block
    assert not any(t.dtype == torch.float32 and t.shape == (M, K // block) for t in saved)
    if name == "nvfp4":  # MX codes are the scales' E8M0 bytes; nvfp4's index a table
        tables = [t for t in saved if t.dtype == torch.float32 and t.dim() == 1]
        assert tables and all(t.numel() <= 256 for t in tables)
    monkeypatch.setattr(autograd, "_compact_scale", lambda scale, spec: (scale, None))
    whole = _step(_layer(name), x, dy)
    for got, want in zip(compact, whole, strict=True):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8"])
def test_saved_scale_bytes_hold_every_scale_exactly(name: str) -> None:
    """The byte form of a scale grid gives back every fp32 bit, at the ends of the range
    too: all-zero blocks, subnormal and fp32-max magnitudes, blocks 2^40 apart."""
    from fp8train import autograd

    spec = Recipe.from_name(name).input
    rows = [
        torch.zeros(K),
        torch.full((K,), 1e-42),  # subnormal
        torch.full((K,), torch.finfo(torch.float32).max),
        torch.randn(K) * 2.0 ** torch.randint(-40, 40, (K,)).float(),
    ]
    x = torch.stack(rows * 4)
    scale = fp8train.quantize(x, spec).scale
    saved, table = autograd._compact_scale(scale, spec)
    assert saved is not None and saved.dtype == torch.uint8
    back = autograd._expand_scale(saved, table, spec)
    assert back is not None and torch.equal(back.view(torch.int32), scale.view(torch.int32))


def test_fp4_layers_run_the_eager_kernels_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    fp8train.autograd._announce_fp4_eager.cache_clear()
    layer = _layer("mxfp4", kernels="compiled")
    x, dy = _data()
    with caplog.at_level(logging.INFO, logger="fp8train"):
        _step(layer, x, dy)
        _step(layer, x, dy)
    lines = [
        r.getMessage()
        for r in caplog.records
        if "FP4 (E2M1) layers run the eager" in r.getMessage()
    ]
    assert len(lines) == 1 and "'compiled'" in lines[0]
    eager = _step(_layer("mxfp4", kernels="eager"), x, dy)
    for u, v in zip(_step(_layer("mxfp4", kernels="compiled"), x, dy), eager, strict=True):
        assert torch.equal(u, v)


def test_convert_keeps_the_last_layers_in_high_precision(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)], nn.Linear(32, 8))
    with caplog.at_level(logging.INFO, logger="fp8train"):
        fp8train.convert(model, "nvfp4", filter=lambda m, name: name != "6")
    kinds = [type(m).__name__ for m in model]
    # 7 Linear layers; the filter drops the head ("6"); of the 6 left the last 4 stay.
    assert kinds == ["Fp8Linear", "Fp8Linear"] + ["Linear"] * 5
    assert any("last 4 eligible Linear layers" in r.getMessage() for r in caplog.records)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(3)])
    fp8train.convert(model, replace(Recipe.from_name("nvfp4"), high_precision_last=0))
    assert all(isinstance(m, fp8train.Fp8Linear) for m in model)


def test_recipe_fields_are_checked_and_left_out_of_old_states() -> None:
    with pytest.raises(ValueError, match="high_precision_last"):
        replace(Recipe.from_name("nvfp4"), high_precision_last=-1)
    with pytest.raises(TypeError, match="hadamard_wgrad"):
        replace(Recipe.from_name("nvfp4"), hadamard_wgrad=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="E2M1"):
        replace(Recipe.from_name("mxfp8"), input=ScaleSpec("e2m1", "mx", block=(1, 32)))
    canonical = Recipe.from_name("tensorwise").canonical()
    assert "hadamard_wgrad" not in canonical and "high_precision_last" not in canonical
    assert Recipe.from_name("nvfp4").canonical()["high_precision_last"] == "4"


def test_odd_shapes_train() -> None:
    """An odd in_features (packed with a pad nibble) and a token count that is not a
    multiple of 16 (padded for the transform) run and give finite gradients."""
    for name in ("mxfp4", "nvfp4"):
        torch.manual_seed(0)
        layer = fp8train.Fp8Linear(33, 20, recipe=name, kernels="eager")
        x = torch.randn(7, 33, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        assert layer.weight.grad is not None and bool(torch.isfinite(layer.weight.grad).all())
    assert math.isfinite(float(unpack_e2m1(torch.tensor([[0x21]], dtype=torch.uint8), 1)[0, 0]))


def test_cli_recipes_prints_the_fp4_gemms(capsys: pytest.CaptureFixture[str]) -> None:
    from fp8train.lab.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("mxfp4", "nvfp4", "tensorwise"):
        recipe = Recipe.from_name(name)
        assert f"{name}: {recipe.description}\n{recipe.gemms()}" in out
