"""Fused quantisation kernels, run eagerly or through ``torch.compile``.

The hot path of an FP8 linear on the CPU is not the GEMM but the passes around it:
amax, scale, cast, and turning the FP8 payload back into the bf16 operand the emulated
GEMM consumes (eager ``float8 -> bf16`` conversion is scalar code, about as slow as the
GEMM itself). :func:`cast_with_operand` does all of the cast side in one pure function,
so inductor fuses it into one loop: read ``x``, write the FP8 payload and the bf16
operand. The arithmetic is identical to the reference pipeline step by step (fp32
product, saturating RNE cast, multiplication by the fp32 reciprocal), and the tests
check eager and compiled kernels bit for bit.

For E4M3/E5M2 the FP8 values are computed in fp32 arithmetic
(:func:`fp8train.cast.fp8_grid_values`) and the operand is made from them, so the FP8
bytes are only written where something keeps them (a payload saved for backward, an
observer, a GPU's ``torch._scaled_mm``): each fp32 <-> FP8 conversion costs 2-4x a
multiply pass on the CPU, and the emulated GEMM needs only the operand. On the lab GPT
(d128, 2026-11-29, interleaved A/B) this took 7-8 ms off a 138-141 ms row, block or MX
step and about 1 ms off a tensorwise one. Where bytes are made, compiled CPU kernels
take them from the values' fp32 bit fields (:func:`fp8train.cast.fp8_grid_bytes`; a
payload alone from the input's bits, :func:`fp8train.cast.fp8_codes`) or by torch's
conversion, whichever :func:`bytes_from_bits_faster` measured faster on this CPU (Zen 4:
the bit fields, a 16.8 M-element fp32 cast pass 7.3-8.2 -> 4.5-5.5 ms; Ice Lake: the
conversion, 3-4x faster than the bit fields); eager kernels convert. With current
scaling (the scale from the tensor's own amax, not MX) no product can round past max,
and the saturating clamp, a fifth of the kernel, is skipped (``own_amax_scale``; the
same bits).

``Kernels("compiled")`` compiles lazily on first use, with the row count dynamic and
the other dimensions static: each (spec, dtype, shape but rows) compiles once however
many batch sizes and layers use it (a graph whose tracing needed whole blocks of rows
gets a sibling for a row count outside them). The graph is traced by ``make_fx`` and
compiled by inductor's ``standalone_compile``; the layer then calls inductor's code
directly, without ``torch.compile``'s frame evaluation and guards (about 45 us a call,
two calls per layer step: 2-9 ms off a lab GPT d128 step, tensorwise 1.27x -> 1.23x
and rowwise 1.42x -> 1.35x of bf16 in an interleaved A/B, 2026-11-29). A static last
dimension matters: with it symbolic, inductor's CPU code for 1x128, 128x128 and MX
tiles ran 40-70 ms on a 2048x512 tensor (index arithmetic per element, no
vectorisation), against about 1 ms with it static (benchmarks/cast.py, 2026-11-28).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from fp8train.cast import (
    cast_finite,
    fp8_grid_values,
    fp8_payload,
    fp8_word_values,
)
from fp8train.formats import E4M3, E5M2
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    compute_amax,
    multiply_by_scale,
    scale_from_amax,
)

__all__ = [
    "KernelMode",
    "Kernels",
    "bias_grad",
    "bytes_from_bits_faster",
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

KernelMode = Literal["eager", "compiled"]


def grid_arithmetic(spec: ScaleSpec) -> bool:
    """Whether :func:`cast_with_operand` rounds ``spec`` by float arithmetic
    (:func:`fp8train.cast.fp8_grid_values`) and can skip the FP8 payload."""
    return spec.fmt in (E4M3, E5M2) and spec.saturate and spec.rounding == "nearest"


def cast_with_operand(
    x2d: torch.Tensor,
    scale: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
    own_amax_scale: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(payload, operand)``: ``payload = cast(x * scale)`` and, if ``operand_dtype`` is
    given, ``operand = payload * (1 / scale)`` in that dtype (what ``dequantize`` gives).

    ``keep_payload=False``: the payload is not made (None) where :func:`grid_arithmetic`
    holds and an operand is asked for; the operand then comes from the FP8 values
    computed in fp32 arithmetic, without the FP8 conversions (the same bits: the values
    are those of the payload). Elsewhere the payload is returned anyway.

    ``own_amax_scale=True``: ``scale`` is ``scale_from_amax`` of ``x2d``'s own amax, so
    for every granularity but MX no product can round past ``fmt.max`` and the grid
    arithmetic skips its clamp (the bound is argued in fp8train/cast.py; the same bits).

    ``x2d`` must be finite (the caller checked its amax). Upcasting before scaling keeps
    eager and compiled rounding identical.
    """
    scaled = multiply_by_scale(x2d, scale, spec)
    if grid_arithmetic(spec):
        clamp = not (own_amax_scale and spec.granularity is not Granularity.MX)
        # Bytes from bit fields only in CPU code traced for inductor, and only where
        # that measured faster than the conversion (bytes_from_bits_faster).
        from_bits = _tracing_for_inductor and scaled.is_cpu and bytes_from_bits_faster()
        if operand_dtype is None:  # the payload alone, rounded from the products
            return fp8_payload(scaled, spec.fmt, clamp=clamp, from_bits=from_bits), None
        values = fp8_grid_values(scaled, spec.fmt, clamp=clamp)
        payload = None
        if keep_payload:  # from the values made anyway: no rounding left to do
            payload = fp8_payload(values, spec.fmt, on_grid=True, from_bits=from_bits)
        return payload, multiply_by_scale(values, scale.reciprocal(), spec).to(operand_dtype)
    payload = cast_finite(scaled, spec.fmt, saturate=spec.saturate)
    if operand_dtype is None:
        return payload, None
    return payload, payload_to_operand(payload, scale, spec, operand_dtype)


