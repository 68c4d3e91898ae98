"""Real model code trains under every recipe: the lab's nanoGPT-style GPT and a Hugging
Face Llama built from a small config (no download), eager and under torch.compile."""

from __future__ import annotations

import copy
import importlib
import itertools
from types import ModuleType

import pytest
import torch
from torch import nn

import fp8train
from fp8train.lab.gpt import GPT
from fp8train.nn import Fp8Linear, fp8_layers
from fp8train.testing import assert_bitwise_equal

RECIPES = fp8train.RECIPE_NAMES


def _gpt() -> nn.Module:
    return GPT(vocab=256, seq=32, d_model=64, layers=2, heads=2)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def _train_steps(model: nn.Module, steps: int, compiled: bool = False) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 256, (2, 33), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = _logits(run, idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("build", [_gpt, _llama], ids=["nanogpt", "hf_llama"])
def test_model_trains_eager(build, recipe: str) -> None:
    torch.manual_seed(0)
    model = build()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    fp8train.convert(model, recipe)
    converted = sum(isinstance(m, Fp8Linear) for m in model.modules())
    kept = fp8train.Recipe.from_name(recipe).high_precision_last  # nvfp4 keeps its last 4
    assert converted == n_linear - kept, "every Linear of these models has FP8-friendly shapes"
    before = [p.detach().clone() for p in model.parameters()]
    losses = _train_steps(model, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=False)]
    assert all(changed), "every parameter (FP8 weights included) must receive an update"
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("recipe", RECIPES)
def test_layer_compiled_matches_eager_bitwise(recipe: str) -> None:
    """Eager and torch.compile give bitwise-equal scales and FP8 payloads for every
    operand of every GEMM, and equal outputs and gradients."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 256))
    records: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {"eager": [], "compiled": []}
    models = {}
    for kind, record in records.items():
        model = fp8train.convert(copy.deepcopy(base), recipe)
        for _, layer in fp8_layers(model):
            layer.fp8_state.observer = lambda state, role, t, q, record=record: (
                record.append((role, q.data.clone(), q.scale.clone())) if q is not None else None
            )
        models[kind] = model
    x = torch.randn(4, 40, 128)
    grads = {}
    for kind, model in models.items():
        run = torch.compile(model) if kind == "compiled" else model
        for _ in range(2):  # the second step exercises delayed scaling's history
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = run(xi)
            y.float().square().mean().backward()
        grads[kind] = (y.detach(), xi.grad, model[0].weight.grad)
    eager, compiled = records["eager"], records["compiled"]
    assert [r[0] for r in eager] == [r[0] for r in compiled]
    for (role, data_e, scale_e), (_, data_c, scale_c) in zip(eager, compiled, strict=False):
        assert_bitwise_equal(scale_e, scale_c, what=f"{role} scale")
        assert_bitwise_equal(data_e, data_c, what=f"{role} payload")
    for e, c in zip(grads["eager"], grads["compiled"], strict=False):
        assert torch.equal(e, c)


def test_gpt_trains_compiled() -> None:
    """A whole GPT under torch.compile trains (compiled non-FP8 ops round differently
    from eager, so losses are compared loosely; bitwise equality of the FP8 operands is
    the per-layer test above)."""
    torch.manual_seed(0)
    model = fp8train.convert(_gpt(), "tensorwise")
    eager_model = copy.deepcopy(model)
    compiled = _train_steps(model, 3, compiled=True)
    eager = _train_steps(eager_model, 3)
    assert all(torch.isfinite(torch.tensor(compiled)))
    assert compiled == pytest.approx(eager, rel=2e-2)


class _Stack(nn.Module):
    """Linear + GELU layers of the given widths."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = nn.functional.gelu(layer(x))
        return x


def test_compiled_model_breaks_only_at_fp8_layers_and_compiles_their_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torch.compile(model) every graph break is an FP8 layer's own boundary (not
    its host-side finite check inside the autograd function), and every layer quantises
    with the compiled kernels although convert() was told to keep them eager -- also past dynamo's
    recompile limit (lowered to 2 here), with more layer widths than that."""
    nn_module = importlib.import_module("fp8train.nn")
    torch.manual_seed(0)
    gpt = fp8train.convert(_gpt(), "rowwise")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(gpt)(torch.randint(0, 256, (2, 32)))
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert reasons and all("_forward_with_compiled_kernels" in r for r in reasons), reasons

    # Past the recompile limit with fewer layer widths than dynamo's default of 8 allows:
    # every width compiles its own kernels, which cost most of this test on a cold cache.
    # config.patch, not monkeypatch: pytest >= 9.2 restores attributes missing from an
    # object's __dict__ by deleting them, which hides a dynamo config entry for good.
    with torch._dynamo.config.patch(recompile_limit=2):
        _run_past_the_recompile_limit(monkeypatch, nn_module)


def _run_past_the_recompile_limit(monkeypatch: pytest.MonkeyPatch, nn_module: ModuleType) -> None:
    model = fp8train.convert(_Stack([32, 48, 64, 80, 32]), "rowwise", kernels="eager")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 4 and all(m.fp8_state.kernels.mode == "eager" for m in layers)
    modes: list[str] = []
    real = nn_module.shared_kernels
    monkeypatch.setattr(nn_module, "shared_kernels", lambda mode: modes.append(mode) or real(mode))
    torch._dynamo.reset()
    run = torch.compile(model)
    x = torch.randn(4, 8, 32)
    for _ in range(2):
        modes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(x)
        y.float().square().mean().backward()
        assert modes == ["compiled"] * len(layers), modes
