"""The FP8 linear: one forward GEMM and two backward GEMMs in one autograd function.

Shapes: ``x (..., K)`` is viewed as ``x2d (M, K)``; ``W (N, K)``; ``dy (M, N)``.

* output      ``y  = x2d . W^T``  -- a: input (M, K),        b: weight^T (K, N)
* grad_input  ``dx = dy . W``     -- a: grad_output (M, N),  b: weight (N, K), contracts N
* grad_weight ``dW = dy^T . x2d`` -- a: grad_output^T (N, M), b: input (M, K), contracts M

Every operand passes through :func:`_quantize_operand` (tensor, spec, role). When the
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
from fp8train.matmul import scaled_mm
from fp8train.recipes import Recipe
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    apply_scale_and_cast,
    compute_amax,
    scale_from_amax,
)
from fp8train.tensor import ScaledTensor

__all__ = ["fp8_linear", "LayerState", "NonFiniteWarning"]

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

    def __init__(self, name: str, recipe: Recipe) -> None:
        self.name = name
        self.recipe = recipe
        self.histories: dict[str, AmaxHistory] = {}
        if recipe.scaling == "delayed":
            self.histories = {r: AmaxHistory(recipe.history_len, recipe.history_algo)
                              for r in self.ROLES}
        self.nonfinite: dict[str, int] = {r: 0 for r in self.ROLES}
        self.observer: Observer | None = None
        # Set by fp8train.distributed.setup: maps a local amax to the max over ranks, so
        # every rank records the same amax and the delayed-scaling histories stay identical.
        self.amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {r: h.state_dict() for r, h in self.histories.items()},
                "nonfinite": dict(self.nonfinite)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["histories"]) != set(self.histories):
            raise ValueError(
                f"layer {self.name}: checkpoint has amax histories for "
                f"{sorted(state['histories'])}, recipe {self.recipe.name!r} keeps "
                f"{sorted(self.histories)}")
        for role, h in state["histories"].items():
            self.histories[role].load_state_dict(h)
        self.nonfinite.update(state.get("nonfinite", {}))

    def report_nonfinite(self, role: str, shape: torch.Size) -> None:
        self.nonfinite[role] += 1
        msg = (f"fp8train: layer {self.name!r}: {role} of shape {tuple(shape)} holds NaN/inf; "
               "no scale or amax history was updated and this GEMM ran in high precision")
        if role == "grad_output":
            # The usual cause is a loss-scale overflow, which the loss scaler handles.
            log.info(msg)
        else:
            warnings.warn(msg, NonFiniteWarning, stacklevel=4)


def _reusable_transposed(spec: ScaleSpec) -> bool:
    """Whether contracting the other axis can reuse this quantisation unchanged."""
    g = spec.granularity
    return g is Granularity.TENSOR or (g is Granularity.BLOCK and spec.block[0] == spec.block[1])


def operand_scale(amax: torch.Tensor, spec: ScaleSpec, role: str,
                  state: LayerState) -> torch.Tensor:
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


def _finite_amaxes(state: LayerState,
                   operands: list[tuple[torch.Tensor, ScaleSpec, str]]) -> list[torch.Tensor] | None:
    """Amax of every operand of one GEMM, or None (reported) if any holds NaN/inf.

    All operands are checked before any history records, so a bad input cannot leave a
    half-updated state behind.
    """
    amaxes = [compute_amax(t, spec) for t, spec, _ in operands]
    finite = [bool(torch.isfinite(a).all()) for a in amaxes]
    if all(finite):
        return amaxes
    for (t, _, role), ok in zip(operands, finite):
        if not ok:
            state.report_nonfinite(role.split(".")[0], t.shape)
            if state.observer is not None:
                state.observer(state, role, t, None)
    return None


def _quantize_operand(t: torch.Tensor, spec: ScaleSpec, role: str, state: LayerState,
                      amax: torch.Tensor | None = None) -> ScaledTensor | None:
    """amax -> scale -> cast for one GEMM operand; None if ``t`` holds NaN/inf."""
    if amax is None:
        checked = _finite_amaxes(state, [(t, spec, role)])
        if checked is None:
            return None
        amax = checked[0]
    history = state.histories.get(role)
    if history is not None:
        # Delayed: scale from the window of *earlier* amaxes (the current amax on the
        # very first step), then record this step's amax.
        scale_amax = amax if history.empty else history.reduced()
        history.record(amax)
    else:
        scale_amax = amax
    scale = scale_from_amax(scale_amax, spec)
    qt = ScaledTensor(apply_scale_and_cast(t, scale, spec), scale, spec, t.dtype)
    if state.observer is not None:
        state.observer(state, role, t, qt)
    return qt


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        state: LayerState,
    ) -> torch.Tensor:
        recipe = state.recipe
        out_dtype = _compute_dtype(x)
        in_shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.reshape(-1, in_shape[-1])  # (M, K)
            qx = qw = None
            amaxes = _finite_amaxes(state, [(x2d, recipe.input, "input"),
                                            (weight, recipe.weight, "weight")])
            if amaxes is not None:
                qx = _quantize_operand(x2d, recipe.input, "input", state, amaxes[0])
                qw = _quantize_operand(weight, recipe.weight, "weight", state, amaxes[1])
            if qx is not None and qw is not None:
                # (M, K) @ (K, N) -> (M, N), bias added before the output rounding
                y = scaled_mm(qx, qw.t(), bias=bias, out_dtype=out_dtype)
            else:
                y = torch.nn.functional.linear(x2d.to(out_dtype), weight.to(out_dtype),
                                               None if bias is None else bias.to(out_dtype))

        # What backward needs of x: its FP8 payload (1 byte/element) or the compute-dtype copy.
        fp8_saved = recipe.save_fp8_activations and qx is not None and recipe.fp8_wgrad
        if fp8_saved:
            assert qx is not None
            x_saved, x_scale = qx.data, qx.scale
        else:
            x_saved, x_scale = x2d.to(out_dtype), None
        # The weight: reuse its FP8 copy when the grad_input GEMM can, else keep only the
        # master weight (a Parameter: saving it costs no memory) and re-quantise.
        w_reuse = qw is not None and _reusable_transposed(recipe.weight) and recipe.fp8_dgrad
        w_fp8 = qw.data if w_reuse and qw is not None else None
        w_scale = qw.scale if w_reuse and qw is not None else None
        ctx.save_for_backward(x_saved, x_scale, weight, w_fp8, w_scale)
        ctx.fp8_saved = fp8_saved
        ctx.state = state
        ctx.in_shape = in_shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*in_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_saved, x_scale, weight, w_fp8, w_scale = ctx.saved_tensors
        state: LayerState = ctx.state
        recipe = state.recipe
        gdtype = dy.dtype
        dy2d = dy.reshape(-1, dy.shape[-1])  # (M, N)

        def x_high_precision() -> torch.Tensor:
            if ctx.fp8_saved:
                return ScaledTensor(x_saved, x_scale, recipe.input, gdtype).dequantize()
            return x_saved.to(gdtype)

        with torch.autocast(dy.device.type, enabled=False):
            qdy = None
            if recipe.fp8_dgrad or recipe.fp8_wgrad:
                qdy = _quantize_operand(dy2d, recipe.grad_output, "grad_output", state)

            # grad_input = dy . W : (M, N) @ (N, K) -> (M, K)
            dx = None
            if ctx.needs_input_grad[0]:
                qw_d = None
                if recipe.fp8_dgrad and qdy is not None:
                    if w_fp8 is not None:
                        qw_d = ScaledTensor(w_fp8, w_scale, recipe.weight, weight.dtype)
                    else:
                        qw_d = _quantize_operand(weight, recipe.weight.transposed(),
                                                 "weight.t", state)
                if qdy is not None and qw_d is not None:
                    dx = scaled_mm(qdy, qw_d, out_dtype=gdtype)
                else:
                    dx = dy2d @ weight.to(gdtype)
                dx = dx.reshape(ctx.in_shape).to(ctx.x_dtype)

            # grad_weight = dy^T . x : (N, M) @ (M, K) -> (N, K)
            dw = None
            if ctx.needs_input_grad[1]:
                qdy_w = qx_w = None
                if recipe.fp8_wgrad and qdy is not None:
                    qdy_w = (qdy if _reusable_transposed(recipe.grad_output) else
                             _quantize_operand(dy2d, recipe.grad_output.transposed(),
                                               "grad_output.t", state))
                    if ctx.fp8_saved and _reusable_transposed(recipe.input):
                        qx_w = ScaledTensor(x_saved, x_scale, recipe.input, gdtype)
                    else:
                        qx_w = _quantize_operand(x_high_precision(), recipe.input.transposed(),
                                                 "input.t", state)
                if qdy_w is not None and qx_w is not None:
                    dw = scaled_mm(qdy_w.t(), qx_w, out_dtype=gdtype)
                else:
                    dw = dy2d.t() @ x_high_precision()
                dw = dw.to(weight.dtype)

            db = None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2d.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: LayerState) -> torch.Tensor:
    """``x @ weight.T + bias`` with the three GEMMs of ``state.recipe``.

    Output dtype: the autocast dtype when autocast is on for ``x``'s device, else
    ``x.dtype``; the bias is added in that dtype. Gradients: ``dx`` in ``x.dtype``,
    ``dW`` and ``db`` in the parameters' dtypes (fp32 master weights get fp32 grads).
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"layer {state.name!r}: input of shape {tuple(x.shape)} does not match weight of "
            f"shape {tuple(weight.shape)} (last dim must be in_features={weight.shape[1]})")
    if not x.is_floating_point():
        raise TypeError(f"layer {state.name!r}: input must be floating point, got {x.dtype}")
    return _Fp8Linear.apply(x, weight, bias, state)  # type: ignore[no-any-return]