def quantize_current(
    x2d: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Current scaling in one call: ``(amax, scale, payload, operand)`` (the payload as
    :func:`cast_with_operand` gives it).

    The caller checks ``amax`` is finite before using anything else it returns (with a
    NaN/inf amax the scale and payload are meaningless and must be discarded).
    """
    amax = compute_amax(x2d, spec)
    scale = scale_from_amax(amax, spec)
    payload, operand = cast_with_operand(
        x2d, scale, spec, operand_dtype, keep_payload, own_amax_scale=True
    )
    return amax, scale, payload, operand


def quantize_given(
    x2d: torch.Tensor,
    scale: torch.Tensor,
    spec: ScaleSpec,
    operand_dtype: torch.dtype | None,
    keep_payload: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Delayed scaling in one pass: ``(amax, scale, payload, operand)`` with ``scale``
    given (from earlier steps' amaxes) and this tensor's amax taken alongside the cast,
    for the caller to check and record."""
    amax = compute_amax(x2d, spec)
    payload, operand = cast_with_operand(x2d, scale, spec, operand_dtype, keep_payload)
    return amax, scale, payload, operand


def payload_to_operand(
    payload: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec, dtype: torch.dtype
) -> torch.Tensor:
    """``payload * (1 / scale)`` in ``dtype`` for a 2-D payload (ScaledTensor.dequantize).

    Traced for inductor by the standalone capture (the default) on a CPU without
    AVX-512, an E4M3/E5M2 payload is decoded from int32 words
    (:func:`fp8train.cast.fp8_word_values`, the same values): a saved activation's
    restore in the lab GPT's backward, 2048x512, 2.5 -> 1.1 ms on AVX2 (Zen 3, one
    thread). With AVX-512 inductor's own conversion is the faster one (Zen 4, two
    threads, to bf16: E4M3 2048x512 226-235 us against 322-423 us from words, 2048x128
    69-70 against 106-133 us). Eager and the dynamo capture convert with
    ``payload.float()``."""
    return multiply_by_scale(_payload_values(payload), scale.reciprocal(), spec).to(dtype)


# True while _StandaloneCompiled traces a function for inductor (never in eager calls).
_tracing_for_inductor = False


@functools.cache
def bytes_from_bits_faster() -> bool:
    """Whether inductor's CPU code on this machine makes FP8 payload bytes faster from
    fp32 bit fields (:func:`fp8train.cast.fp8_codes`) than by torch's conversion:
    measured on a 1024x1024 fp32 E4M3 cast, both compiled (3.5-6.3 s on a 2-core Ice
    Lake), once per machine: the answer is kept beside inductor's own cache
    (:func:`_probe_memo_path`), keyed by this CPU, thread count and torch version, so
    later processes on the same machine read it instead of measuring. Both routes give
    the same bytes.

    Why measured and not assumed: inductor has no vector code for a bit view; it stores
    the vector, moves each lane in scalar code and loads it back, and what that costs
    depends on the CPU. On a 2-core AMD EPYC Zen 4 (2026-11-29) the bit fields were
    faster (a 16.8 M-element fp32 cast with its payload, 4.5-5.5 ms against 7.3-8.2 ms);
    on a 2-core Intel Xeon Ice Lake (2026-12-03) the conversion was, by far (a 2048x512
    bf16 payload alone 1.35 -> 0.41 ms, with its fp32 operand 2.2 -> 0.62 ms). A run
    of timing noise, or a stale or edited memo, can only pick the slower route, never
    other bits.
    """
    key = _probe_memo_key()
    path = _probe_memo_path()
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        if memo.get("key") == key and isinstance(memo.get("bytes_from_bits"), bool):
            return bool(memo["bytes_from_bits"])
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or not ours: measure
    best = _time_byte_routes()
    faster = best[True] < best[False]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # written whole, then renamed: a reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(
            json.dumps(
                {
                    "key": key,
                    "bytes_from_bits": faster,
                    "best_s": {"bit_fields": best[True], "conversion": best[False]},
                }
            ),
            encoding="utf-8",
        )
        os.replace(tmp, path)
    except OSError:  # a read-only cache: measure again next time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return faster


