"""A lab checkpoint is verified before a run resumes from it: a flipped bit or an empty
file is refused with the file and the tensor named; an intact one resumes as before
(test_lab_resume.py checks bit for bit)."""

from __future__ import annotations

from pathlib import Path

import torch
from lab_helpers import read_results, tiny_compare


def _stopped_run(run_cli, text_dir: Path, out: Path) -> Path:
    args = tiny_compare(text_dir, "--precisions", "bf16")
    assert run_cli(*args, "--out", str(out), "--stop-at", "2") == 0
    return out / "checkpoints" / "bf16-seed0.pt"


def test_flipped_weight_bit_is_refused_naming_file_and_tensor(
    run_cli, text_dir: Path, tmp_path: Path, capsys
) -> None:
    ckpt = _stopped_run(run_cli, text_dir, tmp_path / "out")
    weight = torch.load(ckpt, weights_only=True)["model"]["head.weight"]
    data = bytearray(ckpt.read_bytes())
    at = data.find(weight.numpy().tobytes())  # the tensor's bytes lie uncompressed
    assert at >= 0
    data[at + 3] ^= 0x20  # one exponent bit of the first float32 (little-endian)
    ckpt.write_bytes(bytes(data))
    # It still unpickles: only the checksum can tell.
    assert not torch.equal(torch.load(ckpt, weights_only=True)["model"]["head.weight"], weight)
    capsys.readouterr()
    assert run_cli("compare", "--resume", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "model.head.weight" in err and "corrupted" in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_empty_checkpoint_gives_a_reason(run_cli, text_dir: Path, tmp_path: Path, capsys) -> None:
    ckpt = _stopped_run(run_cli, text_dir, tmp_path / "out")
    ckpt.write_bytes(b"")
    capsys.readouterr()
    assert run_cli("compare", "--resume", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {ckpt}: the file is empty (0 bytes)" in err, err


def test_truncated_checkpoint_gives_a_reason(
    run_cli, text_dir: Path, tmp_path: Path, capsys
) -> None:
    ckpt = _stopped_run(run_cli, text_dir, tmp_path / "out")
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    assert run_cli("compare", "--resume", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot read checkpoint {ckpt}: " in err
    assert not err.endswith(":"), err  # a reason follows


def test_intact_checkpoint_resumes(run_cli, text_dir: Path, tmp_path: Path) -> None:
    _stopped_run(run_cli, text_dir, tmp_path / "out")
    assert run_cli("compare", "--resume", "--out", str(tmp_path / "out")) == 0
    assert read_results(tmp_path / "out")["runs"]["bf16"]["curves"]["train_step"][-1] == 6
