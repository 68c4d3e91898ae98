"""``ScaledTensor``: an FP8 (or INT8) payload with its scales, and ``quantize``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fp8train.cast import cast_finite, pack_e2m1, unpack_e2m1
from fp8train.formats import E2M1, Format
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    apply_scale_and_cast,
    check_finite_amax,
    compute_amax,
    multiply_by_scale,
    scale_from_amax,
)

__all__ = ["ScaledTensor", "quantize"]


@dataclass(frozen=True)
class ScaledTensor:
    """A quantised tensor: ``data ~= original * scale`` (multiply to enter).

    ``data``: payload in the format's torch dtype, the original shape. ``scale``: fp32
    scale grid (see :func:`fp8train.scaling.compute_amax` for its shape per granularity).
    ``orig_dtype``: dtype ``dequantize()`` returns by default. ``operand``: optionally
    the dequantised values already computed (by a fused kernel) in the dtype a GEMM
    consumes; ``dequantize`` returns it when asked for that dtype. It is a cache of
    ``dequantize``'s own result, never different values.

    Built with ``payload=None`` (by the fused kernels, when nothing stores the FP8
    bytes: the emulated GEMM reads only ``operand``), ``data`` is made from ``operand``
    on first access: ``cast(operand * scale)`` (nearest, the spec's saturation) gives
    back the exact payload, because ``operand`` is the payload times ``1 / scale``
    rounded at most once in fp32 (exact for power-of-two scales), far inside half an
    FP8 step. This module is the reference: it computes with the reference pipeline's
    steps only, and the kernels are tested bitwise against it.

    E2M1 (FP4) payloads are held packed, two codes per byte (uint8, the layout of
    :func:`fp8train.cast.pack_e2m1`: element 2i in the low nibble, 2i + 1 in the high
    one, an odd last dimension padded with a +0 code), so that what is kept costs half
    a byte per element. Given float grid values, the constructor packs them; given
    bytes, ``cols`` is the unpacked last dimension (default: the operand's, else twice
    the bytes). ``data`` unpacks them to fp32 values; ``stored`` is what is held.
    """

    payload: torch.Tensor | None
    scale: torch.Tensor
    spec: ScaleSpec
    orig_dtype: torch.dtype
    operand: torch.Tensor | None = field(default=None, repr=False, compare=False)
    cols: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.payload is None and self.operand is None:
            raise ValueError("ScaledTensor needs a payload or an operand to derive it from")
        if self.spec.fmt is not E2M1:
            return
        payload, cols = self.payload, self.cols
        if payload is not None and payload.is_floating_point():
            cols = payload.shape[-1] if payload.dim() else 1
            object.__setattr__(self, "payload", pack_e2m1(payload))
        elif cols is None:
            if self.operand is not None:
                cols = self.operand.shape[-1] if self.operand.dim() else 1
            else:
                assert payload is not None
                cols = 2 * payload.shape[-1]
        object.__setattr__(self, "cols", cols)

    @property
    def stored(self) -> torch.Tensor:
        """The payload as held: packed bytes for E2M1 (uint8, ``(..., ceil(K / 2))``),
        else ``data``. Derived from ``operand`` and cached if built without one."""
        if self.payload is None:
            assert self.operand is not None  # __post_init__
            # Nearest rounding whatever the spec's: the operand already lies on the grid
            # (times 1 / scale), so rounding only undoes the fp32 product's error.
            scaled = multiply_by_scale(_as_matrix(self.operand), self.scale, self.spec)
            payload = cast_finite(scaled, self.fmt, saturate=self.spec.saturate)
            payload = payload.reshape(self.operand.shape)
            if self.fmt is E2M1:
                payload = pack_e2m1(payload)
            object.__setattr__(self, "payload", payload)
        assert self.payload is not None
        return self.payload

    @property
    def data(self) -> torch.Tensor:
        """The payload in the format's torch dtype, or fp32 grid values for formats torch
        has no unpacked dtype for (E2M1: unpacked from ``stored``)."""
        stored = self.stored
        if self.fmt is E2M1:
            assert self.cols is not None  # __post_init__
            return unpack_e2m1(stored, self.cols)
        return stored

    @property
    def _held(self) -> torch.Tensor:
        """The payload if made, else the operand (same device)."""
        held = self.payload if self.payload is not None else self.operand
        assert held is not None  # __post_init__
        return held

    @property
    def shape(self) -> torch.Size:
        if self.payload is not None and self.fmt is E2M1:
            assert self.cols is not None  # __post_init__
            return torch.Size((*self.payload.shape[:-1], self.cols))
        return self._held.shape

    @property
    def device(self) -> torch.device:
        return self._held.device

    @property
    def fmt(self) -> Format:
        return self.spec.fmt

    @property
    def granularity(self) -> Granularity:
        return self.spec.granularity

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``data * (1 / scale)`` in fp32, then cast to ``dtype`` (default ``orig_dtype``).

        Leaving FP8 multiplies by the fp32 reciprocal of the scale -- the dequantisation
        factor a hardware GEMM receives -- so that the emulated GEMM and
        ``torch._scaled_mm`` see identical operands. For power-of-two scales this equals
        ``data / scale`` exactly.
        """
        if self.operand is not None and self.operand.dtype == (dtype or self.orig_dtype):
            return self.operand.reshape(self.shape)
        # One dequantisation formula for the whole library (the fused kernels compute
        # the same product, and tests/test_tensor.py checks them bitwise against it).
        reciprocal = self.scale.reciprocal()
        values = multiply_by_scale(_as_matrix(self.data), reciprocal, self.spec)
        return values.to(dtype or self.orig_dtype).reshape(self.shape)

    def t(self) -> ScaledTensor:
        """Transpose of a 2-D scaled tensor (payload and scale grid transposed; no
        requantisation)."""
        if len(self.shape) != 2:
            raise ValueError(f"t() needs a 2-D ScaledTensor, got shape {tuple(self.shape)}")
        scale = self.scale if self.scale.dim() == 0 else self.scale.t()
        # E2M1: unpacked, transposed and packed again along the new last dimension.
        payload = None if self.payload is None else self.data.t()
        operand = None if self.operand is None else self.operand.t()
        return ScaledTensor(payload, scale, self.spec.transposed(), self.orig_dtype, operand)

    def __repr__(self) -> str:
        return (
            f"ScaledTensor({self.spec.describe()}, shape={tuple(self.shape)}, "
            f"scale shape={tuple(self.scale.shape)}, orig_dtype={self.orig_dtype})"
        )


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view scales apply to: ``(-1, last dim)``, a scalar as ``(1, 1)``."""
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def _check_scale(scale: object, name: str) -> None:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(
            f"{name}: quantize's scale must be a floating tensor (the scale grid), got {got}; "
            "e.g. scale=torch.tensor(4.0), or leave it out to derive it from the amax"
        )
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: quantize's scale must be finite and > 0 (data = cast(x * scale)), got "
            f"{int(bad.sum())} of {scale.numel()} values zero, negative, NaN or inf; derive "
            "it with fp8train.scaling.scale_from_amax or leave it out"
        )


def quantize(
    x: torch.Tensor,
    spec: ScaleSpec | Format | str,
    granularity: Granularity | str | None = None,
    *,
    scale: torch.Tensor | None = None,
    name: str = "tensor",
    generator: torch.Generator | None = None,
    **spec_fields: object,
) -> ScaledTensor:
    """Quantise ``x``: amax -> scale -> cast.

    ``spec`` is a :class:`ScaleSpec`, or a format (then ``granularity`` and other
    ``ScaleSpec`` fields may be given as keywords, e.g. ``block=(128, 128)``).
    ``scale``: use this precomputed scale grid instead of one from ``x``'s amax (delayed
    scaling). ``name`` appears in errors. Raises :class:`NonFiniteAmaxError` if ``x``
    holds NaN/inf and the scale would come from it.
    """
    if not isinstance(spec, ScaleSpec):
        fields: dict[str, object] = dict(spec_fields)
        fields["fmt"] = spec
        if granularity is not None:
            fields["granularity"] = granularity
        spec = ScaleSpec(**fields)  # type: ignore[arg-type]
    elif granularity is not None or spec_fields:
        extra = dict(spec_fields)
        if granularity is not None:
            extra["granularity"] = granularity
        spec = replace(spec, **extra)  # type: ignore[arg-type]
    if not x.is_floating_point():
        raise TypeError(f"{name}: quantize expects a floating tensor, got {x.dtype}")
    if spec.granularity is not Granularity.TENSOR and x.dim() < 2:
        raise ValueError(
            f"{name}: {spec.granularity.value} scaling needs at least 2 dims, got shape "
            f"{tuple(x.shape)}"
        )
    if scale is not None:
        _check_scale(scale, name)
    if scale is None:
        amax = compute_amax(x, spec)
        check_finite_amax(amax, name)
        scale = scale_from_amax(amax, spec)
    data = apply_scale_and_cast(x, scale, spec, generator)
    return ScaledTensor(data, scale, spec, x.dtype)
