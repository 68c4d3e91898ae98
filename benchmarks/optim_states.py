"""How far FP8 optimizer states drift from fp32 AdamW's, per way of storing them.

    python benchmarks/optim_states.py [--steps 100] [--block 128]

The lab's GPT (default config: d_model 128, 4 layers) trains in fp32 with
``torch.optim.AdamW`` (the lab's betas 0.9 / 0.95, weight decay on matrices). Every
step's gradients are also handed to one ``fp8train.Fp8AdamW`` per second-moment form,
each stepping its own copy of the parameters: the moments depend on the gradients alone,
so every form sees the same gradient stream and its states can be compared element by
element with the reference's. At a few checkpoints we report, over every matrix:

* ``v_rel_err``: ``||v_fp8 - v|| / ||v||`` of the decoded second moment,
* ``v_zero_frac``: the fraction of elements with ``v > 0`` decoded as 0 (their update
  divides by ``eps`` alone),
* ``m_rel_err``: the same norm ratio for the first moment,
* ``update_rel_err``: ``||u_fp8 - u|| / ||u||`` for the step direction
  ``u = m_hat / (sqrt(v_hat) + eps)`` computed from each form's decoded states,
* ``update_max_ratio``: the largest ``|u_fp8| / max|u|`` (an element far above 1 is
  a runaway step).

Results: benchmarks/results/<name>.json (``optim_states``, and
``optim_states-stochastic`` for ``--steps 50 --candidates
e4m3/nearest,sqrt-e4m3/stochastic,e4m3/stochastic``); docs/memory.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import _common
import torch

from fp8train.lab.config import resolve
from fp8train.lab.data import load_corpus
from fp8train.lab.train import gpt_task
from fp8train.optim import SECOND_MOMENT_FORMS, Fp8AdamW


def _direction(m: torch.Tensor, v: torch.Tensor, step: int, betas: tuple[float, float]) -> Any:
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    return (m / bc1) / ((v / bc2).sqrt() + 1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument(
        "--candidates",
        default=",".join(f"{f}/nearest" for f in SECOND_MOMENT_FORMS) + ",sqrt-e4m3/stochastic",
        help="comma-separated <second_moment>/<rounding> pairs",
    )
    ap.add_argument(
        "--name", default="optim_states", help="results file: benchmarks/results/<name>.json"
    )
    args = ap.parse_args()

    config = resolve("gpt", "default", {"steps": args.steps})
    corpus = load_corpus(
        None, corpus_mb=config.corpus_mb, val_fraction=config.val_fraction, seq=config.seq
    )
    task = gpt_task(config, corpus)
    torch.manual_seed(0)
    model = task.build_model()
    betas = (config.beta1, config.beta2)
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [i for i, p in enumerate(params) if p.dim() >= 2]

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [
            {"params": [p for p in ps if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
        ]

    ref = torch.optim.AdamW(groups(params), lr=config.lr, betas=betas)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    shadows = {c: [p.detach().clone() for p in params] for c in candidates}
    opts = {}
    for c in candidates:
        form, rounding = c.split("/")
        opts[c] = Fp8AdamW(
            groups(shadows[c]),
            lr=config.lr,
            betas=betas,
            block=args.block,
            second_moment=form,  # type: ignore[arg-type]
            rounding=rounding,  # type: ignore[arg-type]
        )
    gen = torch.Generator().manual_seed(0)
    report_at = sorted({10, 25, 50, args.steps} & set(range(1, args.steps + 1)))
    results: dict[str, Any] = {
        "config": {
            "steps": args.steps,
            "block": args.block,
            "betas": betas,
            "lr": config.lr,
            "candidates": candidates,
        },
        "matrix_elements": sum(params[i].numel() for i in matrices),
        "checkpoints": {},
    }
    from fp8train.lab.train import lr_at

    for step in range(args.steps):
        for opt in (ref, *opts.values()):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, config)
        x, y = task.sample_batch(gen)
        loss = task.loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        for form, shadow in shadows.items():
            for p, q in zip(params, shadow, strict=True):
                q.grad = p.grad
            opts[form].step()
        ref.step()
        ref.zero_grad(set_to_none=True)
        n = step + 1
        if n not in report_at:
            continue
        row: dict[str, Any] = {"loss": loss.item()}
        for form, shadow in shadows.items():
            sq = {k: 0.0 for k in ("dv", "v", "dm", "m", "du", "u")}
            zeros = positives = 0
            worst = 0.0
            for i in matrices:
                st = ref.state[params[i]]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                got = opts[form].moments(shadow[i])
                assert got is not None
                m8, v8 = got
                u, u8 = _direction(m, v, n, betas), _direction(m8, v8, n, betas)
                sq["dv"] += float((v8 - v).square().sum())
                sq["v"] += float(v.square().sum())
                sq["dm"] += float((m8 - m).square().sum())
                sq["m"] += float(m.square().sum())
                sq["du"] += float((u8 - u).square().sum())
                sq["u"] += float(u.square().sum())
                zeros += int(((v8 == 0) & (v > 0)).sum())
                positives += int((v > 0).sum())
                worst = max(worst, float(u8.abs().max() / u.abs().max()))
            row[form] = {
                "v_rel_err": math.sqrt(sq["dv"] / sq["v"]),
                "v_zero_frac": zeros / max(1, positives),
                "m_rel_err": math.sqrt(sq["dm"] / sq["m"]),
                "update_rel_err": math.sqrt(sq["du"] / sq["u"]),
                "update_max_ratio": worst,
            }
        results["checkpoints"][n] = row
        print(f"step {n}: loss {row['loss']:.3f}")
        for form in candidates:
            r = row[form]
            print(
                f"  {form:21s} v {r['v_rel_err']:.4f} (zero {r['v_zero_frac']:.2e}) "
                f"m {r['m_rel_err']:.4f} update {r['update_rel_err']:.4f} "
                f"max|u| ratio {r['update_max_ratio']:.2f}"
            )
    results["state_bytes"] = {
        "fp32_adamw": sum(
            t.numel() * t.element_size()
            for s in ref.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        ),
        "fp8_adamw": next(iter(opts.values())).state_bytes(),
        "parameters": sum(p.numel() for p in params),
    }
    path = _common.write_results(args.name, results)
    print(json.dumps(results["state_bytes"]), f"-> {path}")


if __name__ == "__main__":
    main()
