"""The training loop is written once against ``fp8train.lab.world.World``: one process
and data-parallel differ only in the world, never in branches of the loop."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fp8train.lab import train
from fp8train.lab.cli import main
from fp8train.lab.config import LabError
from fp8train.lab.world import CHECKPOINT_FORMAT, SingleProcess, World, world_for


class CountingWorld(SingleProcess):
    """One process, counting what the loop asks of its world."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls["shard"] += 1
        return super().shard(batch)

    def mean(self, loss: torch.Tensor) -> float:
        self.calls["mean"] += 1
        return super().mean(loss)

    def grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        self.calls["grad_norm"] += 1
        return super().grad_norm(model, max_norm)

    def save(self, path: Path, run_state: dict[str, Any], *args: Any) -> None:
        self.calls[f"save@{run_state['step']}"] += 1
        super().save(path, run_state, *args)

    def load(self, *args: Any) -> dict[str, Any] | None:
        self.calls["load"] += 1
        return super().load(*args)


def test_the_loop_goes_through_the_world(
    text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = CountingWorld()
    monkeypatch.setattr(train, "world_for", lambda config: world)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(text_dir), "--precision", "bf16"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    # The tiny preset: 6 steps, a checkpoint every 3; inputs and targets are sharded.
    assert world.calls == {
        "load": 1,
        "shard": 12,
        "grad_norm": 6,
        "mean": 6,
        "save@3": 1,
        "save@6": 1,
    }


def test_world_for_picks_by_config() -> None:
    from fp8train.lab.config import resolve

    one: World = world_for(resolve("gpt", "tiny", {}))
    assert isinstance(one, SingleProcess) and one.is_main and one.measures_saved_bytes


def _state(step: int, precision: str = "bf16") -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "precision": precision, "step": step}


def test_single_process_checkpoint_round_trip(tmp_path: Path) -> None:
    world = SingleProcess()
    path = tmp_path / "ckpt" / "bf16-seed0.pt"

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = nn.Sequential(nn.Linear(4, 4))
        return model, torch.optim.AdamW(model.parameters())

    def same_run(state: dict[str, Any]) -> None:
        if state["precision"] != "bf16":
            raise LabError("checkpoint is for another run")

    model, opt = build()
    assert world.load(path, model, opt, None, same_run) is None  # nothing saved yet
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    world.save(path, _state(7), model, opt, None)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

    fresh, fresh_opt = build()
    state = world.load(path, fresh, fresh_opt, None, same_run)
    assert state is not None and state["step"] == 7
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()

    # Another run's checkpoint is refused before it touches the model.
    world.save(path, _state(7, precision="fp32"), model, opt, None)
    other, other_opt = build()
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(LabError, match="another run"):
        world.load(path, other, other_opt, None, same_run)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
