"""The lab's ablation precisions ("<recipe>~<ablation>") and the torchao peer
("torchao-tensorwise", "torchao-rowwise"), issue 33."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lab_helpers import read_results, tiny_compare
from torch import nn

import fp8train
from fp8train import E4M3, Recipe
from fp8train.lab import config
from fp8train.lab.config import LabError, check_precision, recipe_for
from fp8train.lab.gpt import GPT
from fp8train.lab.train import apply_precision, require_fp8_layers


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=256, seq=16, d_model=32, layers=1, heads=2)


# ------------------------------------------------------------------- precision names


def test_ablation_names_build_the_recipe_variants() -> None:
    tw = Recipe.from_name("tensorwise")
    r = recipe_for("tensorwise~nopow2")
    assert r is not None and r.name == "tensorwise"
    assert not any(getattr(r, s).power_of_two for s in ("input", "weight", "grad_output"))
    assert recipe_for("tensorwise~hpsave") == replace(tw, save_fp8_activations=False)
    assert recipe_for("tensorwise~from-bf16") == replace(tw, quantize_from="compute_dtype")
    assert recipe_for("tensorwise~hp-fprop") == replace(tw, fp8_fprop=False)
    assert recipe_for("tensorwise~hp-dgrad") == replace(tw, fp8_dgrad=False)
    assert recipe_for("tensorwise~hp-wgrad") == replace(tw, fp8_wgrad=False)
    grads = recipe_for("tensorwise~e4m3-grads")
    assert grads is not None and grads.grad_output.fmt is E4M3
    both = recipe_for("tensorwise~nopow2~hpsave+fp8act")
    assert both is not None and not both.save_fp8_activations
    assert not both.input.power_of_two
    assert "ablation: scales max/amax" in both.description
    # What the rest of the lab keys on: the recipe's name, FP8 storage, the scaler.
    assert config.recipe_of("tensorwise~nopow2+fp8act") == "tensorwise"
    assert config.stores_fp8_activations("tensorwise~nopow2+fp8act")
    assert config.runs_fp8("tensorwise~hpsave") and config.runs_fp8("torchao-rowwise")
    assert config.recipe_of("torchao-tensorwise") is None
    assert config.peer_of("torchao-rowwise") == "rowwise" and config.peer_of("rowwise") is None
    assert recipe_for("bf16") is None and recipe_for("torchao-tensorwise") is None
    assert recipe_for("rowwise") == Recipe.from_name("rowwise")


@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ("tensorwise~bogus", "unknown ablation 'bogus'; known: nopow2"),
        ("tensorwise~hpsave~hpsave", "ablation 'hpsave' given twice"),
        ("tensorwise~e5m2-grads", "e5m2-grads changes nothing in recipe tensorwise"),
        ("tensorwise~from-input", "from-input changes nothing"),
        ("mxfp8~nopow2", "nopow2 changes nothing in recipe mxfp8"),
        ("delayed~hp-fprop", "hp-fprop does not apply: .*needs current scaling"),
        ("bf16~nopow2", r"unknown precision 'bf16~nopow2'.*ablations nopow2, pow2"),
        ("torchao-delayed", r"unknown precision.*torchao-tensorwise, torchao-rowwise"),
    ],
)
def test_bad_ablation_names_are_lab_errors(precision: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        check_precision(precision)
    with pytest.raises(LabError, match=message):
        config.resolve("gpt", "tiny", {"precisions": ("bf16", precision)})


def test_ablations_and_peers_stay_out_of_the_default_precisions() -> None:
    default = config.resolve("gpt", "default", {})
    assert default.precisions == config.PRECISIONS
    assert not any("~" in p or p.startswith("torchao") for p in default.precisions)
    for p in ("tensorwise~nopow2", "rowwise~hpsave+fp8act", *config.PEER_PRECISIONS):
        assert config.resolve("gpt", "tiny", {"precisions": (p,)}).precisions == (p,)


# --------------------------------------------------------------------- conversion


def test_variant_layers_run_the_variant_recipe() -> None:
    model = apply_precision(_gpt(), "tensorwise~hp-fprop~nopow2")
    layers = [m for m in model.modules() if isinstance(m, fp8train.Fp8Linear)]
    assert len(layers) == 5  # qkv, attn.proj, fc, mlp.proj, head
    want = recipe_for("tensorwise~hp-fprop~nopow2")
    assert all(m.recipe == want for m in layers)


@pytest.mark.parametrize("precision", ["tensorwise", "rowwise~hpsave"])
def test_fp8_head_false_keeps_the_head_in_high_precision(precision: str) -> None:
    model = apply_precision(_gpt(), precision, fp8_head=False)
    assert type(model.head) is nn.Linear
    converted = [n for n, m in model.named_modules() if isinstance(m, fp8train.Fp8Linear)]
    assert converted == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]


def test_peer_without_torchao_is_a_lab_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(LabError, match=r"torchao-tensorwise .*pip install 'fp8train\[peer\]'"):
        require_fp8_layers(_gpt(), "torchao-tensorwise")
    with pytest.raises(LabError, match=r"pip install 'fp8train\[peer\]'"):
        apply_precision(_gpt(), "torchao-rowwise")


# ------------------------------------------------------------------ with torchao


@pytest.mark.parametrize("fp8_head", [True, False])
def test_peer_converts_the_layers_our_recipes_convert(fp8_head: bool) -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    ours = apply_precision(_gpt(), "tensorwise", fp8_head=fp8_head)
    theirs = apply_precision(_gpt(), "torchao-tensorwise", fp8_head=fp8_head)
    want = [n for n, m in ours.named_modules() if isinstance(m, fp8train.Fp8Linear)]
    got = [n for n, m in theirs.named_modules() if isinstance(m, Float8Linear)]
    assert got == want
    layer = theirs.get_submodule(want[0])
    assert layer.config.emulate and not layer.config.round_scales_to_power_of_2
    rowwise = apply_precision(_gpt(), "torchao-rowwise", fp8_head=fp8_head)
    layer = rowwise.get_submodule(want[0])
    assert layer.config.emulate and layer.config.round_scales_to_power_of_2


def test_peer_tensorwise_is_close_to_ours_without_power_of_two_scales() -> None:
    # The same initial weights and batch through both: torchao's tensorwise (scales not
    # rounded to powers of two) and ours with ~nopow2 take the same scales, so the
    # logits differ only by the order and dtype of the dequantisation arithmetic.
    pytest.importorskip("torchao.float8")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    outs = {}
    for precision in ("torchao-tensorwise", "tensorwise~nopow2", "tensorwise", "bf16"):
        model = apply_precision(_gpt(), precision)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[precision] = model(idx).float()
    peer, ours = outs["torchao-tensorwise"], outs["tensorwise~nopow2"]
    assert peer.dtype == ours.dtype and peer.shape == ours.shape
    gap = (peer - ours).abs().max().item()
    fp8_gap = (outs["tensorwise"] - outs["bf16"]).abs().max().item()
    assert gap < 0.1 * fp8_gap, (gap, fp8_gap)


def test_compare_runs_the_peer_and_an_ablation_beside_bf16(run_cli, text_dir: Path) -> None:
    pytest.importorskip("torchao.float8")
    out = Path("out")
    precisions = ["bf16", "torchao-tensorwise", "tensorwise~nopow2~hpsave"]
    args = tiny_compare(text_dir, "--out", str(out))
    assert run_cli(*args, "--kernels", "eager", "--precisions", ",".join(precisions)) == 0
    runs = read_results(out)["runs"]
    for p in precisions:
        assert not runs[p]["diverged"] and runs[p]["final_val_loss"] < 6.0, p
    assert runs["torchao-tensorwise"]["converted_linears"] == "5/5"
    assert runs["torchao-tensorwise"]["loss_scaler"] == "LossScaler"
    assert runs["tensorwise~nopow2~hpsave"]["converted_linears"] == "5/5"
    assert runs["bf16"]["converted_linears"] == "0/5"
