"""The lab under a real ``torchrun --nproc-per-node 2 -m fp8train train --dist ...`` (gloo).

The reference is one process training the same global batch as two micro-batches
(``--micro-batches 2``): rank r quantises rows ``[r B/2, (r+1) B/2)`` with its own
activation and gradient scales, exactly as micro-batch r does, and the data-parallel
average of the gradients, ``(g_0 + g_1) / 2``, is what gradient accumulation computes
(a sum of two floats, halved exactly); the logged loss is ``(l_0 + l_1) / 2`` in both.
So a current-scaling recipe (tensorwise here) must match **bit for bit**:

* DDP, with the lab's gradient clipping: every rank holds the whole averaged gradient,
  so the clip norm is the single process's.
* FSDP2 with FP8 weight all-gather, with clipping off (``--grad-clip 1e9``): the gathered
  FP8 weights are bitwise ``quantize(full weight)`` (``test_distributed.py``), so nothing
  else differs. With clipping on, the norm of a sharded gradient is taken shard by shard
  (``(|g_a|^2 + |g_b|^2)^(1/2)``), which rounds differently from the norm of the whole
  gradient (measured: 6.5e-7 relative on step 1's norm of 3.28); the clipped gradients
  then differ in their last bits, and the final loss by ~1e-5 relative after 6 steps.
  FSDP2's checkpoint and resume are checked on the same run.

Against a plain one-process run (no micro-batches) the 2-rank losses are not bitwise:
each rank's FP8 scales come from half the batch, and bf16 autocast turns fp32 summation
order into bf16 rounding flips (measured up to 3e-4 relative after 6 steps). That
difference is the arithmetic of data parallelism, not an error, and is not tested here.

Ranks and references run single-threaded (torchrun sets ``OMP_NUM_THREADS=1`` for its
ranks) so that CPU GEMMs reduce in one order.
"""

from __future__ import annotations

import collections
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import torchrun

from fp8train.lab.cli import main

PRECISION = "tensorwise"
# The tiny preset (6 steps of 4 x 32 bytes, one block, d_model 128); eager kernels, so
# no rank spends its time compiling.
TINY = ["--preset", "tiny", "--precision", PRECISION, "--kernels", "eager", "--quiet"]
NO_CLIP = ["--grad-clip", "1e9"]  # the norm of every step here is ~1-4


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~6 KB text file to train on (the tiny preset needs a few KB)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100))
    )
    return path


def _reference(out: Path, text: Path, *extra: str) -> dict[str, Any]:
    """One process, single-threaded, two micro-batches: what 2 ranks compute."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "train",
                    *TINY,
                    "--data",
                    str(text),
                    "--micro-batches",
                    "2",
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(n)
    return _results(out)


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return results


def _train_ddp(
    tmp_path: Path, text: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``torchrun`` of the tiny preset on 2 DDP ranks, writing to ``out``."""
    args = ["-m", "fp8train", "train", *TINY, "--data", str(text), "--dist", "ddp", *extra]
    return torchrun(*args, "--out", str(out), cwd=tmp_path)


def _assert_same_run(dist: dict[str, Any], ref: dict[str, Any]) -> None:
    a, b = dist["runs"][PRECISION], ref["runs"][PRECISION]
    # Exact float equality: every train and validation loss, and the final one.
    assert a["curves"] == b["curves"]
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["skipped_steps"] == b["skipped_steps"]


def _assert_main_rank_wrote(stdout: str, out: Path) -> None:
    """Rank 0 alone prints and writes: one summary, one record per monitored operand."""
    assert stdout.count(f"wrote {out / 'results.json'}") == 1, stdout
    assert stdout.count(f"{PRECISION}  val loss") == 1, stdout
    records = [
        json.loads(line)
        for line in (out / "monitor" / f"{PRECISION}-seed0.jsonl").read_text().splitlines()
    ]
    keys = collections.Counter(
        (r["step"], r["kind"], r.get("layer"), r.get("role")) for r in records
    )
    assert records and max(keys.values()) == 1, "a second rank wrote monitor records"


