"""Regenerate the CUDA routing tables in docs/cuda.md from ``fp8train.cuda_gemm``.

    python docs/gen_cuda_routes.py           # rewrite the tables in place
    python docs/gen_cuda_routes.py --check   # exit 1 (and say so) if the file is stale

Only the text between the markers is generated; ``tests/numerics/test_cuda_route.py``
fails when the page does not hold the current tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fp8train import cuda_gemm
from fp8train.recipes import RECIPE_NAMES, Recipe

START = "<!-- cuda-routes:start -->"
END = "<!-- cuda-routes:end -->"
DOC = Path(__file__).with_name("cuda.md")


def render() -> str:
    recipes = {name: Recipe.from_name(name) for name in RECIPE_NAMES}
    parts = []
    for dtype, title in (
        (torch.bfloat16, "bf16 outputs (under bf16 autocast)"),
        (
            torch.float32,
            "fp32 outputs (an fp32 model without autocast)",
        ),
    ):
        parts.append(f"**{title}**\n\n{cuda_gemm.route_table(recipes, dtype)}\n")
    return "\n".join(parts)


def rewrite(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    text = DOC.read_text()
    new = rewrite(text)
    if args.check:
        if new != text:
            print(f"{DOC} is stale: run python docs/gen_cuda_routes.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