def _probe_memo_path() -> Path:
    """Where :func:`bytes_from_bits_faster` keeps its answer: inside inductor's cache
    directory (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``),
    so that clearing that cache clears it too."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fp8train" / "bytes_from_bits_faster.json"


def _probe_memo_key() -> dict[str, Any]:
    """What the measured answer depends on: the CPU (model name and ISA flags, which on
    a VM change from one boot to the next), the thread count and the torch version."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags", "cpu family", "model") and name not in cpu:
                cpu[name] = value.strip()
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _time_byte_routes() -> dict[bool, float]:
    """Best of 7 alternating runs of the compiled probe cast by each route (True: bit
    fields), in seconds."""
    import time

    x = torch.linspace(-600.0, 600.0, 1 << 20).reshape(1024, 1024)  # no RNG drawn
    scale = torch.tensor(0.75)
    routes = {
        bits: torch.compile(functools.partial(_probe_cast, from_bits=bits), dynamic=False)
        for bits in (True, False)
    }
    best = dict.fromkeys(routes, float("inf"))
    for _ in range(7):  # alternating, best of 7: the least disturbed run of each
        for bits, fn in routes.items():
            t0 = time.perf_counter()
            fn(x, scale)
            best[bits] = min(best[bits], time.perf_counter() - t0)
    return best


def _probe_cast(x: torch.Tensor, scale: torch.Tensor, from_bits: bool) -> torch.Tensor:
    return fp8_payload(x * scale, E4M3, clamp=True, from_bits=from_bits)


# Whether traced CPU restores read payloads as int32 words (payload_to_operand): on CPUs
# without AVX-512, where inductor converts FP8 bytes in scalar code. Read at tracing.
_WORD_RESTORES_ON_CPU = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _payload_values(payload: torch.Tensor) -> torch.Tensor:
    """``payload.float()``, from int32 words where that is exact, faster (CPU without
    AVX-512) and traced for inductor (last dimension a multiple of 4; :func:`_flatten` hands
    compiled graphs byte tensors
    contiguous at a 4-byte offset)."""
    if (
        _tracing_for_inductor
        and _WORD_RESTORES_ON_CPU
        and payload.device.type == "cpu"
        and sys.byteorder == "little"
        and payload.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        and payload.dim() >= 1
        and payload.shape[-1] % 4 == 0
    ):
        return fp8_word_values(payload)
    return payload.float()


