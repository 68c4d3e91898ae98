"""Shared helpers for the benchmark scripts: machine and version info, timing, memcpy
bandwidth, result files and tables.

Benchmarks are scripts (``python benchmarks/<name>.py``); tests never import them.
Conventions every script follows:

* Times are wall-clock seconds from ``time.perf_counter``; a measurement is the median
  of ``repeats`` runs after ``warmup`` untimed runs (the median resists the scheduler
  noise of a shared machine better than the mean; the min is kept too).
* Bandwidth is in GB/s with GB = 1e9 bytes, counting bytes read plus bytes written,
  the same way for memcpy and for the measured operation.
* Results go to ``benchmarks/results/<name>.json``, together with :func:`environment`
  (the machine, versions, commit and date): the latest run of each benchmark, which
  ``docs/gen_performance.py`` turns into docs/performance.md. git keeps earlier runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import fp8train
from fp8train.matmul import bf16_gemm_is_native

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# How bandwidth is counted; stored in every result file that reports GB/s.
BANDWIDTH_CONVENTION = (
    "GB/s = (bytes read + bytes written) / median time / 1e9. memcpy (dst.copy_(src)) "
    "reads and writes the buffer once each (2x its size). An operation is credited with "
    "its minimal traffic: one read of its input and one write of its outputs, whatever "
    "intermediate passes it makes."
)


# ---------------------------------------------------------------- environment
def _cpuinfo_field(name: str) -> str | None:
    """The first ``name`` field of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    """The CPU model name (platform.processor() is often empty or just 'x86_64' on Linux)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_commit() -> str | None:
    """HEAD of the repository holding this file, with ``+uncommitted`` when the package
    or the benchmark scripts differ from it (results files aside); None outside a
    checkout."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    changed = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/benchmarks/*.py"
    )
    return head + ("+uncommitted" if changed else "")


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpu_model": _cpu_model(),
        # A VM may name its CPU only by vendor and product line; the family and model
        # numbers tell its generation apart.
        "cpu_family": _cpuinfo_field("cpu family"),
        "cpu_model_number": _cpuinfo_field("model"),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_num_threads": torch.get_num_threads(),
        # The vector ISA ATen dispatches to (AVX2, AVX512, ...), and whether bf16 GEMMs
        # have hardware here: without it they run 3x (AVX-512 without bf16 instructions)
        # to tens of times (AVX2) slower than fp32, and
        # fp8train's emulation multiplies in fp32 (fp8train.matmul.gemm_dtype).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_gemm_native": bf16_gemm_is_native("cpu"),
        # Other jobs on a shared machine inflate times; the load says how busy it was.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        # The package's own attribute: an editable install's metadata keeps the version
        # it was installed with.
        "fp8train": fp8train.__version__,
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
    }


def today() -> str:
    """UTC date, YYYY-MM-DD: names the result file."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def environment() -> dict[str, Any]:
    """Machine, versions and timestamp, to store beside every result."""
    return {
        "date": today(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
    }


# ---------------------------------------------------------------- timing
def time_median(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns ``{"median_s", "min_s", "times_s"}``. ``fn`` runs synchronously (CPU); a
    GPU benchmark must synchronise inside ``fn``.
    """
    return time_interleaved([fn], warmup=warmup, repeats=repeats)[0]


def time_interleaved(
    fns: Sequence[Callable[[], object]], *, warmup: int = 2, repeats: int = 7
) -> list[dict[str, Any]]:
    """:func:`time_median` of each of ``fns``, their runs alternating (A B A B ...), so
    that a change in machine load hits all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=False):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [{"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts} for ts in times]


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def memcpy_bandwidth(nbytes: int, *, warmup: int = 2, repeats: int = 7) -> dict[str, Any]:
    """``dst.copy_(src)`` of two ``nbytes`` buffers: median time and GB/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
    dst = torch.empty_like(src)
    timing = time_median(lambda: dst.copy_(src), warmup=warmup, repeats=repeats)
    moved = 2 * nbytes  # read src + write dst
    return {
        "bytes": nbytes,
        "bytes_moved": moved,
        "gb_per_s": gb_per_s(moved, timing["median_s"]),
        **timing,
    }


# ---------------------------------------------------------------- allocator
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_FREED_MEMORY = "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap per large block, no
    returning the heap top), as jemalloc or tcmalloc would; False where this is not
    glibc. For the rest of the process; the same as starting it with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.

    Why: by default every block of 32 MiB or more is a fresh mmap, and a kernel writing
    its output there pays a page fault per 4 KiB page (many times the cost of writing
    into memory already touched; cast.py's ``first_touch`` measures it), which would be
    timed as the kernel's.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(name)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------- output
def write_results(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` (plus :func:`environment` under ``"environment"`` if absent) to
    ``results_dir/<name>.json``, replacing the previous run's, and return the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns padded to width, numbers right-aligned."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str], numeric: Sequence[bool]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w)
            for v, w, n in zip(values, widths, numeric, strict=False)
        )

    numeric = [isinstance(c, (int, float)) for c in rows[0]] if rows else [False] * len(headers)
    out = [line(list(headers), numeric), line(["-" * w for w in widths], [False] * len(widths))]
    out += [line(r, numeric) for r in cells]
    return "\n".join(out)
