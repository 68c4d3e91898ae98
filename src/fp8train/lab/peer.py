"""The peer: torchao's float8 training recipes as lab precisions (issue 33).

``torchao-tensorwise`` and ``torchao-rowwise`` convert the model with
``torchao.float8.convert_to_float8_training`` and torchao's own recipe config
(``Float8LinearConfig.from_recipe_name``), with ``emulate=True``: on a CPU torchao's
``torch._scaled_mm`` path takes tens of seconds per GEMM, while its emulation
dequantises both operands to fp32 and multiplies them, the same products an FP8 GEMM
with fp32 accumulation computes. Everything else is the lab's: the same model, initial
weights, batches and seeds, the same bf16 autocast, optimiser and dynamic loss scaler,
and the same layers converted as our recipes convert (:func:`fp8_layer_names`).

What differs from our recipes by construction, and is measured rather than hidden:
torchao's tensorwise scales are not rounded to a power of two (its rowwise ones are),
and it saves the high-precision input for backward and casts it again there.

torchao is an optional extra (``pip install 'fp8train[peer]'``); asking for a peer
precision without it is a ``LabError`` that says so.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from torch import nn

from fp8train.lab.config import LabError

__all__ = ["PEER_EXTRA", "convert_peer", "fp8_layer_names", "is_peer_linear", "require_torchao"]

PEER_EXTRA = "pip install 'fp8train[peer]'"


def require_torchao(precision: str) -> ModuleType:
    """``torchao.float8``, or a ``LabError`` naming the precision and the install line."""
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise LabError(
            f"precision {precision} runs torchao's float8 training, but torchao cannot be "
            f"imported ({e}); install the peer extra: {PEER_EXTRA}"
        ) from None
    module: ModuleType = float8
    return module


def fp8_layer_names(model: nn.Module, *, head: bool = True) -> list[str]:
    """The Linear layers an FP8 precision of the lab converts, in model order: every
    ``nn.Linear``, less the last one (the output head) when ``head`` is False. Our
    recipes take every shape (``Recipe.min_multiple`` is 1), so this is the set
    ``fp8train.convert`` swaps; the peer converts the same one."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names if head else names[:-1]


def convert_peer(model: nn.Module, recipe: str, precision: str, layers: list[str]) -> nn.Module:
    """Swap ``layers`` of ``model`` for torchao's ``Float8Linear`` with torchao's recipe
    ``recipe`` ("tensorwise" or "rowwise"), emulated; return the model."""
    float8 = require_torchao(precision)
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    wanted = set(layers)
    float8.convert_to_float8_training(
        model, config=config, module_filter_fn=lambda _module, fqn: fqn in wanted
    )
    return model  # converted in place (torchao returns the same module)


def is_peer_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a torchao float8 layer (False when torchao is absent)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return False
    return isinstance(module, Float8Linear)
