"""Fused quantisation kernels, run eagerly or through ``torch.compile``.

The hot path of an FP8 linear on the CPU is not the GEMM but the passes around it:
amax, scale, cast, and turning the FP8 payload back into the bf16 operand the emulated
GEMM consumes (eager ``float8 -> bf16`` conversion is scalar code, about as slow as the
GEMM itself). :func:`cast_with_operand` does all of the cast side in one pure function,
so inductor fuses it into one loop: read ``x``, write the FP8 payload and the bf16
operand. The arithmetic is identical to the reference pipeline step by step (fp32
product, saturating RNE cast, multiplication by the fp32 reciprocal), and the tests
check eager and compiled kernels bit for bit.

``Kernels("compiled")`` compiles lazily on first use with dynamic shapes, so each
(spec, dtype) compiles once however many layer shapes use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from fp8train.cast import cast_finite
from fp8train.scaling import (
    ScaleSpec,
    compute_amax,
    multiply_by_scale,
    scale_from_amax,
)

__all__ = ["KernelMode", "Kernels", "cast_with_operand", "payload_to_operand", "quantize_current"]

KernelMode = Literal["eager", "compiled"]


def cast_with_operand(
    x2d: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec, operand_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(payload, operand)``: ``payload = cast(x * scale)`` and, if ``operand_dtype`` is
    given, ``operand = payload * (1 / scale)`` in that dtype (what ``dequantize`` gives).

    ``x2d`` must be finite (the caller checked its amax). Upcasting before scaling keeps
    eager and compiled rounding identical.
    """
    scaled = multiply_by_scale(x2d, scale, spec)
    payload = cast_finite(scaled, spec.fmt, saturate=spec.saturate)
    if operand_dtype is None:
        return payload, None
    return payload, payload_to_operand(payload, scale, spec, operand_dtype)


def quantize_current(
    x2d: torch.Tensor, spec: ScaleSpec, operand_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Current scaling in one call: ``(amax, scale, payload, operand)``.

    The caller checks ``amax`` is finite before using anything else it returns (with a
    NaN/inf amax the scale and payload are meaningless and must be discarded).
    """
    amax = compute_amax(x2d, spec)
    scale = scale_from_amax(amax, spec)
    payload, operand = cast_with_operand(x2d, scale, spec, operand_dtype)
    return amax, scale, payload, operand


def payload_to_operand(payload: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec,
                       dtype: torch.dtype) -> torch.Tensor:
    """``payload * (1 / scale)`` in ``dtype`` for a 2-D payload (ScaledTensor.dequantize)."""
    return multiply_by_scale(payload, scale.reciprocal(), spec).to(dtype)


class Kernels:
    """The kernel set one layer uses: ``"eager"`` (plain PyTorch ops) or ``"compiled"``
    (the same functions through ``torch.compile``, inductor's CPU backend)."""

    def __init__(self, mode: KernelMode = "eager") -> None:
        if mode not in ("eager", "compiled"):
            raise ValueError(f"kernels must be 'eager' or 'compiled', got {mode!r}")
        self.mode = mode
        self.amax: Callable[[torch.Tensor, ScaleSpec], torch.Tensor] = compute_amax
        self.cast_with_operand: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
            cast_with_operand)
        self.payload_to_operand: Callable[..., torch.Tensor] = payload_to_operand
        self.quantize_current: Callable[..., tuple[Any, ...]] = quantize_current
        if mode == "compiled":
            self.quantize_current = _compiled(quantize_current)
            self.amax = _compiled(compute_amax)
            self.cast_with_operand = _compiled(cast_with_operand)
            self.payload_to_operand = _compiled(payload_to_operand)

    def __repr__(self) -> str:
        return f"Kernels({self.mode!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # deepcopy/pickle rebuild instead of copying
        return (Kernels, (self.mode,))


_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}

# Each (spec, dtype) combination is one compiled graph of the same function; a run of
# every recipe needs a few dozen, past dynamo's default of 8 per function, after which
# it would silently run eagerly. The limit is raised only around our own calls.
_RECOMPILE_LIMIT = 128


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    # One compiled wrapper per function, shared by every layer, so guards and graphs are
    # reused across layers with the same spec.
    if fn not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True)

        def call(t: torch.Tensor, *args: Any) -> Any:
            # A plain tensor (not a Parameter) keeps shapes dynamic: dynamo guards
            # Parameter shapes statically, which would compile once per weight shape.
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return compiled(t.detach(), *args)

        _COMPILED[fn] = call
    return _COMPILED[fn]