def bias_grad(dy2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient: ``dy2d (M, N)`` summed over its rows, accumulated in fp32,
    returned in ``dtype`` (the bias's).

    Why a kernel: given a bf16 ``dy``, eager ATen copies all of it to fp32 before summing
    (2048x512: 186 us against 58 us compiled; 8192x768: 3.2 ms against 0.67 ms, 2026-11-29).
    The compiled sum adds in another order than the eager one, so this is the one result
    of the kernel sets that is not bitwise equal between them; both accumulate in fp32,
    and tests/test_kernels.py bounds the difference by fp32 summation's error.
    """
    return dy2d.sum(0, dtype=torch.float32).to(dtype)


def quantize_many(
    tensors: tuple[torch.Tensor, ...],
    specs: tuple[ScaleSpec, ...],
    works: tuple[torch.dtype | None, ...],
    scales: tuple[torch.Tensor | None, ...] = (),
    keep_payloads: tuple[bool, ...] = (),
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], ...]:
    """:func:`quantize_current` of every operand of a GEMM in one call (or
    :func:`quantize_given` where ``scales`` holds a scale): compiled, that is one dispatch
    instead of one per operand (each costs ~50 us of Python on the CPU, as much as
    quantising a small activation). ``keep_payloads``: per operand, as in
    :func:`cast_with_operand` (default: keep every payload)."""
    given = scales or (None,) * len(tensors)
    keeps = keep_payloads or (True,) * len(tensors)
    return tuple(
        quantize_current(t, s, w, k) if g is None else quantize_given(t, g, s, w, k)
        for t, s, w, g, k in zip(tensors, specs, works, given, keeps, strict=False)
    )


def restore_many(
    payloads: tuple[torch.Tensor, ...],
    scales: tuple[torch.Tensor, ...],
    specs: tuple[ScaleSpec, ...],
    dtypes: tuple[torch.dtype, ...],
) -> tuple[torch.Tensor, ...]:
    """:func:`payload_to_operand` of several saved payloads in one call."""
    return tuple(
        payload_to_operand(p, s, sp, d)
        for p, s, sp, d in zip(payloads, scales, specs, dtypes, strict=False)
    )


# A saved FP8 payload standing for the high-precision tensor it dequantises to:
# (payload, scale, spec, dtype), the arguments of payload_to_operand.
Saved = tuple[torch.Tensor, torch.Tensor, ScaleSpec, torch.dtype]


def prepare_gemm_operands(
    sources: tuple[torch.Tensor | Saved, ...],
    specs: tuple[ScaleSpec, ...],
    works: tuple[torch.dtype | None, ...],
    amax_windows: tuple[torch.Tensor | None, ...],
    saved: tuple[Saved, ...],
    keep_payloads: tuple[bool, ...] = (),
) -> tuple[
    tuple[torch.Tensor, ...], tuple[Any, ...], torch.Tensor | None, tuple[torch.Tensor, ...]
]:
    """Everything one GEMM step needs from the kernels, in one call:
    ``(dequantised, quantized, all_finite, restored)``.

    * ``sources``: the tensors to quantise (:func:`quantize_many` with ``specs`` and
      ``works``). A :data:`Saved` payload is dequantised first (its high-precision
      values come back in ``dequantised``, in order), so re-quantising a saved
      activation along another axis is one call, not two. ``keep_payloads``: as in
      :func:`quantize_many`.
    * ``amax_windows``: per source, None for current scaling, or a delayed-scaling
      window (:meth:`fp8train.AmaxHistory.to_reduce`): the scale is then
      ``scale_from_amax`` of its max over dim 0, computed in this call (eager, that
      scale was about 50 us of small ops per operand, three per layer step).
    * ``all_finite``: one bool tensor, whether every amax is finite (None without
      sources); the caller checks it once instead of once per operand.
    * ``restored``: :func:`payload_to_operand` of each ``saved`` payload.
    """
    hps = tuple(s if isinstance(s, torch.Tensor) else payload_to_operand(*s) for s in sources)
    scales = tuple(
        None if w is None else scale_from_amax(w.amax(dim=0), spec)
        for w, spec in zip(amax_windows, specs, strict=False)
    )
    quantized = quantize_many(hps, specs, works, scales, keep_payloads)
    finite = (
        torch.stack([torch.isfinite(q[0]).all() for q in quantized]).all() if quantized else None
    )
    dequantised = tuple(
        h for s, h in zip(sources, hps, strict=False) if not isinstance(s, torch.Tensor)
    )
    return dequantised, quantized, finite, tuple(payload_to_operand(*s) for s in saved)


class Kernels:
    """The kernel set one layer uses: ``"eager"`` (plain PyTorch ops) or ``"compiled"``
    (the same functions through ``torch.compile``, inductor's CPU backend)."""

    def __init__(self, mode: KernelMode = "eager") -> None:
        if mode not in ("eager", "compiled"):
            raise ValueError(f"kernels must be 'eager' or 'compiled', got {mode!r}")
        self.mode = mode
        self.amax: Callable[[torch.Tensor, ScaleSpec], torch.Tensor] = compute_amax
        self.cast_with_operand: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]] = (
            cast_with_operand
        )
        self.payload_to_operand: Callable[..., torch.Tensor] = payload_to_operand
        self.quantize_current: Callable[..., tuple[Any, ...]] = quantize_current
        self.quantize_many: Callable[..., tuple[Any, ...]] = quantize_many
        self.restore_many: Callable[..., tuple[torch.Tensor, ...]] = restore_many
        self.prepare_gemm_operands: Callable[..., tuple[Any, ...]] = prepare_gemm_operands
        self.bias_grad: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = bias_grad
        if mode == "compiled":
            self.bias_grad = _compiled(bias_grad)
            self.prepare_gemm_operands = _compiled(prepare_gemm_operands)
            self.quantize_current = _compiled(quantize_current)
            self.quantize_many = _compiled(quantize_many)
            self.restore_many = _compiled(restore_many)
            self.amax = _compiled(compute_amax)
            self.cast_with_operand = _compiled(cast_with_operand)
            self.payload_to_operand = _compiled(payload_to_operand)

    def __repr__(self) -> str:
        return f"Kernels({self.mode!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # deepcopy/pickle rebuild instead of copying
        return (Kernels, (self.mode,))


@functools.cache
def shared_kernels(mode: KernelMode) -> Kernels:
    """One :class:`Kernels` per mode, for callers that choose the set per call."""
    return Kernels(mode)


# How a compiled kernel's FP8 output is stored decides how inductor vectorises the
# whole loop. Stored as E4M3 it runs 16 fp32 lanes and ran fastest everywhere we looked;
# stored as E5M2 or as uint8 the loop went 3-4x slower with some inputs (torch 2.13,
# 2048x512 bf16 -> E5M2 codes: 0.97 ms as E5M2 or uint8 against 0.30 ms as E4M3; the old
# E5M2 conversion: 1.46 ms as E5M2 against 0.35 ms as uint8). So the standalone capture
# hands every E5M2 payload out viewed as E4M3 bytes and views it back (it knows which
# outputs were E5M2 from tracing); the dynamo capture, which does not, uses uint8 (no
# kernel returns uint8 otherwise; INT8 payloads are int8).
def _e5m2_as_e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float8_e4m3fn) if t.dtype == torch.float8_e5m2 else t


