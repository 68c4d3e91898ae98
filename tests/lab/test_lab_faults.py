"""Fault tests: a lab run killed with SIGKILL (mid-training, and so at any point of a
checkpoint write) resumes bit for bit; what a write cut short leaves behind is ignored;
a corrupted checkpoint is refused.

Each run is a real process (``python -m fp8train``), so the kill is the one a machine's
out-of-memory killer or a pre-empted job delivers: no handler runs, nothing is flushed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lab_helpers import read_results

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

STEPS = 120  # long enough for a kill to land after the first checkpoints (every 3 steps)
PRECISION = "delayed"  # its amax histories must come back exactly too


def _args(text_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fp8train",
        "compare",
        "--preset",
        "tiny",
        "--data",
        str(text_dir),
        "--steps",
        str(STEPS),
        "--precisions",
        PRECISION,
        "--kernels",
        "eager",
        "--monitor-every",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]


def _resume_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "fp8train", "compare", "--resume", "--out", str(out), "--quiet"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)


def _checkpoint(out: Path) -> Path:
    return out / "checkpoints" / f"{PRECISION}-seed0.pt"


def _kill_after_first_checkpoint(args: list[str], out: Path, delay: float) -> bool:
    """Start the run, SIGKILL it ``delay`` seconds after its first checkpoint appears;
    False if it finished before the kill landed."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _checkpoint(out).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_results(a), read_results(b)
    assert ra["runs"][PRECISION]["curves"] == rb["runs"][PRECISION]["curves"]
    assert ra["runs"][PRECISION]["final_val_loss"] == rb["runs"][PRECISION]["final_val_loss"]
    ca = torch.load(_checkpoint(a), weights_only=True)
    cb = torch.load(_checkpoint(b), weights_only=True)
    assert ca["step"] == cb["step"] == STEPS
    for key, ta in ca["model"].items():
        if isinstance(ta, torch.Tensor):
            assert torch.equal(ta, cb["model"][key]), f"{key} differs after the kill"


@pytest.fixture
def reference(text_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "uninterrupted"
    done = _run(_args(text_dir, out))
    assert done.returncode == 0, done.stderr
    return out


def test_killed_runs_resume_bit_for_bit(text_dir: Path, tmp_path: Path, reference: Path) -> None:
    """Killed at three different moments after its first checkpoint (so also, now and
    then, in the middle of writing one), each time resumed: the same run as never
    killed."""
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        args = _resume_args(out) if attempt else _args(text_dir, out)
        kills += _kill_after_first_checkpoint(args, out, rng.uniform(0.0, 0.4))
    assert kills >= 1, "the run always finished before the kill: raise STEPS"
    resumed = _run(_resume_args(out))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)


def test_what_a_cut_short_write_leaves_is_ignored(
    text_dir: Path, tmp_path: Path, reference: Path
) -> None:
    """A kill during a checkpoint write leaves the previous checkpoint whole (the new one
    goes to a temporary file, renamed when complete) and a partial temporary beside it:
    resuming reads the whole one, ignores the partial one, and ends as if never stopped."""
    out = tmp_path / "cut"
    stopped = _run([*_args(text_dir, out), "--stop-at", "6"])
    assert stopped.returncode == 0, stopped.stderr
    whole = _checkpoint(out).read_bytes()
    partial = _checkpoint(out).with_name(f"{_checkpoint(out).name}.12345.deadbeef.tmp")
    partial.write_bytes(whole[: len(whole) // 3])  # a write cut off a third of the way
    resumed = _run(_resume_args(out))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)


def test_a_corrupted_checkpoint_is_refused(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    stopped = _run([*_args(text_dir, out), "--stop-at", "6"])
    assert stopped.returncode == 0, stopped.stderr
    data = bytearray(_checkpoint(out).read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit, somewhere in the tensors' bytes
    _checkpoint(out).write_bytes(bytes(data))
    resumed = _run(_resume_args(out))
    assert resumed.returncode != 0
    assert "checkpoint" in resumed.stderr and "Traceback" not in resumed.stderr
