"""Former home of the fused kernels, now in the private package ``fp8train._kernels``.

A thin re-export kept while fp8train.autograd still imports from here; new code imports
from ``fp8train._kernels``.
"""

from fp8train._kernels import (
    ByteRoutes,
    KernelChoice,
    KernelMode,
    Kernels,
    Quantized,
    Saved,
    bias_grad,
    cast_with_operand,
    grid_arithmetic,
    payload_to_operand,
    prepare_gemm_operands,
    quantize_current,
    quantize_given,
    quantize_many,
    restore_many,
    shared_kernels,
)

__all__ = [
    "ByteRoutes",
    "KernelChoice",
    "KernelMode",
    "Kernels",
    "Quantized",
    "Saved",
    "bias_grad",
    "cast_with_operand",
    "grid_arithmetic",
    "payload_to_operand",
    "prepare_gemm_operands",
    "quantize_current",
    "quantize_given",
    "quantize_many",
    "restore_many",
    "shared_kernels",
]
