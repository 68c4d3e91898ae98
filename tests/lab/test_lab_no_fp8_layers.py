"""A recipe that converts no layer is refused, naming the shape rule and the layers,
instead of training in bf16 under the recipe's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from fp8train.lab.cli import main
from fp8train.lab.train import require_fp8_layers


def test_recipe_that_converts_no_layer_is_refused(
    text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # 72 is not a multiple of 16: every GEMM of the GPT has a 72-wide side.
    args = ["train", "--precision", "tensorwise", "--d-model", "72", "--heads", "4"]
    code = main([*args, "--preset", "tiny", "--data", str(text_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fp8train: error: precision tensorwise would run no FP8")
    # The rule each layer broke (fp8train.Recipe.unsupported_reason) and which layers.
    assert "in_features=72, out_features=216 are not both multiples of 16" in err
    for layer in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "head"):
        assert layer in err
    assert not out.exists()  # refused before any run started


def test_compare_refuses_before_training_any_precision(
    text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["compare", "--precisions", "bf16,rowwise", "--d-model", "72", "--heads", "4"]
    code = main([*args, "--preset", "tiny", "--data", str(text_dir), "--out", str(out), "--quiet"])
    assert code == 2
    assert "precision rowwise would run no FP8" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()  # bf16 did not train first


def test_partly_converted_model_is_accepted() -> None:
    # digits: Linear(64, 128) converts, the 10-class head cannot (10 % 16): a partial
    # conversion is a legitimate run, reported as FP8 linears 1/2.
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    require_fp8_layers(model, "tensorwise")  # no error
    require_fp8_layers(nn.Sequential(nn.Linear(64, 10)), "bf16")  # not a recipe: no check
