"""How the fused kernels make and read FP8 bytes on the CPU: a frozen argument, never
a global.

Every route gives the same bytes and values (tests/test_kernels.py forces each one and
compares it with the reference); they differ only in the code inductor writes for them,
and which is faster depends on the CPU: inductor has no vector code for a bit view, and
its int32 -> uint8 and FP8 -> fp32 conversions are vectorised on some instruction sets
and scalar on others. So the choice is an argument with one default, torch's own
conversions, and ``benchmarks/cast.py`` measures which value wins on the machine it runs
on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fp8train._kernels.encoders import CodeBytes

__all__ = ["DEFAULT_ROUTES", "ByteRoutes", "PayloadBytes"]

# "convert": torch's fp32 -> FP8 conversion. "bit_fields": integer arithmetic on the fp32
# bit fields (fp8train._kernels.encoders.fp8_codes and fp8_grid_bytes).
PayloadBytes = Literal["convert", "bit_fields"]


@dataclass(frozen=True)
class ByteRoutes:
    """The byte routes of one kernel set; they apply to CPU tensors (elsewhere the
    kernels convert with torch's ops). Hashable: a compiled graph's key holds it, so
    each route traces a graph of its own.

    * ``payload_bytes``: how an E4M3/E5M2 payload is made from fp32 products or grid
      values: ``"convert"`` (torch's conversion) or ``"bit_fields"``.
    * ``code_bytes``: with ``"bit_fields"``, how the int32 codes become bytes:
      ``"direct"`` or ``"via_fp32"`` (the detour some instruction sets vectorise better).
    * ``restore_from_words``: decode a saved E4M3/E5M2 payload from int32 words
      (``fp8train._kernels.encoders.fp8_word_values``) instead of ``payload.float()``,
      where the last dimension is a multiple of 4 and the machine is little-endian.
    """

    payload_bytes: PayloadBytes = "convert"
    code_bytes: CodeBytes = "direct"
    restore_from_words: bool = False

    def __post_init__(self) -> None:
        if self.payload_bytes not in get_args(PayloadBytes):
            raise ValueError(
                f"payload_bytes must be 'convert' or 'bit_fields', got {self.payload_bytes!r}"
            )
        if self.code_bytes not in get_args(CodeBytes):
            raise ValueError(f"code_bytes must be 'direct' or 'via_fp32', got {self.code_bytes!r}")
        if not isinstance(self.restore_from_words, bool):
            raise TypeError(
                f"restore_from_words must be a bool, got {type(self.restore_from_words).__name__}"
            )
        if self.code_bytes != "direct" and self.payload_bytes != "bit_fields":
            raise ValueError(
                f"code_bytes={self.code_bytes!r} only applies with payload_bytes='bit_fields' "
                f"(got payload_bytes={self.payload_bytes!r}); leave code_bytes at 'direct'"
            )


DEFAULT_ROUTES = ByteRoutes()
