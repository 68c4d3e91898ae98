"""Llama-, Mistral- and Qwen-style decoders built from their published dimensions.

Nothing is downloaded and ``transformers`` is not needed: :class:`Decoder` has the
Linear layers of those models, named as Hugging Face names them
(``model.layers.0.self_attn.q_proj`` ... ``lm_head``), so a plan's layer names and
filters carry over to the real model. Build it on the meta device to plan a 70B model
without memory: the planner only needs each Linear's shapes and token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "ArchConfig", "Decoder", "build"]


@dataclass(frozen=True)
class ArchConfig:
    """The dimensions that fix a decoder's Linear shapes (the fields of the model's
    published ``config.json``: ``hidden_size``, ``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``,
    ``vocab_size``; ``qkv_bias`` as Qwen2 sets it)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Each from the model's config.json on its Hugging Face model card.
ARCHS: dict[str, ArchConfig] = {
    a.name: a
    for a in (
        ArchConfig("llama3-8b", 4096, 14336, 32, 8, 32, 128256),  # meta-llama/Meta-Llama-3-8B
        ArchConfig("llama3-70b", 8192, 28672, 64, 8, 80, 128256),  # meta-llama/Meta-Llama-3-70B
        ArchConfig("llama3.2-1b", 2048, 8192, 32, 8, 16, 128256),  # meta-llama/Llama-3.2-1B
        ArchConfig("mistral-7b", 4096, 14336, 32, 8, 32, 32000),  # mistralai/Mistral-7B-v0.1
        ArchConfig("qwen2.5-7b", 3584, 18944, 28, 4, 28, 152064, True),  # Qwen/Qwen2.5-7B
        ArchConfig("qwen2.5-0.5b", 896, 4864, 14, 2, 24, 151936, True),  # Qwen/Qwen2.5-0.5B
    )
}


class _Attention(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.c = c
        kv = c.kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden, c.hidden, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden, kv, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden, kv, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (batch, seq, hidden)
        c = self.c
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        # grouped-query attention: each kv head serves heads // kv_heads query heads
        k = k.repeat_interleave(c.heads // c.kv_heads, dim=1)  # (b, heads, t, head_dim)
        v = v.repeat_interleave(c.heads // c.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, head_dim)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, c.hidden))
        return out


class _Mlp(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class _Layer(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.hidden)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden)
        self.mlp = _Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class _Body(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.hidden)


class Decoder(nn.Module):
    """A pre-norm decoder with RMSNorm, grouped-query attention (no rotary embedding:
    it has no weights and changes no shape) and a SwiGLU MLP: ``forward(ids)`` maps
    int64 ``(batch, seq)`` to logits ``(batch, seq, vocab)``."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        if config.hidden % config.heads or config.heads % config.kv_heads:
            raise ValueError(f"{config.name}: heads must divide hidden and kv_heads heads")
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)  # (batch, seq, hidden)
        for layer in self.model.layers:
            x = layer(x)
        logits: torch.Tensor = self.lm_head(self.model.norm(x))  # (batch, seq, vocab)
        return logits


def build(name: str | ArchConfig, *, device: str | torch.device = "meta") -> Decoder:
    """The decoder ``name`` (a key of :data:`ARCHS`) or an :class:`ArchConfig`, on
    ``device`` (default meta: shapes only, no memory)."""
    if isinstance(name, str):
        if name not in ARCHS:
            raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
        name = ARCHS[name]
    with torch.device(device):
        return Decoder(name)
