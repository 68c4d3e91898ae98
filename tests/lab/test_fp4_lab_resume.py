"""An interrupted nvfp4 lab run resumed from its checkpoint is bit for bit the
uninterrupted one: stochastic rounding and the Hadamard signs draw from streams seeded
by the layers' saved state (LayerState.random_steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lab_helpers import read_results, tiny_compare

from fp8train.lab.cli import main

STEPS = 7


def _compare(out: Path, text_dir: Path, precisions: str, *extra: str, steps: int = STEPS) -> int:
    args = tiny_compare(text_dir, "--steps", str(steps))
    return main([*args, "--precisions", precisions, "--out", str(out), "--quiet", *extra])


def _flatten(run: dict[str, Any]) -> Any:
    return run["curves"], run["final_val_loss"], run["skipped_steps"]


def test_nvfp4_resume_is_bitwise_the_uninterrupted_run(text_dir: Path, tmp_path: Path) -> None:
    precision = "nvfp4~all-fp4"  # every layer FP4: every layer draws random numbers
    full, split = tmp_path / "full", tmp_path / "split"
    assert _compare(full, text_dir, precision) == 0
    assert _compare(split, text_dir, precision, "--stop-at", "4") == 0
    assert not (split / "results.json").exists()
    assert main(["compare", "--resume", "--out", str(split), "--quiet"]) == 0
    a, b = read_results(full)["runs"][precision], read_results(split)["runs"][precision]
    assert _flatten(a) == _flatten(b)  # exact float equality
    ca = torch.load(full / "checkpoints" / f"{precision}-seed0.pt", weights_only=True)
    cb = torch.load(split / "checkpoints" / f"{precision}-seed0.pt", weights_only=True)
    assert ca["step"] == cb["step"] == STEPS
    for key, ta in ca["model"].items():
        if isinstance(ta, torch.Tensor):
            assert torch.equal(ta, cb["model"][key]), key
    layers = ca["recipe_state"]["layers"]
    assert {entry["random_steps"] for entry in layers.values()} == {STEPS}
    assert ca["recipe_state"] == cb["recipe_state"]
