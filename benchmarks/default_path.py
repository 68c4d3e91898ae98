"""The train step a user gets from ``fp8train.convert(model, recipe)`` with no other
argument, against bf16 autocast, on the lab GPT and on a small Hugging Face Llama.

    python benchmarks/default_path.py [--steps 20] [--warmup 3] [--models gpt,llama]

This is the path the README shows: ``convert`` with its defaults (``kernels="auto"``),
every Linear converted, bf16 autocast, fp32 master weights, AdamW. One more row runs
tensorwise with ``kernels="eager"``, the path that was the default before, so the
result also says what the default buys. Every precision gets its own copy of the same
initial model and its own optimizer, and their steps run interleaved (A B C ... A B C
...) in one process, so that a change in machine load hits all of them alike; the median
step after warm-up is reported with its ratio to bf16 in the same run.

Models (random token batches; the data does not change the arithmetic's cost):

* ``gpt``: the lab's default GPT (d_model 128, 4 layers, 4 heads, context 128, batch 16).
* ``llama``: ``transformers.LlamaForCausalLM`` built from a config (hidden 256,
  intermediate 768, 4 layers, 4 heads, vocabulary 1024, context 128, batch 8), no
  download.

Results: ``benchmarks/results/default_path.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common

import fp8train
from fp8train.lab.gpt import GPT
from fp8train.matmul import bf16_gemm_is_native

RECIPES = ["tensorwise", "delayed", "rowwise", "blockwise", "mxfp8"]
SEQ = 128


def lab_gpt() -> tuple[nn.Module, int, int]:
    """The lab's default GPT, its vocabulary and batch size."""
    return GPT(vocab=256, seq=SEQ, d_model=128, layers=4, heads=4), 256, 16


def small_llama() -> tuple[nn.Module, int, int]:
    """A small Llama from its config (no download), its vocabulary and batch size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config), 1024, 8


MODELS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "gpt": lab_gpt,
    "llama": small_llama,
}


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def make_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = logits_of(model, tokens)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def variants(base: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Each precision's model (a copy of ``base``) and the kernel mode its layers run."""
    out: dict[str, tuple[nn.Module, str]] = {"bf16": (copy.deepcopy(base), "-")}
    for recipe in RECIPES:
        out[recipe] = (fp8train.convert(copy.deepcopy(base), recipe), "")
    out["tensorwise, kernels=eager"] = (
        fp8train.convert(copy.deepcopy(base), "tensorwise", kernels="eager"),
        "eager",
    )
    return out


def kernel_mode(model: nn.Module) -> str:
    """The kernel mode the model's FP8 layers resolved to (after a step)."""
    modes = {
        layer.fp8_state.kernels.resolved("cpu")
        for layer in model.modules()
        if isinstance(layer, fp8train.Fp8Linear)
    }
    return ",".join(sorted(modes)) or "-"


def bench_model(name: str, steps: int, warmup: int) -> dict[str, object]:
    torch.manual_seed(0)
    base, vocab, batch = MODELS[name]()
    tokens = torch.randint(0, vocab, (batch, SEQ))
    targets = torch.randint(0, vocab, (batch, SEQ))
    runs = variants(base)
    names = list(runs)
    fns = [make_step(runs[p][0], tokens, targets) for p in names]
    timings = _common.time_interleaved(fns, warmup=warmup, repeats=steps)
    bf16 = timings[0]["median_s"]
    rows = []
    for p, t in zip(names, timings, strict=True):
        model = runs[p][0]
        n_fp8 = sum(isinstance(m, fp8train.Fp8Linear) for m in model.modules())
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        rows.append(
            {
                "precision": p,
                "kernels": kernel_mode(model),
                "fp8_linears": f"{n_fp8}/{n_linear}",
                "median_ms": 1e3 * t["median_s"],
                "min_ms": 1e3 * t["min_s"],
                "vs_bf16": t["median_s"] / bf16,
                "times_s": t["times_s"],
            }
        )
    return {"model": name, "tokens_per_step": batch * SEQ, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--models", default="gpt,llama", help=f"from {','.join(MODELS)}")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {','.join(MODELS)}")
    results = [bench_model(m, args.steps, args.warmup) for m in models]
    for r in results:
        print(f"\n{r['model']} ({r['tokens_per_step']} tokens a step)")
        rows = r["rows"]
        assert isinstance(rows, list)
        print(
            _common.format_table(
                ["precision", "kernels", "FP8 linears", "median ms", "vs bf16"],
                [
                    [x["precision"], x["kernels"], x["fp8_linears"], x["median_ms"], x["vs_bf16"]]
                    for x in rows
                ],
            )
        )
    payload = {
        "config": {"steps": args.steps, "warmup": args.warmup, "models": models},
        "bf16_gemm_native": bf16_gemm_is_native("cpu"),
        "results": results,
    }
    print(f"\nwritten to {_common.write_results('default_path', payload)}")


if __name__ == "__main__":
    main()
