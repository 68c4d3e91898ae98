"""Where the monitor's records go: the :class:`Sink` protocol, JSONL and TensorBoard.

A record is a JSON-ready dict ``{"step", "kind": "layer" | "step" | "warning", ...}``.
The JSONL sink writes one object per line; non-finite floats are written as the
strings ``"inf"``, ``"-inf"`` and ``"nan"`` so every line is strict JSON -- read them
back with ``float(value)``. The TensorBoard sink needs the ``tensorboard`` package;
:func:`open_sinks` skips it with one log line when that is missing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["JsonlSink", "Sink", "TensorBoardSink", "open_sinks"]

log = logging.getLogger("fp8train")


class Sink(Protocol):
    """Where records go: ``write`` one record (a JSON-ready dict), ``close`` at the end."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf", "-inf", "nan"), so each line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JsonlSink:
    """Appends one JSON object per line to ``path`` (created with its folder), flushed
    after every step so a crashed run keeps its log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; raises ``ValueError`` once the sink is closed."""
        if self._file is None:
            raise ValueError(f"JSONL sink {self.path} is closed")
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        if record.get("kind") != "layer":  # a step record or a warning ends a batch
            self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink:
    """Scalars to TensorBoard: ``<layer>/<role>/<stat>``, ``train/<stat>``, warnings as
    text. Needs the ``tensorboard`` package (``pip install 'fp8train[tensorboard]'``)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self._writer: Any = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def available() -> bool:
        """Whether the ``tensorboard`` package can be imported."""
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, record: dict[str, Any]) -> None:
        """Each finite numeric field as a scalar; a warning as text."""
        step, kind = record["step"], record["kind"]
        if kind == "warning":
            self._writer.add_text("warnings", record["message"], step)
            return
        if kind not in ("step", "layer"):  # e.g. a guard's diagnosis or action
            self._writer.add_text(str(kind), str(record.get("message", record)), step)
            return
        prefix = "train" if kind == "step" else f"{record['layer']}/{record['role']}"
        for key, value in record.items():
            if key in ("step", "kind", "layer", "role") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def open_sinks(
    jsonl: str | Path | None, tensorboard: str | Path | None, extra: Sequence[Sink]
) -> list[Sink]:
    """The sinks a :class:`~fp8train.monitor.Monitor` writes to, in order: JSONL at
    ``jsonl``, TensorBoard in ``tensorboard`` (skipped with a log line when tensorboard
    is not installed), then ``extra``."""
    sinks: list[Sink] = []
    if jsonl is not None:
        sinks.append(JsonlSink(jsonl))
    if tensorboard is not None:
        if TensorBoardSink.available():
            sinks.append(TensorBoardSink(tensorboard))
        else:
            log.info(
                "fp8train monitor: tensorboard is not installed; TensorBoard sink "
                "skipped (pip install 'fp8train[tensorboard]')"
            )
    sinks.extend(extra)
    return sinks