def test_train_dist_ddp_is_one_process_with_micro_batches(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "ddp"
    proc = _train_ddp(tmp_path, text, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_main_rank_wrote(proc.stdout, out)
    results = _results(out)
    assert results["distributed"] == {
        "mode": "ddp",
        "world_size": 2,
        "backend": "gloo",
        "fp8_all_gather": [],
        "grad_comm": "fp32",
    }
    assert results["config"]["dist"] == "ddp"
    assert "Data-parallel: ddp over 2 ranks" in (out / "report.md").read_text()
    _assert_same_run(results, _reference(tmp_path / "ref", text))


def test_train_dist_fsdp2_resumed_is_one_process_with_micro_batches(
    tmp_path: Path, text: Path
) -> None:
    out = tmp_path / "fsdp2"
    args = ["-m", "fp8train", "train", *TINY, "--data", str(text), *NO_CLIP]
    # Stop at step 4 (not a checkpoint step of the tiny preset: the stop writes one).
    proc = torchrun(*args, "--dist", "fsdp2", "--out", str(out), "--stop-at", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped after step 4") == 1, proc.stdout
    assert not (out / "results.json").exists()
    ckpt = out / "checkpoints" / f"{PRECISION}-seed0.dcp"
    assert (ckpt / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000004"]

    proc = torchrun(
        "-m", "fp8train", "train", "--resume", "--out", str(out), "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_main_rank_wrote(proc.stdout, out)
    results = _results(out)
    # FP8 all-gather is on by default for a recipe that supports it.
    assert results["distributed"] == {
        "mode": "fsdp2",
        "world_size": 2,
        "backend": "gloo",
        "fp8_all_gather": [PRECISION],
        "grad_comm": "fp32",
    }
    assert (ckpt / "latest").read_text().strip() == "step-000006"
    _assert_same_run(results, _reference(tmp_path / "ref", text, *NO_CLIP))


@pytest.mark.parametrize("grad_comm", ["bf16", "fp8"])
def test_train_dist_ddp_grad_comm_hook_changes_the_gradients(
    tmp_path: Path, text: Path, grad_comm: str
) -> None:
    """--grad-comm registers its hook: the first step's loss (before any gradient has
    crossed the wire) is the fp32 run's bit for bit, the later ones are not, since the
    averaged gradients were rounded to bf16 or E4M3."""
    out = tmp_path / grad_comm
    proc = _train_ddp(tmp_path, text, out, "--grad-comm", grad_comm)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out)
    assert results["config"]["grad_comm"] == grad_comm
    assert results["distributed"]["grad_comm"] == grad_comm
    assert f"gradients averaged in {grad_comm} (" in (out / "report.md").read_text()
    # The fp32 DDP run is bitwise the micro-batch reference (the test above).
    ref = _reference(tmp_path / "ref", text)
    losses = results["runs"][PRECISION]["curves"]["train_loss"]
    ref_losses = ref["runs"][PRECISION]["curves"]["train_loss"]
    assert losses[0] == ref_losses[0]
    assert losses[1:] != ref_losses[1:]
    assert results["runs"][PRECISION]["final_val_loss"] != ref["runs"][PRECISION]["final_val_loss"]


def test_train_dist_batch_must_split_over_the_ranks(tmp_path: Path, text: Path) -> None:
    proc = torchrun(
        "-m",
        "fp8train",
        "train",
        *TINY,
        "--data",
        str(text),
        "--dist",
        "ddp",
        "--batch",
        "5",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    expected = (
        "fp8train: error: --batch 5 is the global batch and must split evenly over "
        "the 2 ranks; use a multiple of 2"
    )
    assert expected in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "fp8train/lab" not in proc.stderr  # no traceback from the ranks
    assert not (tmp_path / "out").exists()


def test_train_dist_without_torchrun_says_how_to_launch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dist", "fsdp2", "--preset", "tiny"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fp8train: error: --dist fsdp2 ")
    assert "torchrun --nproc-per-node 2 -m fp8train train --dist fsdp2" in line
    assert not (tmp_path / "runs").exists()
