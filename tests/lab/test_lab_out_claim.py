"""Two runs started into one --out: exactly one claims the folder, the other stops with
one line before writing anything; atomic writes of one file from several writers never
share a temporary name."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from lab_helpers import tiny_compare

from fp8train.checkpoint import unique_tmp_path
from fp8train.lab.compare import CLAIM_NAME, _write_json, claim_out_dir
from fp8train.lab.config import LabError


def test_second_claim_of_a_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_out_dir(out)
    with pytest.raises(LabError) as e:
        claim_out_dir(out)
    message = str(e.value)
    assert "\n" not in message
    assert f"{out} already holds a run (claimed by pid {os.getpid()}" in message
    assert "--resume" in message


def test_claims_racing_in_threads_have_one_winner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def claim() -> None:
        start.wait()
        try:
            claim_out_dir(out)
            outcomes.append("won")
        except LabError:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]


def test_run_into_a_claimed_folder_writes_nothing(
    run_cli, text_dir: Path, tmp_path: Path, capsys
) -> None:
    # Another run has claimed the folder and not yet written its config.json: the
    # early "already holds a run" check passes, the claim does not.
    out = tmp_path / "out"
    claim_out_dir(out)
    args = tiny_compare(text_dir, "--precisions", "bf16")
    assert run_cli(*args, "--out", str(out), "--stop-at", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err, err
    assert [p.name for p in out.iterdir()] == [CLAIM_NAME]


def test_a_claimed_run_resumes_in_its_own_folder(run_cli, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = tiny_compare(text_dir, "--precisions", "bf16")
    assert run_cli(*args, "--out", str(out), "--stop-at", "2") == 0
    assert (out / CLAIM_NAME).exists()
    assert run_cli("compare", "--resume", "--out", str(out)) == 0
    assert run_cli(*args, "--out", str(out)) == 2  # a new run is still refused


def test_concurrent_atomic_writes_never_collide(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        try:
            for j in range(100):
                _write_json(path, {"writer": i, "n": j, "pad": "x" * 4096})
        except BaseException as e:  # collected: an exception in a thread is lost
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["n"] == 99  # whole: one writer's last file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_temporary_names_are_unique_and_keep_the_suffix(tmp_path: Path) -> None:
    names = {unique_tmp_path(tmp_path / "loss_curves.png").name for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.endswith(".png") and str(os.getpid()) in n for n in names)
