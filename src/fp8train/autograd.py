"""The FP8 linear: one forward GEMM and two backward GEMMs in one autograd function.

Shapes: ``x (..., K)`` is viewed as ``x2d (M, K)``; ``W (N, K)``; ``dy (M, N)``.

* output      ``y  = x2d . W^T``  -- a: input (M, K),        b: weight^T (K, N)
* grad_input  ``dx = dy . W``     -- a: grad_output (M, N),  b: weight (N, K), contracts N
* grad_weight ``dW = dy^T . x2d`` -- a: grad_output^T (N, M), b: input (M, K), contracts M

Every operand passes through :func:`_quantize_gemm_operands` (tensor, spec, role). When the
backward GEMM contracts the other axis of a tensor than the forward did (row, 1x128 and
MX scales), that tensor is quantised again along the new axis:

* the weight from the high-precision master weight (exact: no double rounding);
* the input from what was saved for backward. With ``save_fp8_activations`` that is the
  forward's FP8 payload, dequantised and re-quantised: with power-of-two scales an FP8
  value re-scaled by a power of two is again an FP8 value unless it drops into the
  subnormal range of the new scale (it then loses low mantissa bits) or, for MX's floor
  rule, saturates. So the weight gradient sees the input rounded twice in those corners;
  ``save_fp8_activations=False`` saves the input in the compute dtype and avoids it.

A non-finite operand (NaN/inf: a bad input, or a loss-scale overflow in ``dy``) never
produces a scale and never enters an amax history: that GEMM runs in high precision,
so the NaN/inf propagates to the output or gradient where the loss scaler sees it, and
the layer reports it by name.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fp8train.history import AmaxHistory
from fp8train.kernels import Kernels, Saved, shared_kernels
from fp8train.matmul import autocast_off, gemm_dtype, scaled_mm
from fp8train.recipes import Recipe
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    apply_scale_and_cast,
    scale_from_amax,
)
from fp8train.tensor import ScaledTensor

__all__ = ["LayerState", "NonFiniteWarning", "fp8_linear"]

log = logging.getLogger("fp8train")

# Observer signature: (layer_state, role, high-precision tensor, scaled tensor or None).
Observer = Callable[["LayerState", str, torch.Tensor, "ScaledTensor | None"], None]


class NonFiniteWarning(RuntimeWarning):
    """A layer met NaN/inf in an operand; no scale or history was updated."""


class LayerState:
    """Per-layer recipe state: the layer's name, delayed-scaling histories, counters.

    Owned by the module; updated during forward and backward, no extra call needed.
    """

    ROLES = ("input", "weight", "grad_output")

    def __init__(self, name: str, recipe: Recipe, kernels: Kernels | None = None) -> None:
        self.name = name
        self.recipe = recipe
        self.kernels = kernels or Kernels("eager")
        self.histories: dict[str, AmaxHistory] = {}
        if recipe.scaling == "delayed":
            self.histories = {
                r: AmaxHistory(recipe.history_len, recipe.history_algo) for r in self.ROLES
            }
        self.nonfinite: dict[str, int] = {r: 0 for r in self.ROLES}
        self.observer: Observer | None = None
        # Set by fp8train.distributed.setup: maps a local amax to the max over ranks, so
        # every rank records the same amax and the delayed-scaling histories stay identical.
        self.amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": {r: h.state_dict() for r, h in self.histories.items()},
            "nonfinite": dict(self.nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["histories"]) != set(self.histories):
            raise ValueError(
                f"layer {self.name}: checkpoint has amax histories for "
                f"{sorted(state['histories'])}, recipe {self.recipe.name!r} keeps "
                f"{sorted(self.histories)}"
            )
        for role, h in state["histories"].items():
            self.histories[role].load_state_dict(h)
        self.nonfinite.update(state.get("nonfinite", {}))

    def report_nonfinite(self, role: str, shape: torch.Size) -> None:
        self.nonfinite[role] += 1
        msg = (
            f"fp8train: layer {self.name!r}: {role} of shape {tuple(shape)} holds NaN/inf; "
            "no scale or amax history was updated and this GEMM ran in high precision"
        )
        if role == "grad_output":
            # The usual cause is a loss-scale overflow, which the loss scaler handles.
            log.info(msg)
        else:
            warnings.warn(msg, NonFiniteWarning, stacklevel=4)


def _reusable_transposed(spec: ScaleSpec) -> bool:
    """Whether contracting the other axis can reuse this quantisation unchanged."""
    g = spec.granularity
    return g is Granularity.TENSOR or (g is Granularity.BLOCK and spec.block[0] == spec.block[1])


def operand_scale(
    amax: torch.Tensor, spec: ScaleSpec, role: str, state: LayerState
) -> torch.Tensor:
    """The scale of an operand whose amax (finite) is ``amax``.

    Current scaling: from ``amax`` itself. Delayed: from the window of *earlier* amaxes
    (``amax`` itself on the very first step), then ``amax`` is recorded.
    """
    history = state.histories.get(role)
    if history is None:
        return scale_from_amax(amax, spec)
    scale_amax = amax if history.empty else history.reduced()
    history.record(amax)
    return scale_from_amax(scale_amax, spec)


# --- FSDP2 FP8 all-gather hook (fp8train.distributed) -----------------------------------
def _gathered(t: torch.Tensor) -> ScaledTensor | None:
    """The FP8 quantisation an FSDP2 FP8 all-gather attached to an unsharded weight."""
    return getattr(t, "fp8_gathered", None)


def _operand_amax(t: torch.Tensor, spec: ScaleSpec, kernels: Kernels) -> torch.Tensor:
    """The operand's amax; a gathered weight reports the amax its scales came from."""
    amax: torch.Tensor | None = getattr(t, "fp8_gathered_amax", None)
    return kernels.amax(t, spec) if amax is None else amax