def _e5m2_as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e5m2 else t


def _bytes_as_e5m2(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float8_e5m2) if t.dtype == torch.uint8 else t


_COMPILED: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}


def _compiled(fn: Callable[..., Any], capture: str | None = None) -> Callable[..., Any]:
    """``fn`` compiled by inductor, one wrapper per function shared by every layer (so
    graphs are reused across layers with the same key).

    ``capture``: how the graph is taken. ``"standalone"`` (the default where this torch
    has ``torch._inductor.standalone_compile``) traces ``fn`` once per key with
    ``make_fx`` and calls inductor's compiled graph directly; ``"dynamo"`` goes through
    ``torch.compile``. Same graph, same bits (tests/test_kernels.py checks both), but a
    ``torch.compile`` call costs about 45 us more (dynamo's frame evaluation and guards
    on every spec field), as much as quantising a small activation, twice per layer step.
    """
    capture = capture or _default_capture()
    if (fn, capture) not in _COMPILED:
        _COMPILED[fn, capture] = (
            _StandaloneCompiled(fn) if capture == "standalone" else _dynamo_compiled(fn)
        )
    return _COMPILED[fn, capture]


# --- capture by make_fx + inductor's standalone_compile ---------------------------------
# A call is flattened in one pass into its tensors and a key: the structure, every
# non-tensor argument (specs, dtypes, flags: constants of the graph) and per tensor its
# dtype, device and shape, except that a row count of 2 or more (of a tensor of rank
# >= 2) is symbolic in the graph. 0 and 1 rows specialise, hence their own keys. Both
# captures select graphs by this key.


