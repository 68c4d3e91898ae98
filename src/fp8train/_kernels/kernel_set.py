"""``Kernels``: the typed kernel set one layer (or activation store) calls."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, get_args

import torch

from fp8train._kernels import fused
from fp8train._kernels.auto import KernelChoice, KernelMode, resolve_auto
from fp8train._kernels.capture import compiled, standalone_compile_available
from fp8train._kernels.encoders import CodeBytes
from fp8train._kernels.fused import Quantized
from fp8train._kernels.routes import ByteRoutes, PayloadBytes
from fp8train.scaling import ScaleSpec, compute_amax

__all__ = ["Kernels", "shared_kernels"]

F = TypeVar("F", bound=Callable[..., Any])


class Kernels:
    """The kernel set one layer uses.

    ``mode``: ``"eager"`` (the fused functions as plain PyTorch ops), ``"compiled"`` (the
    same functions traced and compiled by inductor, fp8train._kernels.capture) or
    ``"auto"`` (compiled where this torch and the tensors' device can compile, else
    eager; decided per device type on first use, fp8train._kernels.auto). Every mode
    gives the reference pipeline's bits, except :meth:`bias_grad`'s summation order.

    The keywords choose how CPU kernels make and read FP8 bytes (:class:`ByteRoutes`;
    the same bits by every route, and the defaults are torch's own conversions). Which
    route is faster depends on the CPU, so they are options with one default, and
    ``benchmarks/cast.py --routes`` measures which wins. They are meant for compiled
    code: run eagerly, each integer operation of a bit-field route is a pass of its own.
    """

    def __init__(
        self,
        mode: KernelChoice = "eager",
        *,
        payload_bytes: PayloadBytes = "convert",
        code_bytes: CodeBytes = "direct",
        restore_from_words: bool = False,
    ) -> None:
        if mode not in get_args(KernelChoice):
            raise ValueError(f"kernels must be 'auto', 'eager' or 'compiled', got {mode!r}")
        if mode == "compiled" and not standalone_compile_available():
            raise ValueError(
                f"kernels='compiled' needs torch._inductor.standalone_compile (torch 2.8 or "
                f"later), which torch {torch.__version__} lacks; use kernels='auto' or 'eager'"
            )
        self.mode: KernelChoice = mode
        self.routes = ByteRoutes(payload_bytes, code_bytes, restore_from_words)

    def resolved(self, device: torch.device | str) -> KernelMode:
        """The mode this set runs on ``device``: its own, or what "auto" chose there."""
        if self.mode == "auto":
            return resolve_auto(torch.device(device).type)
        return self.mode

    def _on(self, fn: F, device: torch.device) -> F:
        mode = self.mode if self.mode != "auto" else resolve_auto(device.type)
        return compiled(fn) if mode == "compiled" else fn

    def amax(self, x: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
        """``fp8train.scaling.compute_amax(x, spec)``."""
        return self._on(compute_amax, x.device)(x, spec)

    def cast_with_operand(
        self,
        x2d: torch.Tensor,
        scale: torch.Tensor,
        spec: ScaleSpec,
        operand_dtype: torch.dtype | None,
        keep_payload: bool = True,
        own_amax_scale: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:func:`fp8train._kernels.fused.cast_with_operand`."""
        fn = self._on(fused.cast_with_operand, x2d.device)
        return fn(x2d, scale, spec, operand_dtype, keep_payload, own_amax_scale, self.routes)

    def payload_to_operand(
        self, payload: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec, dtype: torch.dtype
    ) -> torch.Tensor:
        """:func:`fp8train._kernels.fused.payload_to_operand`."""
        fn = self._on(fused.payload_to_operand, payload.device)
        return fn(payload, scale, spec, dtype, self.routes)

    def quantize_current(
        self,
        x2d: torch.Tensor,
        spec: ScaleSpec,
        operand_dtype: torch.dtype | None,
        keep_payload: bool = True,
    ) -> Quantized:
        """:func:`fp8train._kernels.fused.quantize_current`: ``(amax, scale, payload,
        operand)`` with the scale from ``x2d``'s own amax."""
        fn = self._on(fused.quantize_current, x2d.device)
        return fn(x2d, spec, operand_dtype, keep_payload, self.routes)

    def quantize_given(
        self,
        x2d: torch.Tensor,
        scale: torch.Tensor,
        spec: ScaleSpec,
        operand_dtype: torch.dtype | None,
        keep_payload: bool = True,
    ) -> Quantized:
        """:func:`fp8train._kernels.fused.quantize_given`: ``(amax, scale, payload,
        operand)`` with ``scale`` given (delayed scaling)."""
        fn = self._on(fused.quantize_given, x2d.device)
        return fn(x2d, scale, spec, operand_dtype, keep_payload, self.routes)

    def quantize_from_window(
        self,
        x2d: torch.Tensor,
        window: torch.Tensor,
        spec: ScaleSpec,
        operand_dtype: torch.dtype | None,
        keep_payload: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """:func:`fp8train._kernels.fused.quantize_from_window`: ``(amax, scale, payload,
        operand, window_amax)`` with the scale from a delayed history's window."""
        fn = self._on(fused.quantize_from_window, x2d.device)
        return fn(x2d, window, spec, operand_dtype, keep_payload, self.routes)

    def bias_grad(self, dy2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:func:`fp8train._kernels.fused.bias_grad`: the fp32 column sum of ``dy2d``."""
        return self._on(fused.bias_grad, dy2d.device)(dy2d, dtype)

    def __repr__(self) -> str:
        routes = "" if self.routes == ByteRoutes() else f", {self.routes}"
        return f"Kernels({self.mode!r}{routes})"

    def __reduce__(self) -> tuple[Any, ...]:  # deepcopy/pickle rebuild instead of copying
        return (_rebuild, (self.mode, self.routes))


def _rebuild(mode: KernelChoice, routes: ByteRoutes) -> Kernels:
    return Kernels(
        mode,
        payload_bytes=routes.payload_bytes,
        code_bytes=routes.code_bytes,
        restore_from_words=routes.restore_from_words,
    )


@functools.cache
def shared_kernels(mode: KernelChoice) -> Kernels:
    """One :class:`Kernels` per mode (default routes), for callers that choose the set
    per call."""
    return Kernels(mode)
