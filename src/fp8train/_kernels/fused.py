"""The fused quantisation functions: pure, traced whole for inductor or run eagerly.

The hot path of an FP8 linear on the CPU is not the GEMM but the passes around it:
amax, scale, cast, and turning the FP8 payload back into the operand the emulated GEMM
consumes (eager ``float8 -> bf16`` conversion is scalar code). :func:`cast_with_operand`
does all of the cast side in one pure function, so inductor fuses it into one loop:
read ``x``, write the FP8 payload and the operand. The arithmetic is the reference
pipeline's step by step (fp32 product, saturating RNE cast, multiplication by the fp32
reciprocal), and the tests check eager and compiled kernels bit for bit against it.

For E4M3/E5M2 the FP8 values are computed in fp32 arithmetic
(:func:`fp8train._kernels.encoders.fp8_grid_values`) and the operand is made from them,
so the FP8 bytes are only written where something keeps them (a payload saved for
backward, an observer, a GPU's ``torch._scaled_mm``): fp32 <-> FP8 conversions cost
several multiply passes on the CPU, and the emulated GEMM needs only the operand. How
bytes are made and read back is the ``routes`` argument (:class:`ByteRoutes`), the same
bits by every route. With current scaling (the scale from the tensor's own amax, not
MX) no product can round past max, and the saturating clamp is skipped
(``own_amax_scale``; the same bits).

Every function takes ``routes`` last and positionally, so that a compiled graph's key
holds it (fp8train._kernels.capture).
"""

from __future__ import annotations

import sys

import torch

from fp8train._kernels.encoders import fp8_grid_values, fp8_payload, fp8_word_values
from fp8train._kernels.routes import DEFAULT_ROUTES, ByteRoutes
from fp8train.cast import cast_finite
from fp8train.formats import E2M1, E4M3, E5M2
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    compute_amax,
    multiply_by_scale,
    scale_from_amax,
)

__all__ = [
    "Quantized",
    "bias_grad",
    "cast_with_operand",
    "grid_arithmetic",
    "payload_to_operand",
    "quantize_current",
    "quantize_from_window",
    "quantize_given",
]

# One quantised operand: (amax, scale, payload or None, operand or None).
Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def grid_arithmetic(spec: ScaleSpec) -> bool:
    """Whether :func:`cast_with_operand` rounds ``spec`` by float arithmetic
    (:func:`fp8train._kernels.encoders.fp8_grid_values`) and can skip the FP8 payload."""
    return spec.fmt in (E4M3, E5M2) and spec.saturate and spec.rounding == "nearest"


