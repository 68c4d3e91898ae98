"""What the output head's gradient loses in each recipe's grad_output cast.

    python docs/head_gradient.py RUN_DIR [--tokens 2048]

RUN_DIR is a finished ``fp8train compare`` run (its ``checkpoints/`` hold the trained
models). For every FP8 precision in it, the head's gradient of the cross-entropy loss,
``dlogits = softmax(logits) - onehot(target)`` (tokens x vocab, the loss's mean and loss
scale left out: scales are relative to the amax, so they change no fraction below), is
taken on validation windows and quantised with each recipe's ``grad_output`` spec, and
the error is measured against fp32:

- underflow: nonzero values flushed to zero (as the lab's health monitor counts them), and
  the share of those that belong to bytes absent from the training corpus;
- dW error: ``|(q - dlogits)^T h| / |dlogits^T h|`` with ``h`` the head's input, the
  relative error of the head's weight gradient; "from flushed" counts only the flushed
  values' part of it;
- target clipped: tokens whose target-class entry ``p - 1`` saturates (its scaled value
  lies beyond the format's max, 448 for E4M3, and is cut to it).

Written to explain the lab's health maps (the README's lab section quotes a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8train.lab.config import LabConfig
from fp8train.lab.data import eval_windows, load_corpus
from fp8train.lab.gpt import GPT
from fp8train.recipes import Recipe
from fp8train.scaling import ScaleSpec
from fp8train.tensor import quantize

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8")


def head_gradient(model: GPT, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits, h)``: the loss gradient at the head's output and the head's input, fp32,
    one row per token."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0]))
    with torch.no_grad():
        logits = model(x).float().flatten(0, 1)  # (tokens, vocab)
    hook.remove()
    dlogits = torch.softmax(logits, -1) - F.one_hot(y.flatten(), logits.shape[-1]).float()
    return dlogits, seen["h"].float().flatten(0, 1)


def cast_losses(dy: torch.Tensor, h: torch.Tensor, target: torch.Tensor,
                absent: torch.Tensor, spec: ScaleSpec) -> dict[str, float]:
    qt = quantize(dy, spec)
    q = qt.dequantize(torch.float32)
    nonzero = dy != 0
    flushed = nonzero & (q == 0)
    lost = torch.where(flushed, dy, torch.zeros_like(dy))
    dw = (dy.t() @ h).norm()
    # Saturated: the payload is the format's max and the value lost more than rounding
    # (half an ulp, 2^-(mantissa bits + 1) of it) would take: it lay beyond the max.
    on_target = dy.gather(1, target[:, None])
    at_max = qt.data.float().abs().gather(1, target[:, None]) == spec.fmt.max
    rel = (q.gather(1, target[:, None]) - on_target).abs() / on_target.abs()
    clipped = at_max & (rel > 2.0 ** -(spec.fmt.mantissa_bits + 1))
    return {
        "underflow %": 100 * float(flushed.sum() / nonzero.sum()),
        "of which absent bytes %":
            100 * float((flushed & absent).sum() / flushed.sum().clamp(min=1)),
        "largest flushed": float(lost.abs().max()),
        "dW error": float(((q - dy).t() @ h).norm() / dw),
        "dW error from flushed": float((lost.t() @ h).norm() / dw),
        "target clipped %": 100 * float(clipped.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=2048, help="validation tokens to use")
    args = parser.parse_args()
    saved = json.loads((args.run_dir / "config.json").read_text())["config"]
    fields = {f.name for f in dataclasses.fields(LabConfig)}
    config = LabConfig(**{k: v for k, v in saved.items() if k in fields})
    corpus = load_corpus(config.data, corpus_mb=config.corpus_mb,
                         val_fraction=config.val_fraction, seq=config.seq)
    absent = torch.bincount(corpus.train.long().flatten(), minlength=256) == 0  # (vocab,)
    x, y = eval_windows(corpus.val, max(1, args.tokens // config.seq), config.seq)
    specs = {r: Recipe.from_name(r).grad_output for r in RECIPES}
    # The MX spec's other rule, to tell its clipping from its block size.
    specs["mxfp8 rceil"] = dataclasses.replace(specs["mxfp8"], mx_rounding="rceil")
    print(f"{int(absent.sum())} of 256 bytes never occur in the training corpus; "
          f"{x.numel()} validation tokens")
    header = None
    for path in sorted((args.run_dir / "checkpoints").glob("*-seed0.pt")):
        precision = path.name.removesuffix("-seed0.pt")
        if precision not in RECIPES:
            continue
        state = torch.load(path, weights_only=False)
        model = GPT(seq=config.seq, d_model=config.d_model, layers=config.layers,
                    heads=config.heads)
        model.load_state_dict(state["model"])
        dy, h = head_gradient(model, x, y)
        own = [precision] + (["mxfp8 rceil"] if precision == "mxfp8" else [])
        for name in own:
            row = cast_losses(dy, h, y.flatten(), absent, specs[name])
            if header is None:
                header = ["model (step)", "grad_output cast", *row]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            cells = [f"{precision} ({state['step']})", f"{name}: {specs[name].describe()}",
                     *(f"{v:.3g}" for v in row.values())]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
