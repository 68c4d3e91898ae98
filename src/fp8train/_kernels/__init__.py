"""The speed layer, behind one door: everything that makes the quantisation fast.

The reference layer (formats, cast, scaling, history, tensor) never imports this
package; everything here is tested bitwise against it.

* ``encoders``: E4M3/E5M2 encoders and decoders written for inductor's code generation
  (float arithmetic, fp32 bit fields, int32 words), each equal to the reference cast.
* ``routes``: :class:`ByteRoutes`, which of those the kernels use on the CPU (an
  argument with one default, never a global).
* ``fused``: the fused pure functions (amax, scale, cast and operand in one pass).
* ``capture``: compiling them (make_fx + inductor's ``standalone_compile``).
* ``auto``: what ``kernels="auto"`` resolves to, per device type.
* ``kernel_set``: :class:`Kernels`, the typed kernel set a layer calls.
"""

from fp8train._kernels.auto import KernelChoice, KernelMode, compile_blocker, resolve_auto
from fp8train._kernels.fused import (
    Quantized,
    bias_grad,
    cast_with_operand,
    grid_arithmetic,
    payload_to_operand,
    quantize_current,
    quantize_given,
)
from fp8train._kernels.kernel_set import Kernels, shared_kernels
from fp8train._kernels.routes import DEFAULT_ROUTES, ByteRoutes, PayloadBytes

__all__ = [
    "DEFAULT_ROUTES",
    "ByteRoutes",
    "KernelChoice",
    "KernelMode",
    "Kernels",
    "PayloadBytes",
    "Quantized",
    "bias_grad",
    "cast_with_operand",
    "compile_blocker",
    "grid_arithmetic",
    "payload_to_operand",
    "quantize_current",
    "quantize_given",
    "resolve_auto",
    "shared_kernels",
]
