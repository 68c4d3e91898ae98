"""A byte-level GPT in one file, nanoGPT style.

Pre-LayerNorm blocks, causal self-attention through ``F.scaled_dot_product_attention``,
a GELU MLP and an untied output head. Every matmul with a weight is an ``nn.Linear``,
so ``fp8train.convert`` reaches all of them (the attention score and value matmuls
have no weights and stay in the autocast dtype). No dropout: the lab compares
precisions, and dropout would only add noise to that comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT"]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # batch, sequence, d_model
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (b, t, c)
        # (b, t, c) -> (b, heads, t, c // heads)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, c // heads)
        y = y.transpose(1, 2).reshape(b, t, c)  # (b, t, c)
        out: torch.Tensor = self.proj(y)
        return out


class MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(F.gelu(self.fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT(nn.Module):
    """Byte-level GPT: ``forward(idx)`` maps int64 ``(batch, seq)`` to float logits
    ``(batch, seq, vocab)``; the logits' dtype is whatever the head produces (bf16
    under autocast), so callers upcast before the loss."""

    def __init__(
        self, *, vocab: int = 256, seq: int, d_model: int, layers: int, heads: int
    ) -> None:
        super().__init__()
        self.seq = seq
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)  # untied from tok_emb
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape  # (batch, seq)
        if t > self.seq:
            raise ValueError(f"sequence length {t} exceeds the model's seq ({self.seq})")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (batch, t, d_model)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))  # (batch, t, vocab)
        return logits
