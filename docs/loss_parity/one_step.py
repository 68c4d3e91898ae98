"""One training step of the lab GPT under several precisions, from the same weights and
batch: how far each precision's weight gradients are from fp32's (issue 33).

    python docs/loss_parity/one_step.py [--size d128|d256] [--seeds 3] [PRECISION ...]

For each precision and seed: the SQNR in dB of the loss's gradient with respect to
every Linear weight (all layers together, and the worst layer) against the fp32 run,
and the loss itself. A recipe whose gradients are as close to fp32's as bf16's costs
nothing in this step; the study (run_study.py) says what that adds up to over a run.
No loss scaler: one step in bf16/FP8 overflows nothing here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from fp8train.lab.config import resolve
from fp8train.lab.data import load_corpus, sample_windows
from fp8train.lab.gpt import GPT
from fp8train.lab.train import apply_precision, precision_context

sys.path.insert(0, str(Path(__file__).parent))
from run_study import SIZES

DEFAULT = (
    "bf16",
    "tensorwise",
    "tensorwise~nopow2",
    "torchao-tensorwise",
    "tensorwise~from-bf16",
    "tensorwise~e4m3-grads",
    "rowwise",
    "torchao-rowwise",
)


def _grads(
    precision: str, seed: int, size: str, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    config = resolve("gpt", "default", SIZES[size])
    torch.manual_seed(seed)
    model = GPT(seq=config.seq, d_model=config.d_model, layers=config.layers, heads=config.heads)
    model = apply_precision(model, precision, "eager", fp8_head=config.fp8_head)
    x, y = batch
    with precision_context(precision):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()  # type: ignore[no-untyped-call]
    grads = {
        n: m.weight.grad.double() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    return loss.item(), grads


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (ref - got).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise)) if noise > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("precisions", nargs="*", default=list(DEFAULT))
    parser.add_argument("--size", choices=sorted(SIZES), default="d128")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    config = resolve("gpt", "default", SIZES[args.size])
    corpus = load_corpus(
        config.data, corpus_mb=config.corpus_mb, val_fraction=config.val_fraction, seq=config.seq
    )
    print("| precision | seed | loss | grad SQNR vs fp32, all layers (dB) | worst layer (dB) |")
    print("|---|---|---|---|---|")
    for seed in range(args.seeds):
        batch = sample_windows(
            corpus.train, config.batch, config.seq, torch.Generator().manual_seed(seed)
        )
        _, ref = _grads("fp32", seed, args.size, batch)
        ref_all = torch.cat([g.flatten() for g in ref.values()])
        for precision in args.precisions:
            loss, grads = _grads(precision, seed, args.size, batch)
            got_all = torch.cat([grads[n].flatten() for n in ref])
            worst = min((_sqnr(ref[n], grads[n]), n) for n in ref)
            print(
                f"| {precision} | {seed} | {loss:.4f} | {_sqnr(ref_all, got_all):.2f} | "
                f"{worst[0]:.2f} ({worst[1]}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
