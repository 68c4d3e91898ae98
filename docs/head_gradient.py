"""What the output head's gradient loses in each recipe's grad_output casts.

    python docs/head_gradient.py RUN_DIR [--tokens 2048]

RUN_DIR is a finished ``fp8train compare`` run (its ``checkpoints/`` hold the trained
models). For every FP8 precision in it, the head's gradient of the cross-entropy loss,
``dy = softmax(logits) - onehot(target)`` (tokens x vocab), is taken on validation
windows and quantised as the FP8 backward does: with the recipe's ``grad_output`` spec for
``grad_input = dy . W`` and with its transpose (scales along the tokens; the same cast for
tensorwise) for ``grad_weight = dy^T . h``. The loss's mean (1/tokens) and the loss scale
are left out; both are powers of two here, and every recipe's scales are powers of two,
so they shift the scaled values by whole binades and change no count below.

Per cast, against fp32:
- underflow: nonzero values flushed to zero, as the lab's health monitor counts them; for
  the row cast also the share of those on bytes absent from the training corpus and the
  largest flushed magnitude;
- clipped: values whose scaled magnitude is beyond ``overflow_threshold`` (464 for E4M3),
  cut to the format's max, as the monitor counts them; for the row cast also the tokens
  whose target-class entry ``p - 1`` is clipped;
- error: of the GEMM the cast feeds, ``|(q - dy) . W| / |dy . W|`` (grad_input, ``W`` the
  head's fp32 weight) and ``|(q - dy)^T . h| / |dy^T . h|`` (grad_weight, ``h`` the head's
  input); "from flushed" counts only the flushed values' part.

Written to explain the lab's health maps (the README's lab section quotes a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fp8train.cast import overflow_threshold
from fp8train.lab.config import from_dict
from fp8train.lab.data import eval_windows, load_corpus
from fp8train.lab.gpt import GPT
from fp8train.lab.world import read_checkpoint
from fp8train.recipes import Recipe
from fp8train.scaling import ScaleSpec, expand_scale
from fp8train.tensor import quantize

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8")


def head_gradient(
    model: GPT, x: torch.Tensor, y: torch.Tensor
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


class Cast(NamedTuple):
    q: torch.Tensor  # the dequantised cast of dy, fp32
    flushed: torch.Tensor  # bool: nonzero in dy, zero in q
    clipped: torch.Tensor  # bool: scaled beyond overflow_threshold, cut to the max


def cast(dy: torch.Tensor, spec: ScaleSpec) -> Cast:
    """``dy`` (tokens, vocab) quantised with ``spec`` and back, and where it lost values."""
    quantised = quantize(dy, spec)
    q = quantised.dequantize(torch.float32)
    # The magnitudes the cast rounds, counted as the health monitor counts them.
    scaled = (dy * expand_scale(quantised.scale, (dy.shape[0], dy.shape[1]), spec)).abs()
    return Cast(q, (dy != 0) & (q == 0), scaled > overflow_threshold(spec.fmt))


def error(delta: torch.Tensor, exact: torch.Tensor) -> float:
    return float(delta.norm() / exact.norm())


def head_report(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    absent: torch.Tensor,
    spec: ScaleSpec,
) -> dict[str, float]:
    """What the two casts of ``dy`` (tokens, vocab) under ``spec`` lose: percentages of
    ``dy``'s nonzero values (or of tokens), magnitudes in ``dy``'s units, errors relative
    to the fp32 GEMM (``h``: the head's input, tokens x d; ``weight``: vocab x d;
    ``target``: the class index per token; ``absent``: bool per class)."""
    nonzero = float((dy != 0).sum())
    row, col = cast(dy, spec), cast(dy, spec.transposed())
    lost = torch.where(row.flushed, dy, torch.zeros_like(dy))
    target_clipped = row.clipped.gather(1, target[:, None])
    return {
        "dx cast underflow %": 100 * float(row.flushed.sum()) / nonzero,
        "of which absent bytes %": 100
        * float((row.flushed & absent).sum() / row.flushed.sum().clamp(min=1)),
        "largest flushed": float(lost.abs().max()),
        "dx cast clipped %": 100 * float(row.clipped.sum()) / nonzero,
        "tokens with target clipped %": 100 * float(target_clipped.float().mean()),
        "dx error": error((row.q - dy) @ weight, dy @ weight),
        "dx error from flushed": error(lost @ weight, dy @ weight),
        "dW cast underflow %": 100 * float(col.flushed.sum()) / nonzero,
        "dW cast clipped %": 100 * float(col.clipped.sum()) / nonzero,
        "dW error": error((col.q - dy).t() @ h, dy.t() @ h),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=2048, help="validation tokens to use")
    args = parser.parse_args()
    config = from_dict(json.loads((args.run_dir / "config.json").read_text())["config"])
    corpus = load_corpus(
        config.data, corpus_mb=config.corpus_mb, val_fraction=config.val_fraction, seq=config.seq
    )
    absent = torch.bincount(corpus.train.long().flatten(), minlength=256) == 0  # (vocab,)
    x, y = eval_windows(corpus.val, max(1, args.tokens // config.seq), config.seq)
    specs = {r: Recipe.from_name(r).grad_output for r in RECIPES}
    # The MX spec's other rule, to tell its clipping from its block size.
    specs["mxfp8 rceil"] = dataclasses.replace(specs["mxfp8"], mx_rounding="rceil")
    print(
        f"{int(absent.sum())} of 256 bytes never occur in the training corpus; "
        f"{x.numel()} validation tokens\n"
    )
    header = None
    for path in sorted((args.run_dir / "checkpoints").glob("*-seed0.pt")):
        precision = path.name.removesuffix("-seed0.pt")
        if precision not in RECIPES:
            continue
        state = read_checkpoint(path)  # weights_only=True, checksums verified
        model = GPT(
            seq=config.seq, d_model=config.d_model, layers=config.layers, heads=config.heads
        )
        model.load_state_dict(state["model"])
        dy, h = head_gradient(model, x, y)
        own = [precision] + (["mxfp8 rceil"] if precision == "mxfp8" else [])
        for name in own:
            row = head_report(
                dy, h, model.head.weight.detach().float(), y.flatten(), absent, specs[name]
            )
            if header is None:
                header = ["model (step)", "grad_output cast", *row]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            cells = [
                f"{precision} ({state['step']})",
                f"{name}: {specs[name].describe()}",
                *(f"{v:.3g}" for v in row.values()),
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
