"""The memory ledger (fp8train.lab.memory) and the lab's ``+fp8optim`` precisions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lab_helpers import read_results, tiny_compare

from fp8train.lab.config import LabError, check_precision, recipe_of, uses_fp8_optimizer
from fp8train.lab.memory import LiveTensorBytes, tensor_bytes
from fp8train.lab.report import ledger_markdown

MIB = 2**20


def test_live_bytes_count_each_storage_once_and_forget_freed_ones() -> None:
    a = torch.zeros(1024)  # 4 KiB, allocated before: tracked by hand
    with LiveTensorBytes() as live:
        live.track([a, a[:10], None])
        assert live.current == 4096
        b = torch.ones(2048)  # 8 KiB
        view = b[::2]  # a view adds nothing
        b.add_(1)  # an in-place result adds nothing
        assert live.current == 4096 + 8192
        del b, view
        assert live.current == 4096
        c = torch.ones(256)
        assert live.current == 4096 + 1024
    assert live.peak == 4096 + 8192
    del c


def test_tensor_bytes_dedups_views() -> None:
    x = torch.zeros(100)
    assert tensor_bytes([x, x[:5], None, 3]) == 400


def test_fp8optim_precisions_parse() -> None:
    for p in ("bf16+fp8optim", "tensorwise+fp8optim", "rowwise~hpsave+fp8act+fp8optim"):
        check_precision(p)
        assert uses_fp8_optimizer(p)
    assert recipe_of("rowwise~hpsave+fp8act+fp8optim") == "rowwise"
    for bad in ("fp32+fp8optim", "torchao-tensorwise+fp8optim", "tensorwise+fp8optim+fp8act"):
        with pytest.raises(LabError):
            check_precision(bad)


def test_ledger_table_gives_ratios_to_bf16() -> None:
    ledger = {"parameters": 4 * MIB, "gradients": 4 * MIB, "saved_activations": 8 * MIB}
    results = {
        "runs": {
            "bf16": {"memory": dict(ledger, optimizer_states=8 * MIB, peak=20 * MIB)},
            "bf16+fp8optim": {"memory": dict(ledger, optimizer_states=2 * MIB, peak=14 * MIB)},
            "fp32": {"memory": None},
        }
    }
    table = ledger_markdown(results)
    assert "| **bf16+fp8optim** | 4.00 MiB (1.00x) | 4.00 MiB (1.00x) | 2.00 MiB (0.25x)" in table
    assert "14.00 MiB (0.70x) |" in table
    assert "fp32" not in table.split("\n\n")[0]
    assert ledger_markdown({"runs": {"bf16": {"memory": None}}}) == ""


@pytest.mark.slow  # ~14 s: four tiny lab runs
def test_lab_ledger_end_to_end(run_cli, text_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    precisions = ["bf16", "bf16+fp8optim", "tensorwise", "tensorwise+fp8act+fp8optim"]
    args = tiny_compare(text_dir, "--out", str(out))
    assert run_cli(*args, "--kernels", "eager", "--precisions", ",".join(precisions)) == 0
    runs = read_results(out)["runs"]
    ledgers = {p: runs[p]["memory"] for p in precisions}
    bf16, small = ledgers["bf16"], ledgers["bf16+fp8optim"]
    # The same model: the same parameters and gradients; AdamW's 8 bytes per parameter
    # against about 2 (FP8 matrices) plus 8 for the few 1-D parameters.
    assert small["parameters"] == bf16["parameters"] == bf16["gradients"]
    assert bf16["optimizer_states"] >= 2 * bf16["parameters"]
    assert small["optimizer_states"] < 0.3 * bf16["optimizer_states"]
    assert small["peak"] < bf16["peak"]
    # bf16 autocast runs without a loss scaler; the FP8 runs use one (fp8train.LossScaler).
    assert runs["tensorwise+fp8act+fp8optim"]["loss_scaler"] is not None
    combined = ledgers["tensorwise+fp8act+fp8optim"]
    assert combined["saved_activations"] < ledgers["tensorwise"]["saved_activations"]
    assert combined["peak"] < ledgers["tensorwise"]["peak"]
    for ledger in ledgers.values():
        assert ledger["peak"] > ledger["parameters"] + ledger["optimizer_states"]
    report = (out / "report.md").read_text()
    assert "## Memory ledger" in report and "![memory ledger](memory.png)" in report
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
