"""``kernels="auto"``: the compiled kernels where this torch and device can compile them,
else the eager ones.

Resolved lazily, per device type, on the first kernel call that sees a tensor of that
device (a layer may be built on the meta device and moved later), and logged once per
process and device type on the "fp8train" logger, with the reason: at INFO when it
picks the compiled kernels, as a warning when it falls back to the slower eager ones.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

from fp8train._kernels.capture import standalone_compile_available

__all__ = ["KernelChoice", "KernelMode", "compile_blocker", "resolve_auto"]

KernelMode = Literal["eager", "compiled"]
KernelChoice = Literal["auto", "eager", "compiled"]

log = logging.getLogger("fp8train")


def compile_blocker(device_type: str) -> str | None:
    """Why the compiled kernels cannot run on ``device_type`` here, or None if they can.

    CPU: inductor needs a C++ compiler, found the way inductor itself finds it
    (``torch._inductor.cpp_builder.get_cpp_compiler``, which runs ``<cxx> --version``
    once per process). CUDA: inductor needs triton. Other devices: the compiled kernels
    were never checked there.
    """
    if not standalone_compile_available():
        return "this torch has no torch._inductor.standalone_compile (it came in torch 2.8)"
    if device_type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except (exc.InvalidCxxCompiler, OSError, RuntimeError) as e:
            return f"inductor finds no C++ compiler for CPU code ({type(e).__name__}: {e})"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not importable, and inductor needs it on CUDA"
    return f"no compiled kernels for device type {device_type!r}"


@functools.cache
def resolve_auto(device_type: str) -> KernelMode:
    """What ``kernels="auto"`` means on ``device_type``: "compiled" where
    :func:`compile_blocker` finds nothing in the way, else "eager". Cached, so the
    choice and its log line come once per process and device type."""
    blocker = compile_blocker(device_type)
    if blocker is None:
        log.info(
            "fp8train: kernels='auto' chose 'compiled' on %s: inductor can compile here "
            "(standalone_compile and a %s backend found)",
            device_type,
            "C++" if device_type == "cpu" else "triton",
        )
        return "compiled"
    # A warning, not an info line: the eager kernels are the slow path, and a user who
    # expected the fast one should hear why without turning on logging.
    log.warning("fp8train: kernels='auto' chose 'eager' on %s: %s", device_type, blocker)
    return "eager"