class _Slot(int):
    """Where a tensor sat in a flattened structure: its index in the tensor list."""


def _flatten(obj: Any, tensors: list[torch.Tensor], key: list[Any]) -> Any:
    """``obj`` with tensors replaced by slots (appended to ``tensors``, described in
    ``key``); nested tuples and lists become tuples."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous() or (obj.element_size() == 1 and obj.storage_offset() % 4):
            # The graph is traced for contiguous inputs, and reads byte tensors as int32
            # words (payload_to_operand), which needs a 4-byte aligned offset.
            obj = obj.clone(memory_format=torch.contiguous_format)
        if obj.requires_grad:  # a Parameter: the graph takes plain tensors
            obj = obj.detach()
        shape = obj.shape
        key.append(
            (obj.dtype, obj.device, (min(shape[0], 2), *shape[1:]) if len(shape) >= 2 else shape)
        )
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, (tuple, list)):
        key.append(len(obj))
        return tuple(_flatten(o, tensors, key) for o in obj)
    key.append(("leaf", obj))
    return obj


def _fill(template: Any, tensors: Any) -> Any:
    """The structure ``_flatten`` took apart, with ``tensors`` back in their slots."""
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, tuple):
        return tuple(_fill(t, tensors) for t in template)
    return template


def _fake_inputs(tensors: list[torch.Tensor], dynamic_rows: bool) -> tuple[list[Any], Any]:
    """Fake copies of ``tensors`` (row counts symbolic if ``dynamic_rows``) and their fake
    mode, whose shape environment records what tracing and compiling assumed of them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    # duck_shape=False: equal row counts at tracing (x and W both 256 rows) must not
    # become one symbol, or the graph would demand them equal ever after.
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    fakes = []
    for t in tensors:
        dims = [DimDynamic.STATIC] * t.dim()
        if dynamic_rows and t.dim() >= 2 and t.shape[0] >= 2:
            dims[0] = DimDynamic.DYNAMIC
        fakes.append(
            mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        )
    return fakes, mode


class _Graph(NamedTuple):
    run: Callable[..., Any]  # inductor's compiled graph, flat tensors in and out
    out_template: Any  # where its outputs go in the function's result
    e5m2: frozenset[int]  # output slots holding E5M2 payloads viewed as E4M3
    holds: Callable[[list[torch.Tensor]], bool] | None  # which row counts; None: all


def _guard_check(shape_env: Any, fakes: list[Any]) -> Callable[[list[torch.Tensor]], bool] | None:
    """What tracing and compiling assumed of the row counts (e.g. whole 32-row MX
    blocks), as a check on concrete inputs (dynamo's guards, evaluated here since
    nothing else does); None if they assumed nothing."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    expression = shape_env.produce_guards_expression(fakes)
    if expression is None:
        return None
    code = compile(expression, "<fp8train guards>", "eval")

    def holds(tensors: list[torch.Tensor]) -> bool:
        return bool(eval(code, SYMPY_INTERP, {"L": {f"t{i}": t for i, t in enumerate(tensors)}}))

    return holds


class _StandaloneCompiled:
    """``fn`` through make_fx + ``standalone_compile``: ``graphs`` maps each key to the
    graphs compiled for it, each with the row counts it holds for (a new graph is
    compiled when none holds, as dynamo would recompile)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.graphs: dict[tuple[Any, ...], list[_Graph]] = {}

    def compile_graph(self, template: Any, tensors: list[torch.Tensor]) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        out_template: list[Any] = []
        e5m2: set[int] = set()

        def flat_fn(*ts: torch.Tensor) -> list[torch.Tensor]:
            outs: list[torch.Tensor] = []
            out_template[:] = [_flatten(self.fn(*_fill(template, ts)), outs, [])]
            e5m2.update(i for i, t in enumerate(outs) if t.dtype == torch.float8_e5m2)
            return [_e5m2_as_e4m3(t) for t in outs]

        fakes, mode = _fake_inputs(tensors, dynamic_rows=True)
        shapes = None  # the only input shapes a static graph takes
        # An op refusing symbolic sizes is expected here; fake tensors would log it as an
        # error before it reaches us.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        disabled, fake_log.disabled = fake_log.disabled, True
        bytes_from_bits_faster()  # measured before tracing: it compiles, tracing cannot
        global _tracing_for_inductor
        _tracing_for_inductor = True
        try:
            gm = make_fx(flat_fn, tracing_mode="fake")(*fakes)
        except RuntimeError:
            # An op that needs concrete sizes (a block grid's padding): these shapes only.
            shapes = [t.shape for t in tensors]
            fakes, mode = _fake_inputs(tensors, dynamic_rows=False)
            gm = make_fx(flat_fn, tracing_mode="fake")(*fakes)
        finally:
            fake_log.disabled = disabled
            _tracing_for_inductor = False
        # Compiled in the tracing's own fake mode (its shape environment, without duck
        # shaping): what inductor assumes of the rows joins tracing's guards.
        run = torch._inductor.standalone_compile(
            gm, fakes, dynamic_shapes="from_example_inputs", fake_mode=mode, options={}
        )
        holds: Callable[[list[torch.Tensor]], bool] | None = None
        if shapes is not None:

            def holds(ts: list[torch.Tensor]) -> bool:
                return [t.shape for t in ts] == shapes
        else:
            holds = _guard_check(mode.shape_env, fakes)
        return _Graph(run, out_template[0], frozenset(e5m2), holds)

    def __call__(self, *args: Any) -> Any:
        tensors: list[torch.Tensor] = []
        key: list[Any] = []
        template = _flatten(args, tensors, key)
        candidates = self.graphs.get(tuple(key), ())
        graph = next((g for g in candidates if g.holds is None or g.holds(tensors)), None)
        if graph is None:
            graph = self.compile_graph(template, tensors)
            self.graphs.setdefault(tuple(key), []).append(graph)
        outs = graph.run(*tensors)
        if graph.e5m2:
            outs = [o.view(torch.float8_e5m2) if i in graph.e5m2 else o for i, o in enumerate(outs)]
        return _fill(graph.out_template, outs)