# --- end hook ----------------------------------------------------------------------------


def _work_dtype(out_dtype: torch.dtype, device: torch.device, *specs: ScaleSpec) -> torch.dtype:
    """The dtype the emulated GEMM runs in (fp8train.matmul.gemm_dtype): bf16 when the
    output is bf16, every scale a power of two and bf16 GEMMs native on ``device``."""
    return gemm_dtype(out_dtype, all(s.scales_are_power_of_two for s in specs), device.type)


# One GEMM operand to quantise: (tensor, spec, role, dtype of its GEMM operand or None).
# The tensor may be a saved FP8 payload (kernels.Saved) standing for its dequantised
# values: the kernels dequantise and re-quantise it in one call.
Operand = tuple["torch.Tensor | Saved", ScaleSpec, str, "torch.dtype | None"]


def _dequantised(src: torch.Tensor | Saved, kernels: Kernels) -> torch.Tensor:
    return src if isinstance(src, torch.Tensor) else kernels.payload_to_operand(*src)


def _quantize_gemm_operands(
    state: LayerState,
    kernels: Kernels,
    operands: list[Operand],
    restore: tuple[Saved, ...] = (),
    stored: tuple[str, ...] = (),
) -> tuple[list[ScaledTensor] | None, list[torch.Tensor]]:
    """Quantise the operands of one layer step: amax -> scale -> cast; None (reported)
    if any operand holds NaN/inf. Also returns the GEMM operands of the saved payloads
    in ``restore`` (valid either way).

    Every amax is checked before any history records or any result is kept, so a bad
    input leaves no half-updated state behind. One fused kernel call runs amax, scale and
    cast of every current-scaling operand, amax, scale (from its history's window) and
    cast of every delayed one, and the restores, and reports whether every amax is finite
    (on NaN/inf its output is discarded unseen). Delayed scaling's first step (the scale
    is the amax itself), stochastic rounding and FSDP2-gathered weights take their own
    path. Each result also carries its GEMM operand in the operand's dtype.

    FP8 payloads are made only for the roles in ``stored`` (kept for backward), for an
    observer, and off the CPU (where ``torch._scaled_mm`` reads them); the CPU's
    emulated GEMM reads only the operands, and any other ``ScaledTensor.data`` is
    derived from its operand when first read (the same bits).
    """
    # Only the weight (never a Saved payload) can arrive FP8-gathered.
    gathered = [
        _gathered(t) if role == "weight" else None  # type: ignore[arg-type]
        for t, _, role, _ in operands
    ]
    # Fused: current scaling, and delayed scaling once its history holds an amax (the
    # scale is known before the cast, so amax and cast share one pass over the tensor;
    # the kernel call also reduces the history's window to that scale).
    windows: dict[int, torch.Tensor] = {}
    fused_idx = []
    for i, (_, spec, role, _) in enumerate(operands):
        if gathered[i] is not None or spec.rounding != "nearest":
            continue
        history = state.histories.get(role)
        if history is None:
            fused_idx.append(i)
        elif not history.empty:
            windows[i] = history.to_reduce()
            fused_idx.append(i)
    sources = [t for t, _, _, _ in operands]
    fused: dict[int, tuple[Any, ...]] = {}
    fused_finite = True
    restored: list[torch.Tensor] = []
    if fused_idx or restore:
        keep_all = state.observer is not None or any(
            not (t if isinstance(t, torch.Tensor) else t[0]).is_cpu for t in sources
        )
        keeps = tuple(keep_all or operands[i][2] in stored for i in fused_idx)
        dequantised, outs, finite, restored_t = kernels.prepare_gemm_operands(
            tuple(sources[i] for i in fused_idx),
            tuple(operands[i][1] for i in fused_idx),
            tuple(operands[i][3] for i in fused_idx),
            tuple(windows.get(i) for i in fused_idx),
            restore,
            keeps,
        )
        restored = list(restored_t)
        fused = dict(zip(fused_idx, outs, strict=False))
        it = iter(dequantised)
        for i in fused_idx:
            if not isinstance(sources[i], torch.Tensor):
                sources[i] = next(it)
        fused_finite = finite is None or bool(finite)
    # Saved payloads outside the fused call (delayed or stochastic scaling) get their
    # high-precision values here.
    hp = [_dequantised(s, kernels) for s in sources]

    pending: list[tuple[torch.Tensor, ScaleSpec, str, Any, torch.Tensor, ScaledTensor | None]] = []
    checked = set(fused)  # amaxes the fused call's flag vouches for
    for i, ((_, spec, role, work), t) in enumerate(zip(operands, hp, strict=False)):
        if gathered[i] is not None:
            # FSDP2 FP8 all-gather: already cast (and recorded) before the gather.
            pending.append((t, spec, role, work, _operand_amax(t, spec, kernels), gathered[i]))
            continue
        if i in fused:
            amax, scale, payload, fused_operand = fused[i]
            q: ScaledTensor | None = ScaledTensor(payload, scale, spec, t.dtype, fused_operand)
        else:
            amax, q = kernels.amax(t, spec), None
        if state.amax_reduce is not None and role in state.histories:
            # Distributed: the max over ranks, before the check, so that all ranks
            # record (or skip on NaN/inf) the same values.
            amax = state.amax_reduce(amax)
            checked.discard(i)
        pending.append((t, spec, role, work, amax, q))

    # The fused operands were checked by one flag; the others one by one. Only on
    # failure is each amax looked at, to name the bad tensors.
    ok = fused_finite and all(
        bool(torch.isfinite(p[4]).all()) for i, p in enumerate(pending) if i not in checked
    )
    if not ok:
        reported: set[tuple[int, str]] = set()
        for t, _, role, _, amax, _ in pending:
            key = (id(t), role.split(".")[0])  # dy and dy^T: one tensor, reported once
            if not bool(torch.isfinite(amax).all()) and key not in reported:
                reported.add(key)
                state.report_nonfinite(key[1], t.shape)
                if state.observer is not None:
                    state.observer(state, role, t, None)
        return None, restored

    results = []
    for i, (t, spec, role, work, amax, q) in enumerate(pending):
        if i in windows:
            state.histories[role].record(amax)  # its scale came from the history
        if q is None:
            scale = operand_scale(amax, spec, role, state)  # records delayed history
            operand: torch.Tensor | None
            if spec.rounding == "nearest":
                payload, operand = kernels.cast_with_operand(t, scale, spec, work)
            else:
                # Stochastic rounding stays eager: its random stream must be the eager one.
                payload, operand = apply_scale_and_cast(t, scale, spec), None
            q = ScaledTensor(payload, scale, spec, t.dtype, operand)
        if state.observer is not None:
            state.observer(state, role, t, q)
        results.append(q)
    return results, restored


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: LayerState,
        kernels: Kernels,
    ) -> torch.Tensor:
        recipe = state.recipe
        out_dtype = _compute_dtype(x)
        in_shape = x.shape
        with autocast_off(x.device.type):
            x2d = x.reshape(-1, in_shape[-1])  # (M, K)
            work = _work_dtype(out_dtype, x.device, recipe.input, recipe.weight)
            # What backward keeps in FP8 (so only these payloads are made): x, if the
            # recipe saves activations in FP8; W, if the grad_input GEMM reuses it as is.
            keep_x = recipe.save_fp8_activations and recipe.fp8_wgrad
            keep_w = _reusable_transposed(recipe.weight) and recipe.fp8_dgrad
            stored = (("input",) if keep_x else ()) + (("weight",) if keep_w else ())
            quantized, _ = _quantize_gemm_operands(
                state,
                kernels,
                [(x2d, recipe.input, "input", work), (weight, recipe.weight, "weight", work)],
                stored=stored,
            )
            qx, qw = quantized if quantized is not None else (None, None)
            if qx is not None and qw is not None:
                # (M, K) @ (K, N) -> (M, N), bias added before the output rounding
                y = scaled_mm(qx, qw.t(), bias=bias, out_dtype=out_dtype)
            else:
                y = torch.nn.functional.linear(
                    x2d.to(out_dtype),
                    weight.to(out_dtype),
                    None if bias is None else bias.to(out_dtype),
                )

        # What backward needs of x: its FP8 payload (1 byte/element) or the compute-dtype copy.
        fp8_saved = keep_x and qx is not None
        if fp8_saved:
            assert qx is not None
            x_saved, x_scale = qx.data, qx.scale
        else:
            x_saved, x_scale = x2d.to(out_dtype), None
        # The weight: reuse its FP8 copy when the grad_input GEMM can, else keep only the
        # master weight (a Parameter: saving it costs no memory) and re-quantise.
        w_reuse = keep_w and qw is not None
        w_fp8 = qw.data if w_reuse and qw is not None else None
        w_scale = qw.scale if w_reuse and qw is not None else None
        ctx.save_for_backward(x_saved, x_scale, weight, w_fp8, w_scale)
        ctx.fp8_saved = fp8_saved
        ctx.fp8_forward = quantized is not None  # False: x or W held NaN/inf (reported)
        ctx.state = state
        ctx.kernels = kernels
        ctx.in_shape = in_shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*in_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_saved, x_scale, weight, w_fp8, w_scale = ctx.saved_tensors
        state: LayerState = ctx.state
        recipe = state.recipe
        gdtype = dy.dtype
        dy2d = dy.reshape(-1, dy.shape[-1])  # (M, N)

        # x as backward has it: the saved FP8 payload (dequantised by the kernels, in the
        # same call that re-quantises it) or the compute-dtype copy.
        x_src: torch.Tensor | Saved = (
            (x_saved, x_scale, recipe.input, gdtype) if ctx.fp8_saved else x_saved.to(gdtype)
        )

        work_d = _work_dtype(gdtype, dy.device, recipe.grad_output, recipe.weight)
        work_w = _work_dtype(gdtype, dy.device, recipe.grad_output, recipe.input)
        fp8_dgrad = ctx.needs_input_grad[0] and recipe.fp8_dgrad
        fp8_wgrad = ctx.needs_input_grad[1] and recipe.fp8_wgrad
        with autocast_off(dy.device.type):
            # Every operand the two backward GEMMs quantise, in one kernel call: dy, and
            # along the other axis where the recipe's scales change with it, the weight,
            # dy^T and the input; the same call restores the saved FP8 copies reused as
            # they are. A NaN/inf in any of them runs both GEMMs in high precision (it
            # would reach the gradients either way).
            ops: list[Operand] = []
            if fp8_dgrad or fp8_wgrad:
                ops.append((dy2d, recipe.grad_output, "grad_output", work_d))
            # After a non-finite x or W (reported by the forward) both GEMMs stay in high
            # precision, and the bad tensor is not checked (and counted) a second time.
            if fp8_dgrad and w_fp8 is None and ctx.fp8_forward:
                ops.append((weight, recipe.weight.transposed(), "weight.t", work_d))
            if fp8_wgrad and not _reusable_transposed(recipe.grad_output):
                ops.append((dy2d, recipe.grad_output.transposed(), "grad_output.t", work_w))
            x_reused = ctx.fp8_saved and _reusable_transposed(recipe.input)
            if fp8_wgrad and not x_reused and ctx.fp8_forward:
                ops.append((x_src, recipe.input.transposed(), "input.t", work_w))
            restore_w = fp8_dgrad and w_fp8 is not None
            restore_x = fp8_wgrad and x_reused
            saved: list[Saved] = []
            if restore_w:
                saved.append((w_fp8, w_scale, recipe.weight, work_d))
            if restore_x:
                saved.append((x_saved, x_scale, recipe.input, work_w))
            quantized, restored = (
                _quantize_gemm_operands(state, ctx.kernels, ops, tuple(saved))
                if ops
                else (None, [])
            )
            q = dict(zip((role for _, _, role, _ in ops), quantized or [], strict=False))
            qw_d = q.get("weight.t")
            qx_w = q.get("input.t")
            if quantized is not None and restore_w:
                qw_d = ScaledTensor(w_fp8, w_scale, recipe.weight, weight.dtype, restored.pop(0))
            if quantized is not None and restore_x:
                qx_w = ScaledTensor(x_saved, x_scale, recipe.input, gdtype, restored.pop(0))
            qdy = q.get("grad_output")
            qdy_w = qdy if _reusable_transposed(recipe.grad_output) else q.get("grad_output.t")

            # grad_input = dy . W : (M, N) @ (N, K) -> (M, K)
            dx = None
            if ctx.needs_input_grad[0]:
                if fp8_dgrad and qdy is not None and qw_d is not None:
                    dx = scaled_mm(qdy, qw_d, out_dtype=gdtype)
                else:
                    dx = dy2d @ weight.to(gdtype)
                dx = dx.reshape(ctx.in_shape).to(ctx.x_dtype)

            # grad_weight = dy^T . x : (N, M) @ (M, K) -> (N, K)
            dw = None
            if ctx.needs_input_grad[1]:
                if fp8_wgrad and qdy_w is not None and qx_w is not None:
                    dw = scaled_mm(qdy_w.t(), qx_w, out_dtype=gdtype)
                else:
                    dw = dy2d.t() @ _dequantised(x_src, ctx.kernels)
                dw = dw.to(weight.dtype)

            db = None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = ctx.kernels.bias_grad(dy2d, ctx.bias_dtype)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LayerState,
    kernels: Kernels | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the three GEMMs of ``state.recipe``.

    Output dtype: the autocast dtype when autocast is on for ``x``'s device, else
    ``x.dtype``; the bias is added in that dtype. Gradients: ``dx`` in ``x.dtype``,
    ``dW`` and ``db`` in the parameters' dtypes (fp32 master weights get fp32 grads).
    ``kernels``: the kernel set of this call (default ``state.kernels``; the compiled
    one under ``torch.compile``, see below). Called directly in compiled code, this
    function is a graph break whose frame dynamo recompiles per weight shape, as for any
    function taking the weight; :class:`fp8train.Fp8Linear` passes the module instead.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"layer {state.name!r}: input of shape {tuple(x.shape)} does not match weight of "
            f"shape {tuple(weight.shape)} (last dim must be in_features={weight.shape[1]})"
        )
    if not x.is_floating_point():
        raise TypeError(f"layer {state.name!r}: input must be floating point, got {x.dtype}")
    if torch.compiler.is_compiling():
        out: torch.Tensor = _fp8_linear_in_compiled_model(x, weight, bias, state)
        return out
    y: torch.Tensor = _Fp8Linear.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, state, kernels or state.kernels
    )
    return y


# Under torch.compile each FP8 layer is a graph break of its own: dynamo cannot trace
# the layer whole, as it decides on the host whether every amax is finite before a scale
# or an amax history is used. The layer then runs outside the graph with the compiled
# kernels whatever its own setting (the same bits). Left to dynamo, with the eager
# kernels, the break fell at that check inside the autograd function, which dynamo
# recompiled per layer shape and dtype, and the lab GPT d128 tensorwise step ran at
# 1.88x bf16's (against 1.21-1.26x uncompiled). Fp8Linear crosses the break as a module
# (fp8train/nn.py), so that the frame dynamo compiles around it guards no weight shape.
def _fp8_linear_with_compiled_kernels(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: LayerState
) -> torch.Tensor:
    return fp8_linear(x, weight, bias, state, shared_kernels("compiled"))


_fp8_linear_in_compiled_model: Callable[..., torch.Tensor] = torch.compiler.disable(  # type: ignore[no-untyped-call]
    _fp8_linear_with_compiled_kernels
)
