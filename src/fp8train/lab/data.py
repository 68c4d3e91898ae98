"""The lab's data: a byte corpus for the GPT and scikit-learn's digits for the classifier.

Everything here is deterministic. The corpus is a fixed concatenation of files in
sorted order, its sha256 recorded; the validation windows are evenly spaced over the
held-out end, so every seed and precision is scored on the same bytes; training batches
come from a ``torch.Generator`` the caller seeds, so every precision trained with one
seed sees one data order.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8train.lab.config import LabError

__all__ = [
    "Corpus",
    "Digits",
    "eval_windows",
    "load_corpus",
    "load_digits",
    "non_text_fraction",
    "sample_windows",
    "stdlib_files",
    "text_files",
]

# Directories left out of the built-in corpus. site-packages and dist-packages are not
# the standard library (they change with whatever is installed); test suites are
# nearly half of the stdlib's .py bytes, full of generated data and deliberately odd
# encodings, and would make the corpus less like ordinary code.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# Generated at build time with this machine's paths and compiler flags: left out so the
# corpus depends on the Python version, not on where and how it was built.
_STDLIB_SKIP_PREFIX = "_sysconfigdata"
# A file is treated as binary (and skipped in a --data folder) if its first bytes hold NUL.
_BINARY_SNIFF_BYTES = 8192
# A corpus with more than this share of non-text bytes (see ``non_text_fraction``) is
# refused rather than trained on with a warning: the lab compares precisions on a text
# model, and a binary file gives numbers that look like a text result but are not one,
# while a warning would scroll away under the progress bars. Binary files sit far above
# the line (random or compressed bytes ~60%, executables ~50%), text far below it (8-bit
# legacy encodings such as Latin-1 prose, whose accented letters are not UTF-8, stay
# under a few percent), so the exact value matters little.
MAX_NON_TEXT_FRACTION = 0.10
# Bytes that are not text, after decoding as UTF-8 with ``surrogateescape`` (each byte
# of an invalid sequence becomes one U+DC80..U+DCFF): ASCII control characters other
# than the whitespace \t \n \v \f \r, DEL, and the invalid bytes; one byte each.
_NON_TEXT_1 = re.compile("[\x00-\x08\x0e-\x1f\x7f\udc80-\udcff]")
# C1 control characters (U+0080..U+009F), valid UTF-8 but not text: two bytes each.
_NON_TEXT_2 = re.compile("[\x80-\x9f]")


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into train and validation parts (uint8, 1-D)."""

    train: torch.Tensor
    val: torch.Tensor
    source: str  # "stdlib:<path>" or the --data path
    files: int  # number of files that contributed bytes
    sha256: str  # of the bytes used (train + val), after the size cap
    total_bytes: int  # bytes available before the cap
    truncated: bool  # whether the cap cut the corpus

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "files": self.files,
            "sha256": self.sha256,
            "bytes": int(self.train.numel() + self.val.numel()),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "available_bytes": self.total_bytes,
            "truncated": self.truncated,
        }


