"""The lab GPT trains under the FP4 recipes: the loss falls and the saved activations
are the packed payloads (bytes measured by the lab). tests/lab/test_fp4_lab_resume.py
resumes an interrupted nvfp4 run."""

from __future__ import annotations

from pathlib import Path

import torch
from lab_helpers import read_results, tiny_compare

from fp8train.lab.cli import main

STEPS = 7


def _compare(out: Path, text_dir: Path, precisions: str, *extra: str, steps: int = STEPS) -> int:
    args = tiny_compare(text_dir, "--steps", str(steps))
    return main([*args, "--precisions", precisions, "--out", str(out), "--quiet", *extra])


def test_lab_gpt_trains_with_packed_fp4_payloads(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp4"
    precisions = ["tensorwise", "mxfp4", "nvfp4~all-fp4"]
    # Eager kernels: FP4 layers run them anyway, and tensorwise's compiled ones would
    # only add compile time.
    assert _compare(out, text_dir, ",".join(precisions), "--kernels", "eager", steps=5) == 0
    runs = read_results(out)["runs"]
    for p in precisions[1:]:
        train = runs[p]["curves"]["train_loss"]
        assert all(map(torch.isfinite, torch.tensor(train)))
        # The tiny preset's loss falls from ~5.5 (uniform bytes) within a few steps.
        assert train[-1] < train[0] - 0.3, (p, train)
    saved = {p: runs[p]["saved_activation_bytes"] for p in precisions}
    # Every Linear input saved as E2M1 bytes (half a byte per element plus the scale
    # grid) instead of E4M3 (one byte): fewer bytes where the layers are FP4.
    assert saved["mxfp4"] < saved["tensorwise"], saved
    assert saved["nvfp4~all-fp4"] < saved["tensorwise"], saved
    # (Measured on this data: tensorwise 956,748 B, mxfp4 678,180 B, nvfp4~all-fp4
    # 812,836 B: its fp32 scale per 16 elements against mxfp4's per 32; nvfp4 with
    # its last 4 Linear layers in bf16, 1,190,948 B.)