def cast_with_operand(
    x2d: torch.Tensor,
    scale: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
    own_amax_scale: bool = False,
    routes: ByteRoutes = DEFAULT_ROUTES,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(payload, operand)``: ``payload = cast(x * scale)`` and, if ``operand_dtype`` is
    given, ``operand = payload * (1 / scale)`` in that dtype (what ``dequantize`` gives).

    ``keep_payload=False``: the payload is not made (None) where :func:`grid_arithmetic`
    holds and an operand is asked for; the operand then comes from the FP8 values
    computed in fp32 arithmetic, without the FP8 conversions (the same bits: the values
    are those of the payload). For E2M1 it is computed but not returned (None), so that
    nothing packs it. Elsewhere the payload is returned anyway.

    ``own_amax_scale=True``: ``scale`` is ``scale_from_amax`` of ``x2d``'s own amax, so
    for every granularity but MX no product can round past ``fmt.max`` and the grid
    arithmetic skips its clamp (the bound is argued in fp8train/_kernels/encoders.py;
    the same bits).

    ``x2d`` must be finite (the caller checked its amax). Upcasting before scaling keeps
    eager and compiled rounding identical.
    """
    scaled = multiply_by_scale(x2d, scale, spec)
    if grid_arithmetic(spec):
        clamp = not (own_amax_scale and spec.granularity is not Granularity.MX)
        from_bits = routes.payload_bytes == "bit_fields" and scaled.is_cpu
        if operand_dtype is None:  # the payload alone, rounded from the products
            payload = fp8_payload(
                scaled, spec.fmt, clamp=clamp, from_bits=from_bits, code_bytes=routes.code_bytes
            )
            return payload, None
        values = fp8_grid_values(scaled, spec.fmt, clamp=clamp)
        kept = None
        if keep_payload:  # from the values made anyway: no rounding left to do
            kept = fp8_payload(
                values, spec.fmt, on_grid=True, from_bits=from_bits, code_bytes=routes.code_bytes
            )
        return kept, multiply_by_scale(values, scale.reciprocal(), spec).to(operand_dtype)
    payload = cast_finite(scaled, spec.fmt, saturate=spec.saturate)
    if operand_dtype is None:
        return payload, None
    operand = payload_to_operand(payload, scale, spec, operand_dtype, routes)
    if not keep_payload and spec.fmt is E2M1:
        # Not returned where nothing keeps it: ScaledTensor would pack it, a pass over
        # the bytes for nothing (it derives the same values from the operand if asked).
        return None, operand
    return payload, operand


def quantize_current(
    x2d: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
    routes: ByteRoutes = DEFAULT_ROUTES,
) -> Quantized:
    """Current scaling in one call: ``(amax, scale, payload, operand)`` (the payload as
    :func:`cast_with_operand` gives it).

    The caller checks ``amax`` is finite before using anything else it returns (with a
    NaN/inf amax the scale and payload are meaningless and must be discarded).
    """
    amax = compute_amax(x2d, spec)
    scale = scale_from_amax(amax, spec)
    payload, operand = cast_with_operand(
        x2d, scale, spec, operand_dtype, keep_payload, True, routes
    )
    return amax, scale, payload, operand


def quantize_given(
    x2d: torch.Tensor,
    scale: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
    routes: ByteRoutes = DEFAULT_ROUTES,
) -> Quantized:
    """Delayed scaling in one pass: ``(amax, scale, payload, operand)`` with ``scale``
    given (from earlier steps' amaxes) and this tensor's amax taken alongside the cast,
    for the caller to check and record. The cast keeps its saturating clamp: a scale
    from earlier steps may be too large for this tensor."""
    amax = compute_amax(x2d, spec)
    payload, operand = cast_with_operand(
        x2d, scale, spec, operand_dtype, keep_payload, False, routes
    )
    return amax, scale, payload, operand


def quantize_from_window(
    x2d: torch.Tensor,
    window: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
    routes: ByteRoutes = DEFAULT_ROUTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Delayed scaling from its history in one call: ``(amax, scale, payload, operand,
    window_amax)``, where ``window`` is :meth:`fp8train.AmaxHistory.to_reduce` (its max
    over dim 0 is the history's amax, ``window_amax``) and ``scale`` is
    ``scale_from_amax(window_amax)``; then as :func:`quantize_given`.

    Why in the kernel: eager, the window's reduction and the scale are a dozen small ops
    per operand, each a dispatch of its own; compiled, they join the cast's call. The
    caller keeps ``window_amax`` to compare this tensor's amax with (a jump beyond the
    format's range)."""
    window_amax = window.amax(dim=0)
    scale = scale_from_amax(window_amax, spec)
    amax, scale, payload, operand = quantize_given(
        x2d, scale, spec, operand_dtype, keep_payload, routes
    )
    return amax, scale, payload, operand, window_amax


def payload_to_operand(
    payload: torch.Tensor,
    scale: torch.Tensor,
    spec: ScaleSpec,
    dtype: torch.dtype,
    routes: ByteRoutes = DEFAULT_ROUTES,
) -> torch.Tensor:
    """``payload * (1 / scale)`` in ``dtype`` for a 2-D payload (what
    ``ScaledTensor.dequantize`` gives). With ``routes.restore_from_words`` a CPU
    E4M3/E5M2 payload is decoded from int32 words
    (:func:`fp8train._kernels.encoders.fp8_word_values`, the same values)."""
    return multiply_by_scale(_payload_values(payload, routes), scale.reciprocal(), spec).to(dtype)


def _payload_values(payload: torch.Tensor, routes: ByteRoutes) -> torch.Tensor:
    """``payload.float()``, from int32 words where asked for and exact (last dimension a
    multiple of 4, little-endian; the compiled kernels hand their graphs byte tensors
    contiguous at a 4-byte offset)."""
    if (
        routes.restore_from_words
        and payload.device.type == "cpu"
        and sys.byteorder == "little"
        and payload.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        and payload.dim() >= 1
        and payload.shape[-1] % 4 == 0
        and payload.storage_offset() % 4 == 0
        and payload.is_contiguous()
    ):
        return fp8_word_values(payload)
    return payload.float()


def bias_grad(dy2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient: ``dy2d (M, N)`` summed over its rows, accumulated in fp32,
    returned in ``dtype`` (the bias's).

    Why a kernel: given a bf16 ``dy``, eager ATen copies all of it to fp32 before
    summing; compiled, the sum reads ``dy`` once. The compiled sum adds in another order
    than the eager one, so this is the one result of the kernel sets that is not bitwise
    equal between them; both accumulate in fp32, and tests/test_kernels.py bounds the
    difference by fp32 summation's error.
    """
    return dy2d.sum(0, dtype=torch.float32).to(dtype)
