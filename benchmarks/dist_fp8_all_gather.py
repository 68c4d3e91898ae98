"""FSDP2 FP8 weight all-gather on the lab GPT: bytes on the wire and step time.

The lab's default GPT (d_model 128, 4 layers, 4 heads, context 128, global batch 16),
converted with ``tensorwise``, trained with AdamW under ``torchrun`` on gloo. Variants:

* ``ddp``        -- ``setup(model, "ddp")``: full replicas, gradient all-reduce;
* ``fsdp2-bf16`` -- ``setup(model, "fsdp2", param_dtype=bf16)``: bf16 weight all-gather;
* ``fsdp2-fp8``  -- the same with ``fp8_all_gather=True``.

Bytes are measured, not computed: ``torch.distributed.all_gather_single`` (FSDP2's
all-gather) and the Python ``all_reduce`` (the FP8 path's amax reductions) are wrapped
and their input tensors' bytes summed, per rank per step. DDP's bucket all-reduce and
FSDP2's reduce-scatter run in C++ and are not counted (the same in every FSDP2 variant).
A step is forward, backward and
optimizer step; its time is the median over ``--steps`` steps after 2 warm-up steps
(on a shared 2-core CPU the times are indicative only; the byte counts are exact).

Run: ``torchrun --standalone --nproc-per-node 2 benchmarks/dist_fp8_all_gather.py``
(writes ``benchmarks/results/dist_fp8_all_gather.json`` from rank 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_results

import fp8train
from fp8train import distributed as fd
from fp8train.lab.gpt import GPT

VARIANTS: dict[str, dict[str, Any]] = {
    "ddp": {"mode": "ddp"},
    "fsdp2-bf16": {"mode": "fsdp2", "param_dtype": torch.bfloat16},
    "fsdp2-fp8": {"mode": "fsdp2", "param_dtype": torch.bfloat16, "fp8_all_gather": True},
}


class _Counter:
    """Wraps the two collectives and sums the bytes of what each rank sends into them."""

    def __init__(self) -> None:
        self.bytes = {"all_gather": 0, "all_reduce": 0}
        self._orig = (dist.all_gather_single, dist.all_reduce)

    def __enter__(self) -> _Counter:
        ag, ar = self._orig

        def all_gather_single(output: torch.Tensor, input: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.bytes["all_gather"] += input.numel() * input.element_size()
            return ag(output, input, *a, **k)

        def all_reduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.bytes["all_reduce"] += tensor.numel() * tensor.element_size()
            return ar(tensor, *a, **k)

        dist.all_gather_single, dist.all_reduce = all_gather_single, all_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_gather_single, dist.all_reduce = self._orig


def run(variant: str, steps: int, recipe: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = fp8train.convert(GPT(seq=128, d_model=128, layers=4, heads=4), recipe)
    model = fd.setup(model, **VARIANTS[variant])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times, per_step = [], []
    for step in range(steps + 2):
        idx = fd.batch_shard(torch.randint(0, 256, (16, 129), generator=gen))
        with _Counter() as counter:
            t0 = time.perf_counter()
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            dt = time.perf_counter() - t0
        if step >= 2:  # warm-up: lazy init, first all-gathers
            times.append(dt)
            per_step.append(dict(counter.bytes))
    del model, opt
    # Collectives are identical step to step: report the last step's counts.
    return {
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "bytes_per_step": per_step[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recipe", default="tensorwise")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores
    info = fd.init_from_env()
    results = {v: run(v, args.steps, args.recipe) for v in VARIANTS}
    if info.is_main:
        bf16 = results["fsdp2-bf16"]["bytes_per_step"]["all_gather"]
        fp8 = results["fsdp2-fp8"]["bytes_per_step"]["all_gather"]
        rows = [
            [
                v,
                f"{r['step_s_median'] * 1e3:.1f}",
                r["bytes_per_step"]["all_gather"],
                r["bytes_per_step"]["all_reduce"],
            ]
            for v, r in results.items()
        ]
        print(
            format_table(
                ["variant", "step ms (median)", "all-gather B/rank", "all-reduce B/rank"], rows
            )
        )
        print(f"FP8 / bf16 all-gather bytes: {fp8 / bf16:.4f}")
        path = write_results(
            "dist_fp8_all_gather",
            {
                "environment": environment(),
                "world_size": info.world_size,
                "recipe": args.recipe,
                "steps": args.steps,
                "results": results,
                "fp8_over_bf16_all_gather_bytes": fp8 / bf16,
            },
        )
        print(f"wrote {path}")
    import gc

    gc.collect()
    fd.shutdown()


if __name__ == "__main__":
    main()
