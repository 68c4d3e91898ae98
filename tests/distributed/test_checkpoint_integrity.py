"""A ``torch.distributed.checkpoint`` folder from fp8train.distributed is verified before
it is restored (a flipped bit names the shard file and the tensor) and never runs code:
a crafted ``.metadata`` is refused unread. One process, no process group: the same code
every rank runs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fp8train import distributed as fd
from fp8train.checkpoint import CheckpointError
from fp8train.distributed.checkpoint import MANIFEST_NAME


@pytest.fixture(autouse=True)
def _no_dcp_single_process_warning() -> Any:
    with warnings.catch_warnings():
        # DCP warns that it loads without a process group, which is the point here.
        warnings.simplefilter("ignore", UserWarning)
        yield


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    return model, torch.optim.AdamW(model.parameters())


def _saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model, opt = _trained()
    path = tmp_path / "ckpt"
    fd.save_checkpoint(path, model, opt, extra={"step": 3})
    return path, model


def test_intact_checkpoint_loads_bit_for_bit(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    assert (path / MANIFEST_NAME).exists()
    fresh, opt = _fresh()
    assert fd.load_checkpoint(path, fresh, opt) == {"step": 3}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_flipped_bit_names_file_and_tensor(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    weight = model.state_dict()["1.weight"]
    (shard,) = path.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at >= 0
    data[at + 3] ^= 0x20  # one exponent bit of a float32
    shard.write_bytes(bytes(data))
    fresh, opt = _fresh()
    before = [p.clone() for p in fresh.parameters()]
    why = re.escape("tensor model.1.weight does not match")
    with pytest.raises(CheckpointError, match=why) as e:
        fd.load_checkpoint(path, fresh, opt)
    assert str(shard) in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{MANIFEST_NAME} is missing")):
        fd.load_checkpoint(path, *_fresh())


class _Payload:
    """What an attacker pickles: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("manifest_too", [False, True])
def test_crafted_metadata_never_runs(tmp_path: Path, manifest_too: bool) -> None:
    path, _ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(_Payload(marker))
    (path / ".metadata").write_bytes(crafted)
    if manifest_too:  # an attacker who rewrites the checksums as well
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        manifest["metadata_sha256"] = hashlib.sha256(crafted).hexdigest()
        (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    why = "refusing to unpickle" if manifest_too else "does not match its checksum"
    with pytest.raises(CheckpointError, match=why) as e:
        fd.load_checkpoint(path, *_fresh())
    assert str(path / ".metadata") in str(e.value)
    if manifest_too:
        assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists()


def test_crafted_metadata_without_manifest_never_runs(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (path / MANIFEST_NAME).unlink(missing_ok=True)
    with pytest.raises(CheckpointError):
        fd.load_checkpoint(path, *_fresh())
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        fd.checkpoint.read_metadata(path)
    assert not marker.exists()