def _walk_sorted(root: Path, skip_dirs: frozenset[str]) -> list[Path]:
    """Every file under root, sorted by relative POSIX path, pruning skip_dirs and
    hidden entries."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library ``.py`` files, in corpus order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in _walk_sorted(root, _STDLIB_SKIP_DIRS)
        if p.suffix == ".py" and not p.name.startswith(_STDLIB_SKIP_PREFIX)
    ]
    return root, files


def text_files(path: Path) -> list[Path]:
    """A --data path as a list of files: the file itself, or every non-hidden,
    non-binary file under a folder in sorted order."""
    if path.is_file():
        return [path]
    files = []
    for p in _walk_sorted(path, frozenset({"__pycache__"})):
        with open(p, "rb") as f:
            if b"\x00" not in f.read(_BINARY_SNIFF_BYTES):
                files.append(p)
    return files


def non_text_fraction(raw: bytes) -> float:
    """The share of ``raw``'s bytes that are not printable ASCII, whitespace or valid
    UTF-8 text (0.0 for empty input). A multi-byte character cut by the end of ``raw``
    counts as invalid, a few bytes at most."""
    if not raw:
        return 0.0
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_NON_TEXT_1.findall(text)) + 2 * len(_NON_TEXT_2.findall(text))
    return bad / len(raw)


def load_corpus(data: str | None, *, corpus_mb: float, val_fraction: float, seq: int) -> Corpus:
    """Concatenate the files' bytes in order, cap at ``corpus_mb`` MiB, and hold out the
    last ``val_fraction`` for validation. Raises ``LabError`` when the data is missing,
    empty, not text (more than ``MAX_NON_TEXT_FRACTION`` of its bytes), or too small
    for windows of ``seq + 1`` bytes on both sides of the split."""
    if data is None:
        root, files = stdlib_files()
        source = f"stdlib:{root}"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise LabError(f"--data {data}: no such file or folder")
        files = text_files(path)
        source = str(path.resolve())
    cap = int(corpus_mb * 2**20)
    chunks: list[bytes] = []
    used_files = 0
    size = 0
    total = 0
    for p in files:
        if size >= cap:  # past the cap only the total is wanted: no need to read
            total += p.stat().st_size
            continue
        blob = p.read_bytes()
        total += len(blob)
        if blob:
            chunks.append(blob[: cap - size])
            size += len(chunks[-1])
            used_files += 1
    raw = b"".join(chunks)
    if not raw:
        what = (
            "folder has no text files" if data is not None and Path(data).is_dir() else "is empty"
        )
        raise LabError(f"--data {data if data is not None else source}: {what}")
    binary = non_text_fraction(raw)
    if binary > MAX_NON_TEXT_FRACTION:
        raise LabError(
            f"--data {data if data is not None else source}: {binary:.1%} of its bytes are "
            f"not text (printable ASCII, whitespace or UTF-8; at most "
            f"{MAX_NON_TEXT_FRACTION:.0%} allowed); the lab trains a language model on text, "
            "give a text file or a folder of them"
        )
    n_val = int(len(raw) * val_fraction)
    if n_val < seq + 1 or len(raw) - n_val < seq + 1:
        raise LabError(
            f"{source}: {len(raw)} bytes is too little for --seq {seq}; the held-out last "
            f"{val_fraction:.0%} must hold {seq + 1} bytes, so at least "
            f"{math.ceil((seq + 1) / val_fraction)} bytes are needed"
        )
    data_t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return Corpus(
        train=data_t[: len(raw) - n_val],
        val=data_t[len(raw) - n_val :],
        source=source,
        files=used_files,
        sha256=hashlib.sha256(raw).hexdigest(),
        total_bytes=total,
        truncated=total > len(raw),
    )


def sample_windows(
    data: torch.Tensor, batch: int, seq: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows: inputs and next-byte targets, int64 ``(batch, seq)``."""
    starts = torch.randint(0, data.numel() - seq, (batch,), generator=generator)
    window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()
    return window[:, :-1], window[:, 1:]  # (batch, seq) each


def eval_windows(data: torch.Tensor, count: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` distinct windows at evenly spaced offsets covering ``data``: the
    same for every seed and precision, with no random state involved."""
    last = data.numel() - seq - 1
    starts = torch.unique(torch.linspace(0, last, count, dtype=torch.float64).round().long())
    window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()
    return window[:, :-1], window[:, 1:]  # (count, seq) each


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 handwritten digits, pixels scaled to [0, 1], split once."""

    x_train: torch.Tensor  # float32 (n_train, 64)
    y_train: torch.Tensor  # int64 (n_train,)
    x_test: torch.Tensor  # float32 (n_test, 64)
    y_test: torch.Tensor  # int64 (n_test,)
    sha256: str  # of the pixel and label arrays as shipped

    def describe(self) -> dict[str, object]:
        return {
            "source": "sklearn.datasets.load_digits",
            "sha256": self.sha256,
            "train_examples": int(self.y_train.numel()),
            "test_examples": int(self.y_test.numel()),
        }


# The train/test split is drawn once from this seed, independent of the run seed, so
# every seed and precision is tested on the same images.
_DIGITS_SPLIT_SEED = 0


def load_digits(*, test_fraction: float) -> Digits:
    """Load the digits that ship inside scikit-learn (no download). Raises ``LabError``
    when scikit-learn is not installed."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise LabError("--task digits needs scikit-learn: pip install 'fp8train[digits]'") from None
    x_np, y_np = sk_load_digits(return_X_y=True)
    sha = hashlib.sha256(x_np.tobytes() + y_np.tobytes()).hexdigest()
    x = torch.tensor(x_np, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(y_np, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = int(len(y) * test_fraction)
    train, test = order[: len(y) - n_test], order[len(y) - n_test :]
    return Digits(x[train], y[train], x[test], y[test], sha)
