"""Launch N ranks of a worker function on this CPU, with a deadline; or a real torchrun.

Ranks are forked from a ``forkserver`` that has already imported torch, FSDP, DCP and
fp8train (a cold ``import torch`` per rank costs seconds on two cores). Each rank gets
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``), runs ``dist_workers.<name>(**kwargs)``, and writes what it returns (or
its traceback) to ``<out_dir>/rank<r>.pt``. Ranks run single-threaded so that GEMM
reduction order, and hence every bit, matches a single-threaded reference.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_PRELOAD = [
    "torch",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "fp8train",
    "fp8train.distributed",
    "dist_workers",
]
_ctx = multiprocessing.get_context("forkserver")
_ctx.set_forkserver_preload(_PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _child(
    name: str,
    rank: int,
    world: int,
    port: int,
    out_dir: str,
    timeout_s: float,
    kwargs: dict[str, Any],
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # A rank still running near the deadline prints where it is before it is killed.
    faulthandler.dump_traceback_later(max(1.0, timeout_s - 2.0), exit=True)
    code = 0
    try:
        import dist_workers

        result: Any = {"ok": getattr(dist_workers, name)(**kwargs)}
    except BaseException:
        result, code = {"error": traceback.format_exc()}, 1
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (seconds of atexit work); the result is on disk.
    os._exit(code)


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: killed at the deadline
    value: Any = None
    error: str | None = None


def run_ranks(
    name: str,
    out_dir: Path,
    *,
    world: int = 2,
    timeout_s: float = 50.0,
    expect_ok: bool = True,
    **kwargs: Any,
) -> list[RankResult]:
    """Run ``dist_workers.<name>(**kwargs)`` on ``world`` ranks; return each rank's result.

    Ranks still alive at ``timeout_s`` are killed (their ``exitcode`` is None). With
    ``expect_ok`` any failed, killed or errored rank fails the test with its traceback.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.pt"):
        stale.unlink()
    port = free_port()
    procs = [
        _ctx.Process(target=_child, args=(name, r, world, port, str(out_dir), timeout_s, kwargs))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append(RankResult(r, None))
            continue
        res = RankResult(r, p.exitcode)
        f = out_dir / f"rank{r}.pt"
        if f.exists():
            payload = torch.load(f, weights_only=False)
            res.value, res.error = payload.get("ok"), payload.get("error")
        results.append(res)
    if expect_ok:
        bad = [r for r in results if r.exitcode != 0 or r.error is not None]
        if bad:
            detail = "\n".join(f"rank {r.rank}: exit {r.exitcode}\n{r.error or ''}" for r in bad)
            raise AssertionError(
                f"{name} failed on {len(bad)} of {world} ranks (deadline {timeout_s} s):\n{detail}"
            )
    return results


def torchrun(
    *args: str,
    cwd: Path,
    nproc: int = 2,
    timeout_s: float = 55.0,
    pythonpath: tuple[Path, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` (a free rendezvous port).

    The ranks import the ``fp8train`` this process imported (its source folder leads
    ``PYTHONPATH``), after ``pythonpath``. torchrun sets ``OMP_NUM_THREADS=1`` for each
    rank. Raises ``subprocess.TimeoutExpired`` after ``timeout_s``.
    """
    import fp8train

    src = Path(fp8train.__file__).resolve().parents[1]
    paths = [*map(str, pythonpath), str(src), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # torchrun sets them per rank
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        check=False,
    )
