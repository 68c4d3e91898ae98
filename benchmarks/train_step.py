"""Train-step time and saved-for-backward bytes of the lab's reference GPT, per precision.

    python benchmarks/train_step.py [--steps 30] [--warmup 5] [--kernels compiled]

Every precision gets its own model (same initial weights) and optimizer; steps run
interleaved (A B C ... A B C ...) in one process so that machine noise hits all of them
alike; the median step after warm-up is reported with its ratio to bf16 autocast.
Saved bytes: tensors saved for backward in one step, each storage counted once, the
model's parameters excluded (fp8train.lab.train.SavedTensorBytes).
Results: benchmarks/results/train_step-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common

import fp8train
from fp8train.lab.gpt import GPT
from fp8train.lab.train import SavedTensorBytes

# The lab's default preset (fp8train.lab.config.LabConfig).
SHAPE = dict(vocab=256, seq=128, d_model=128, layers=4, heads=4)
BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kernels", choices=["eager", "compiled"], default="compiled")
    parser.add_argument("--precisions", default="bf16,fp32," + ",".join(fp8train.RECIPE_NAMES))
    parser.add_argument("--d-model", type=int, default=SHAPE["d_model"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    shape = {**SHAPE, "d_model": args.d_model}

    torch.manual_seed(0)
    base = GPT(**shape)
    idx = torch.randint(0, 256, (BATCH, shape["seq"] + 1))
    runs = {}
    for p in precisions:
        model = copy.deepcopy(base)
        if p not in ("bf16", "fp32"):
            fp8train.convert(model, p, kernels=args.kernels)
        runs[p] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(p: str, counter: SavedTensorBytes | None = None) -> float:
        model, opt = runs[p]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p != "fp32"):
            if counter is None:
                logits = model(idx[:, :-1])
            else:
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                    logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    saved = {}
    for p in precisions:
        counter = SavedTensorBytes(runs[p][0].parameters())
        step(p, counter)  # also the first warm-up step (compiles the kernels)
        saved[p] = counter.total
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for i in range(args.warmup + args.steps):
        for p in precisions:
            dt = step(p)
            if i >= args.warmup:
                times[p].append(dt)

    ref = "bf16" if "bf16" in precisions else precisions[0]
    med = {p: statistics.median(t) for p, t in times.items()}
    results = {
        p: {
            "median_step_s": med[p],
            "step_time_vs_bf16": med[p] / med[ref],
            "saved_activation_bytes": saved[p],
            "saved_bytes_vs_bf16": saved[p] / saved[ref],
            "times_s": times[p],
        }
        for p in precisions
    }
    targets = {"step_time_vs_bf16_max": 1.15, "saved_bytes_vs_bf16_max": 0.6,
               "recipes_with_speed_target": ["tensorwise", "rowwise", "blockwise", "mxfp8"]}
    rows = [(p, f"{med[p] * 1e3:.1f}", f"{med[p] / med[ref]:.2f}", saved[p],
             f"{saved[p] / saved[ref]:.2f}") for p in precisions]
    print(_common.format_table(["precision", "median step ms", "vs bf16", "saved bytes",
                                "saved vs bf16"], rows))
    if not args.no_write:
        path = _common.write_results("train_step", {
            "config": {"model": shape, "batch": BATCH, "steps": args.steps,
                       "warmup": args.warmup, "kernels": args.kernels,
                       "threads": torch.get_num_threads()},
            "targets": targets, "results": results})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
