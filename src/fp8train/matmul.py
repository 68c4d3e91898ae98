"""The scaled GEMM: ``out = dequant(a) @ dequant(b)`` with fp32 accumulation.

Two backends compute the same arithmetic:

* ``"scaled_mm"`` -- ``torch._scaled_mm``: FP8 operands, tensorwise or rowwise scales
  (the layouts it takes on CPU and GPU alike). ``b`` is passed column-major.
* ``"emulate"`` -- exact emulation for every granularity. FP8 (and INT8) values times
  power-of-two scales are exactly representable in bf16 (E4M3 has 4 significant bits,
  INT8 7, bf16 8, and bf16 shares fp32's exponent range), so when the scales are powers
  of two and the output is bf16, dequantising into bf16 and running a bf16 GEMM (fp32
  accumulation inside) reproduces the FP8 GEMM at bf16 speed. Otherwise (non-power-of-two
  scales, or an fp32 output) both operands are dequantised to fp32 (payload times the
  fp32 reciprocal of the scale) and multiplied in fp32 -- what ``torch._scaled_mm`` does
  on CPU, bit for bit.

  The bf16 GEMM is only the faster route where bf16 GEMMs have hardware behind them
  (:func:`bf16_gemm_is_native`). On a CPU without it PyTorch multiplies bf16 matrices
  in a generic fallback (AVX2 only: orders of magnitude slower than fp32) or, with
  AVX-512 but no bf16 instructions, converts to fp32 inside oneDNN (slower than fp32
  itself; benchmarks/linear.py measures both), so there the emulation multiplies the
  same exact operands in fp32 (:func:`gemm_dtype`):
  the products are exact either way and both accumulate in fp32, so only the summation
  order can differ, and on such a CPU it is what ``torch._scaled_mm`` computes, bit
  for bit.

``"auto"`` takes the CUDA route (:mod:`fp8train.cuda_gemm`: ``torch.nn.functional.scaled_mm``
where the GPU's compute capability has the operands' scaling, operands padded to the
kernel's multiples) and the emulation elsewhere: on CPU, where it measured faster
(benchmarks/linear.py), and for GEMMs the GPU cannot take, with one log line per label
and reason.

``accumulation=`` chooses what the sum keeps: ``"fp32"`` (the above) or a
:class:`~fp8train.accumulator.TensorCoreAccumulator`, the model of an FP8 tensor core's
narrower accumulator, which always runs in the emulation (the hardware GEMM has its own).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from typing import Literal

import torch

from fp8train import cuda_gemm
from fp8train.accumulator import (
    Accumulation,
    TensorCoreAccumulator,
    check_accumulation,
    tensor_core_mm,
)
from fp8train.formats import E2M1, E4M3, E5M2, INT8
from fp8train.scaling import Granularity, ScaleSpec
from fp8train.tensor import ScaledTensor

__all__ = ["Backend", "bf16_gemm_is_native", "check_pair", "gemm_dtype", "scaled_mm"]

Backend = Literal["auto", "scaled_mm", "emulate"]

log = logging.getLogger("fp8train")

_FP8 = (E4M3, E5M2)
_OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


@functools.cache
def bf16_gemm_is_native(device_type: str) -> bool:
    """Whether bf16 GEMMs on ``device_type`` run faster than fp32 ones: on x86 CPUs only
    with bf16 dot-product instructions (AVX512_BF16) or AMX tiles. oneDNN also takes
    bf16 GEMMs on plain AVX-512 (PyTorch's ``_is_mkldnn_bf16_supported()`` is True
    there) but converts to fp32 and multiplies in fp32, several times slower than an
    fp32 GEMM (benchmarks/linear.py times both). Off x86, PyTorch's oneDNN probe
    decides (on Arm it asks for the BF16 extension); AVX2-only CPUs fall back to scalar
    loops. Always true off the CPU, where
    the emulation only runs the layouts ``torch._scaled_mm`` lacks."""
    if device_type != "cpu":
        return True
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        isa = [
            getattr(torch.cpu, name, None)
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        ]
        if all(probe is not None for probe in isa):
            return any(bool(probe()) for probe in isa)  # type: ignore[misc]
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def gemm_dtype(out_dtype: torch.dtype, power_of_two: bool, device_type: str) -> torch.dtype:
    """The dtype the emulated GEMM multiplies its dequantised operands in: bf16 when the
    output is bf16, every scale a power of two (so each operand is exact in bf16) and
    bf16 GEMMs are native on this CPU; fp32 otherwise (exact operands too, fp32
    accumulation). Always fp32 on a GPU: cuBLAS may reduce a bf16 GEMM's split-K partial
    sums in bf16 (torch allows it by default), while an fp32 GEMM accumulates in fp32
    even with TF32 on (FP8 values times power-of-two scales are exact in TF32)."""
    if (
        out_dtype == torch.bfloat16
        and power_of_two
        and device_type == "cpu"
        and bf16_gemm_is_native(device_type)
    ):
        return torch.bfloat16
    return torch.float32


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off for ``device_type``; entered only where it is on
    (creating and entering ``torch.autocast`` costs about as much as a small kernel,
    three times per layer step, while the FP8 backward and most GEMM calls run with it
    off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _k_axis_varies(spec: ScaleSpec, k_axis: int) -> bool:
    """Whether a ROW scale changes along the contraction axis (0 or -1 of the operand)."""
    return spec.granularity is Granularity.ROW and spec.axis != k_axis


class _Describe:
    """Both operands' repr, built only when an error message is formatted (a repr per
    call cost more than the checks themselves)."""

    def __init__(self, a: ScaledTensor, b: ScaledTensor) -> None:
        self.a, self.b = a, b

    def __str__(self) -> str:
        return f"a={self.a!r}, b={self.b!r}"


def check_pair(a: ScaledTensor, b: ScaledTensor) -> None:
    """Raise ValueError (naming both operands) unless ``a @ b`` is a valid scaled GEMM.

    Valid: 2-D ``a (M, K)`` and ``b (K, N)``; element formats both FP8 (E4M3/E5M2, any
    mix), both INT8, or both E2M1; and scale grids a hardware GEMM can apply:
    tensor/row scales constant along K (``a`` reduced over its last axis, ``b`` over its
    first), or block/MX scales of both operands on the same K chunk.
    """
    for label, operand in (("a", a), ("b", b)):
        if not isinstance(operand, ScaledTensor):
            raise TypeError(
                f"scaled_mm expects ScaledTensor operands, got {type(operand).__name__} for "
                f"{label}; quantize it first, e.g. fp8train.quantize({label}, fp8train.E4M3)"
            )
    desc = _Describe(a, b)
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise ValueError(f"scaled_mm needs 2-D operands; {desc}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"scaled_mm shape mismatch: a is {tuple(a.shape)}, b is "
            f"{tuple(b.shape)} (a's columns must equal b's rows); {desc}"
        )
    fa, fb = a.fmt, b.fmt
    if not ((fa in _FP8 and fb in _FP8) or fa is fb is INT8 or fa is fb is E2M1):
        raise ValueError(
            f"scaled_mm element formats {fa.name} x {fb.name} do not pair "
            f"(FP8 with FP8, INT8 with INT8, E2M1 with E2M1); {desc}"
        )
    ga, gb = a.granularity, b.granularity
    per_operand = (Granularity.TENSOR, Granularity.ROW)
    if ga in per_operand and gb in per_operand:
        if _k_axis_varies(a.spec, -1) or _k_axis_varies(b.spec, 0):
            raise ValueError(
                "scaled_mm row scales must be constant along K: quantise a with axis=-1 "
                f"(one scale per row) and b with axis=0 (one per column); {desc}"
            )
        return
    if ga is gb and ga in (Granularity.BLOCK, Granularity.MX):
        if a.spec.block[1] != b.spec.block[0]:
            raise ValueError(
                f"scaled_mm block scales must share the K chunk: a's tiles are "
                f"{a.spec.block}, b's {b.spec.block} (need a.block[1] == b.block[0]); {desc}"
            )
        return
    raise ValueError(
        f"scaled_mm granularities {ga.value} x {gb.value} do not pair "
        f"(tensor/row with tensor/row, block with block, mx with mx); {desc}"
    )


def _supports_scaled_mm(a: ScaledTensor, b: ScaledTensor) -> bool:
    per_operand = (Granularity.TENSOR, Granularity.ROW)
    return (
        a.fmt in _FP8
        and b.fmt in _FP8
        and a.granularity in per_operand
        and b.granularity in per_operand
        # torch._scaled_mm takes rowwise only when both operands are rowwise
        and (a.granularity is b.granularity)
    )


def scaled_mm(
    a: ScaledTensor,
    b: ScaledTensor,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Backend = "auto",
    label: str = "scaled_mm",
    accumulation: Accumulation = "fp32",
) -> torch.Tensor:
    """``a (M, K) @ b (K, N) [+ bias (N,)] -> (M, N)`` in ``out_dtype``, fp32 accumulation
    unless ``accumulation`` says otherwise.

    ``bias`` is added in the GEMM epilogue, before the single rounding to ``out_dtype``
    (as ``torch._scaled_mm`` does), which is also what inductor fuses ``mm + bias`` into:
    one code path gives the same bits eager and compiled.

    ``backend``: ``"auto"`` (the CUDA route on a GPU, where it takes the operands, else
    the emulation), ``"emulate"``, or ``"scaled_mm"`` (torch's scaled GEMM on the
    operands' device, ValueError where it cannot take them). ``label`` names the GEMM
    in the log line that says why a GPU GEMM takes the emulation (once per label and
    reason).

    ``accumulation``: ``"fp32"`` (exact fp32 accumulation, the default) or a
    :class:`~fp8train.accumulator.TensorCoreAccumulator`: the sum as the model of an
    FP8 tensor core keeps it (FP8 operands only; always the emulation, so
    ``backend="scaled_mm"`` refuses it; the bias is added to its fp32 result before
    the rounding to ``out_dtype``).

    Not promised: bitwise equality across backends (summation order may differ; the
    tests bound the difference at fp32-accumulation level).
    """
    check_pair(a, b)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(
            f"scaled_mm bias must have shape ({b.shape[1]},), got "
            f"{tuple(bias.shape)}; a={a!r}, b={b!r}"
        )
    if backend not in ("auto", "scaled_mm", "emulate"):
        raise ValueError(f"backend must be 'auto', 'scaled_mm' or 'emulate', got {backend!r}")
    if accumulation != "fp32":
        return _modelled_mm(a, b, bias, out_dtype, backend, label, accumulation)
    # Autocast would silently turn the fp32 GEMMs into bf16 ones.
    with autocast_off(a.device.type):
        if a.device.type == "cuda" and backend != "emulate":
            chosen = cuda_gemm.route(
                a.spec, b.spec, out_dtype, cuda_gemm.device_capability(a.device)
            )
            if chosen.hardware:
                return cuda_gemm.hardware_mm(a, b, bias, out_dtype, chosen)
            if backend == "scaled_mm":
                raise ValueError(f"{label}: no scaled GEMM on {a.device} takes it: {chosen.reason}")
            _announce_emulation(label, a.device, chosen.reason)
        elif backend == "scaled_mm":
            if not _supports_scaled_mm(a, b):
                raise ValueError(
                    "torch._scaled_mm takes FP8 operands with tensorwise x tensorwise or "
                    f"rowwise x rowwise scales; got {a!r} and {b!r}; use backend='emulate'"
                )
            return _torch_scaled_mm(a, b, bias, out_dtype)
        return _emulated_mm(a, b, bias, out_dtype)


# (label, reason) pairs already logged: one line per layer GEMM and cause, not per step.
_announced: set[tuple[str, str]] = set()


def _announce_emulation(label: str, device: torch.device, reason: str) -> None:
    if (label, reason) not in _announced:
        _announced.add((label, reason))
        log.warning("fp8train: %s takes the emulation on %s: %s", label, device, reason)


def _torch_scaled_mm(
    a: ScaledTensor, b: ScaledTensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    # torch._scaled_mm multiplies by its scales (dequantisation), the inverse of ours.
    inv_a = a.scale.reciprocal()
    inv_b = b.scale.reciprocal()
    b_col_major = b.data.t().contiguous().t()
    return torch._scaled_mm(
        a.data.contiguous(),
        b_col_major,
        scale_a=inv_a,
        scale_b=inv_b,
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
    )


def _modelled_mm(
    a: ScaledTensor,
    b: ScaledTensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: Backend,
    label: str,
    accumulation: object,
) -> torch.Tensor:
    """The emulated GEMM with the tensor-core accumulator model."""
    check_accumulation(accumulation, label)
    assert isinstance(accumulation, TensorCoreAccumulator)  # check_accumulation
    if backend == "scaled_mm":
        raise ValueError(
            f"{label}: the tensor-core accumulator model runs in the emulation (a hardware "
            "GEMM accumulates its own way); use backend='auto' or 'emulate'"
        )
    if a.fmt not in _FP8 or b.fmt not in _FP8:
        raise ValueError(
            f"{label}: the tensor-core accumulator models FP8 GEMMs, got {a.fmt.name} x "
            f"{b.fmt.name} (INT8 tensor cores accumulate exactly in int32); use "
            "accumulation='fp32'"
        )
    # The operands the exact emulation multiplies (bf16 only where that holds them
    # exactly), so a layer's cached operands are reused; float64 inside the model.
    power_of_two = a.spec.scales_are_power_of_two and b.spec.scales_are_power_of_two
    work = gemm_dtype(out_dtype, power_of_two, a.device.type)
    with autocast_off(a.device.type):
        out = tensor_core_mm(a.dequantize(work), b.dequantize(work), accumulation)
        if bias is not None:
            # In out_dtype first, as the emulation takes it; added in fp32 before the
            # single output rounding.
            out = out + bias.to(out_dtype).to(torch.float32)
        return out.to(out_dtype)


def _emulated_mm(
    a: ScaledTensor, b: ScaledTensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    power_of_two = a.spec.scales_are_power_of_two and b.spec.scales_are_power_of_two
    work = gemm_dtype(out_dtype, power_of_two, a.device.type)
    a_w, b_w = a.dequantize(work), b.dequantize(work)
    if bias is None:
        return torch.mm(a_w, b_w).to(out_dtype)
    # The bias in out_dtype, as torch._scaled_mm and autocast's linear take it, whatever
    # dtype the GEMM runs in; added before the single output rounding.
    return torch.addmm(bias.to(out_dtype).to(work), a_w, b_w).to(out_dtype)
