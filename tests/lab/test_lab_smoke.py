"""The CLI end to end on a tiny preset: every output file, and numbers that make sense."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lab_helpers import FP8_PRECISIONS, read_results, tiny_compare

import fp8train.matmul

RUN_KEYS = {
    "final_val_loss",
    "val_loss_gap_vs_bf16_pct",
    "val_loss_gap_vs_bf16_se_pct",
    "median_step_s",
    "step_time_vs_bf16",
    "saved_activation_bytes",
    "skipped_steps",
    "curves",
    "verdict",
    "per_seed",
}
TOP_KEYS = {"config", "versions", "data", "corpus_sha256", "seeds", "noise_floor", "runs"}
# A byte model starts at ln(256) = 5.55 nats; a few steps cannot leave (0, 6.5).
LOSS_RANGE = (0.0, 6.5)


def check_outputs(out: Path, precisions: list[str], steps: int) -> dict[str, Any]:
    for name in ("results.json", "loss_curves.png", "report.md", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = read_results(out)
    assert results.keys() >= TOP_KEYS
    assert len(results["corpus_sha256"]) == 64
    assert results["config"]["precisions"] == precisions
    assert {"python", "torch", "fp8train", "platform", "cpu_count"} <= results["versions"].keys()
    assert list(results["runs"]) == precisions
    for precision, run in results["runs"].items():
        assert run.keys() >= RUN_KEYS, precision
        assert LOSS_RANGE[0] < run["final_val_loss"] < LOSS_RANGE[1], precision
        assert math.isfinite(run["val_loss_gap_vs_bf16_pct"])
        assert 0 < run["median_step_s"] < 60
        assert run["step_time_vs_bf16"] > 0
        assert run["saved_activation_bytes"] > 0
        assert run["skipped_steps"] >= 0
        curves = run["curves"]
        assert curves["train_step"] == list(range(1, steps + 1))
        assert len(curves["train_loss"]) == steps
        assert curves["val_step"][0] == 0 and curves["val_step"][-1] == steps
        assert all(
            LOSS_RANGE[0] < v < LOSS_RANGE[1] for v in curves["train_loss"] + curves["val_loss"]
        )
        # training lowers the loss even in a few steps
        assert curves["val_loss"][-1] < curves["val_loss"][0]
    assert results["runs"]["bf16"]["val_loss_gap_vs_bf16_pct"] == 0.0
    assert results["runs"]["bf16"]["step_time_vs_bf16"] == 1.0
    report = (out / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report
    # The report says when bf16 GEMMs had no hardware (the ratio to bf16 then misleads).
    native = results["versions"]["bf16_gemm_native"]
    assert native == fp8train.matmul.bf16_gemm_is_native("cpu")
    assert ("no hardware for bf16 GEMMs" in report) is (not native)
    for precision in precisions:
        assert f"| **{precision}** |" in report
        assert f"- **{precision}**: " in report
    return results


def test_compare_tiny_fp32_bf16(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        run_cli(
            "compare",
            "--preset",
            "tiny",
            "--data",
            str(text_dir),
            "--precisions",
            "fp32,bf16",
            "--out",
            str(out),
        )
        == 0
    )
    results = check_outputs(out, ["fp32", "bf16"], steps=6)
    # one seed: no standard error, and the verdict says so
    assert results["runs"]["fp32"]["val_loss_gap_vs_bf16_se_pct"] is None
    assert "no standard error" in results["runs"]["fp32"]["verdict"]
    assert (
        results["noise_floor"]["fp32_vs_bf16_gap_pct"]
        == results["runs"]["fp32"]["val_loss_gap_vs_bf16_pct"]
    )
    # the hidden and the binary file are not part of the corpus
    assert results["data"]["files"] == 3


def test_compare_two_seeds_reports_standard_error(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = ["--steps", "3", "--precisions", "bf16,fp32", "--seeds", "2", "--out", str(out)]
    assert run_cli(*tiny_compare(text_dir, *options)) == 0
    results = check_outputs(out, ["bf16", "fp32"], steps=3)
    fp32 = results["runs"]["fp32"]
    assert results["seeds"] == [0, 1]
    assert [s["seed"] for s in fp32["per_seed"]] == [0, 1]
    assert fp32["val_loss_gap_vs_bf16_se_pct"] is not None
    assert "SE" in fp32["verdict"]


def test_train_one_precision(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        run_cli(
            "train",
            "--precision",
            "bf16",
            "--preset",
            "tiny",
            "--data",
            str(text_dir),
            "--out",
            str(out),
        )
        == 0
    )
    results = check_outputs(out, ["bf16"], steps=6)
    assert results["command"] == "train"


def test_lab_layers_default_to_the_compiled_kernels() -> None:
    # The lab's default kernels are the compiled ones, and they reach every FP8 layer; the
    # CLI runs in these tests take eager kernels, which compile nothing, since compiled ==
    # eager is what tests/test_kernels*.py hold (the lab's own training step included).
    from fp8train.lab.config import resolve
    from fp8train.lab.gpt import GPT
    from fp8train.lab.train import apply_precision
    from fp8train.nn import fp8_layers

    config = resolve("gpt", "default", {})
    assert config.kernels == "compiled"
    model = apply_precision(
        GPT(vocab=256, seq=16, d_model=32, layers=1, heads=2), "tensorwise", config.kernels
    )
    layers = [layer for _, layer in fp8_layers(model)]
    assert layers and all(layer.fp8_state.kernels.mode == "compiled" for layer in layers)


def test_default_out_dir_is_timestamped(run_cli, text_dir: Path, tmp_path: Path) -> None:
    assert run_cli("train", "--preset", "tiny", "--data", str(text_dir), "--steps", "2") == 0
    (out,) = (tmp_path / "runs").iterdir()
    assert (out / "results.json").exists()


def test_compare_tiny_fp8_recipes(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    precisions = ["bf16", *FP8_PRECISIONS]
    assert (
        run_cli(
            "compare",
            "--preset",
            "tiny",
            "--data",
            str(text_dir),
            "--precisions",
            ",".join(precisions),
            "--out",
            str(out),
            # Eager kernels: compiling every recipe's kernels afresh took 765 s of a cold
            # CI run here (see test_lab_layers_default_to_the_compiled_kernels).
            "--kernels",
            "eager",
        )
        == 0
    )
    results = check_outputs(out, precisions, steps=6)
    for precision in FP8_PRECISIONS:
        assert results["runs"][precision]["loss_scaler"] is not None, precision


def test_fp8_activation_storage_variant(run_cli, text_dir: Path, tmp_path: Path) -> None:
    # "<recipe>+fp8act" trains the same recipe with FP8 storage of the saved activations:
    # fewer saved bytes, and (backward sees rounded activations) a different trajectory.
    out = tmp_path / "out"
    precisions = ["bf16", "rowwise", "rowwise+fp8act"]
    args = [
        "compare",
        "--preset",
        "tiny",
        "--data",
        str(text_dir),
        "--out",
        str(out),
        "--kernels",
        "eager",
    ]  # compiled == eager: tests/test_activations.py
    assert run_cli(*args, "--precisions", ",".join(precisions)) == 0
    runs = check_outputs(out, precisions, steps=6)["runs"]
    plain, stored = runs["rowwise"], runs["rowwise+fp8act"]
    assert stored["saved_activation_bytes"] < 0.8 * plain["saved_activation_bytes"]
    assert stored["curves"]["train_loss"][0] == plain["curves"]["train_loss"][0]  # same forward
    assert stored["curves"]["train_loss"][1:] != plain["curves"]["train_loss"][1:]
    assert stored["loss_scaler"] is not None