# --- capture by torch.compile (dynamo) ---------------------------------------------------
# dynamo caches compiled graphs per code object and, past 8 of them (its default
# recompile limit), silently runs the function eagerly. One function serves every
# (spec, dtype, last dimension), a few dozen in a run of every recipe, so each such key
# gets its own copy of the code object and with it its own cache of one or two graphs.
# (Raising the limit around each call instead cost 26 us a call, as much as the call.)


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    code = fn.__code__.replace()  # equal code, new identity
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (nested tuples and lists become
    tuples; anything else passes through)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return tuple(_map_tensors(fn, o) for o in obj)
    return obj


def _with_dynamic_rows(t: torch.Tensor) -> torch.Tensor:
    # A plain tensor (not a Parameter, whose shape dynamo would guard statically) with a
    # dynamic row count; "maybe" because a 0/1-row tensor specialises.
    t = t.detach()
    if t.dim() >= 2:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


def _holds_bytes(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.uint8
    return isinstance(obj, (tuple, list)) and any(_holds_bytes(o) for o in obj)


def _returning_e5m2_as_bytes(fn: Callable[..., Any]) -> Callable[..., Any]:
    def returning_bytes(*args: Any) -> Any:
        return _map_tensors(_e5m2_as_bytes, fn(*args))

    return returning_bytes


def _dynamo_compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    # key -> (compiled graph, whether its outputs hold E5M2 bytes to view back)
    graphs: dict[Any, tuple[Callable[..., Any], bool]] = {}
    traced = _returning_e5m2_as_bytes(fn)

    def call(*args: Any) -> Any:
        tensors: list[torch.Tensor] = []
        key: list[Any] = []
        template = _flatten(args, tensors, key)
        marked = _fill(template, [_with_dynamic_rows(t) for t in tensors])
        entry = graphs.get(tuple(key))
        if entry is None:
            compiled = torch.compile(_fresh_copy(traced), dynamic=False)
            out = compiled(*marked)
            graphs[tuple(key)] = entry = (compiled, _holds_bytes(out))
        else:
            out = entry[0](*marked)
        return _map_tensors(_bytes_as_e5m2, out) if entry[1] else out

    return call


@functools.cache
def _default_capture() -> str:
    """Standalone where this torch has standalone_compile (it came in 2.8), else
    torch.compile."""
    import torch._inductor

    return "standalone" if hasattr(torch._inductor, "standalone_compile") else "dynamo"
