"""``Fp8AdamW``: AdamW whose two moments are stored in FP8 with per-block scales.

AdamW keeps two fp32 moments per parameter, 8 bytes, twice the fp32 master weight.
Here both live in one byte each, with one fp32 scale per block of ``block`` elements:

* **first moment** ``m``: E4M3, block-scaled (``m`` is signed; E4M3 has the finer grid).
* **second moment** ``v``: by default ``v`` itself in E4M3, block-scaled.
  ``second_moment="sqrt-e4m3"`` stores ``r = sqrt(v)`` instead (``v = r * r`` on the way
  out): the root halves ``v``'s range in binades, so a block whose ``v`` spans 2^35 (|g|
  spanning 2^17.5) still fits E4M3's 17.8 binades, where ``v`` itself underflows to zero
  and the update divides by ``eps`` alone. ``"e5m2"`` stores ``v`` in E5M2 (31.8
  binades, 2 mantissa bits).

  Why ``v`` itself is the default: measured on the lab GPT's gradient stream (fp32
  AdamW's moments as the reference, 100 steps, ``benchmarks/optim_states.py``, numbers
  in ``docs/memory.md``), no element of ``v`` underflowed in any form (its range within a
  128-element row block never came near 2^17.8), while the rounding of the moving
  average did cost: a moment that decays by ``1 - beta2`` (5% in the lab) per step often
  moves by less than half an E4M3 step (3.1% to 6.25% of its value), and
  round-to-nearest keeps it where it was. The root moves half as far
  per step and sticks more often: ``sqrt-e4m3`` drifted 2x further from fp32's ``v``
  and its update direction 1.5x further than ``e4m3``'s; E5M2's coarser grid the same.
  Stochastic rounding (``rounding="stochastic"``) is unbiased, and brought ``v``'s error
  down a little, but the noise it adds to ``m`` left the update further off than
  round-to-nearest's (measured too). Choose ``sqrt-e4m3`` where gradients
  within a row span more than 2^8.9 (``v`` more than E4M3's 2^17.8): the test suite
  holds a block where only the root survives.

Blocks run along the last axis of each parameter's 2-D view ``(-1, shape[-1])``, 1 x
``block`` (default 128, as DeepSeek-V3's activation tiles; the last block of a row may be
shorter). Rows never share a block, so a parameter sharded along dim 0 (FSDP2's
``Shard(0)``) gets the same blocks, scales and bits on every shard as the whole
parameter on one process. Parameters with fewer than two dimensions (biases, norm
weights) keep fp32 moments: they are a negligible share of the bytes and FSDP2 would
split their single row between ranks; so do matrices with rows of one element, whose
scales would cost more than fp32 moments.

Contract:

* Parameters must be float32 (the master weights); gradients may be fp32, bf16 or fp16
  and are read in fp32. The step is computed in fp32 from the decoded moments, in the
  order of ``torch.optim.AdamW`` (``foreach=False``): decoupled weight decay, then the
  moment updates, then ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``. The fp32
  moments of this step's update are then encoded (round to nearest even, saturating) and
  stored. A parameter with fp32 moments steps bitwise like ``torch.optim.AdamW``.
* Deterministic (no random state, even with stochastic rounding): ``state_dict()`` and
  ``load_state_dict()`` resume bit for bit. Loading keeps the payloads' FP8 dtypes and the
  fp32 scales (``torch.optim.Optimizer`` would cast every floating state to the
  parameter's dtype).
* Works with ``fp8train.LossScaler`` (which unscales ``.grad`` in place and calls
  ``step()``), gradient clipping, parameter groups with their own ``lr``,
  ``weight_decay``, ``betas``, ``eps``, ``block``, ``second_moment`` and ``rounding``,
  and any module.
* DTensor parameters (FSDP2): each rank steps its local shard and keeps its shard's
  states as plain tensors; with row blocks, 2 FSDP2 ranks step bitwise like one process
  (tests/distributed/test_comm_hooks.py). ``state_dict()`` is then per rank: save and load it on the
  same number of ranks with the same sharding; ``torch.distributed.checkpoint``'s
  resharding is not supported for these states.
* ``step(closure)`` runs the closure under ``enable_grad``, as torch's optimizers do.
  Not supported: sparse gradients, complex parameters, ``amsgrad``, ``maximize``.

:meth:`Fp8AdamW.state_bytes` reports the bytes the states hold (payloads and scales),
and :meth:`Fp8AdamW.moments` returns a parameter's decoded moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch

from fp8train.cast import Rounding
from fp8train.formats import E4M3, E5M2, Format
from fp8train.scaling import Granularity, ScaleSpec
from fp8train.tensor import ScaledTensor, quantize

__all__ = ["SECOND_MOMENT_FORMS", "Fp8AdamW", "SecondMoment"]

SecondMoment = Literal["sqrt-e4m3", "e4m3", "e5m2"]
# name -> (element format, whether the stored value is sqrt(v) rather than v).
_SECOND_MOMENT: dict[str, tuple[Format, bool]] = {
    "e4m3": (E4M3, False),  # v itself: 17.8 binades of v, 3 mantissa bits
    "sqrt-e4m3": (E4M3, True),  # v = r^2: 17.8 binades of r cover 35.6 of v; 3 mantissa bits
    "e5m2": (E5M2, False),  # v itself: 31.8 binades of v, 2 mantissa bits
}
SECOND_MOMENT_FORMS = tuple(_SECOND_MOMENT)
# Stochastic rounding seeds parameter i's generator at step t with STRIDE * i + t.
_SEED_STRIDE = 1 << 32
# The first moment is signed and needs resolution more than range: E4M3.
_FIRST_MOMENT_FORMAT = E4M3


def _spec(fmt: Format, block: int, rounding: Rounding = "nearest") -> ScaleSpec:
    # Saturating: the block's amax maps to fmt.max, so nothing saturates except through
    # the fp32 product's last-bit error (or a stochastic round-up of the maximum).
    return ScaleSpec(fmt, Granularity.BLOCK, block=(1, block), rounding=rounding)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _fp8_states(p: torch.Tensor) -> bool:
    """Whether ``p``'s moments are stored in FP8: two or more dimensions, and rows of at
    least 2 elements (a row of 1 would pay 4 bytes of scale per byte of payload)."""
    return p.dim() >= 2 and p.shape[-1] >= 2


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself. Duck-typed so that this
    module imports nothing from torch.distributed."""
    to_local = getattr(t, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else t


def _encode(
    x2d: torch.Tensor,
    fmt: Format,
    block: int,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (M, K) -> (payload (M, K) in ``fmt``, fp32 scales (M, ceil(K / block)))."""
    qt = quantize(x2d, _spec(fmt, block, rounding), name="optimizer state", generator=generator)
    return qt.data, qt.scale


def _decode(payload: torch.Tensor, scale: torch.Tensor, fmt: Format, block: int) -> torch.Tensor:
    return ScaledTensor(payload, scale, _spec(fmt, block), torch.float32).dequantize()


class Fp8AdamW(torch.optim.Optimizer):
    """AdamW with FP8 moments (see the module docstring for the contract).

    ``params``: parameters or parameter groups (dicts), as for ``torch.optim.AdamW``;
    ``lr``, ``betas``, ``eps``, ``weight_decay``: as ``torch.optim.AdamW`` (same
    defaults). ``block``: elements per scale along each row of a parameter's 2-D view,
    >= 1; 128 costs 4 / 128 bytes of scale per element and moment. ``second_moment``:
    how ``v`` is stored: ``"e4m3"`` (default: ``v`` in E4M3), ``"sqrt-e4m3"``
    (``sqrt(v)`` in E4M3: twice the range in binades) or ``"e5m2"`` (``v`` in E5M2).
    ``rounding``: ``"nearest"`` (default; deterministic) or ``"stochastic"`` (each
    parameter's draws seeded from its position and step, so resuming still reproduces
    the bits; unbiased, noisier, and an FSDP2 shard draws other numbers than the whole
    parameter would).

    Per element of a parameter with two or more dimensions the states take
    ``2 + 8 * ceil(K / block) / K`` bytes (``K`` its last dimension): 2.0625 at
    ``block=128``, against AdamW's 8.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block: int = 128,
        second_moment: SecondMoment = "e4m3",
        rounding: Rounding = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block=block,
            second_moment=second_moment,
            rounding=rounding,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # ------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step for every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the parameter's position over all groups: its stochastic-rounding stream
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group, index)
                index += 1
        return loss

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise TypeError(
                f"Fp8AdamW supports dense gradients only, got a sparse one for a parameter of "
                f"shape {tuple(p.shape)}; use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        param = _local(p)  # FSDP2: this rank's shard, stepped in place
        g = _local(grad).float()
        if param.dtype != torch.float32:
            raise TypeError(
                f"Fp8AdamW steps float32 master weights, got a {param.dtype} parameter of shape "
                f"{tuple(p.shape)}; keep the parameters in float32 and run the model under "
                "autocast (or an FP8 recipe) for low-precision compute"
            )
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        quantized = _fp8_states(p)
        if not state:
            state["step"] = 0
            if quantized:
                zeros = torch.zeros_like(_as_2d(param))
                m_fmt, v_fmt = _FIRST_MOMENT_FORMAT, _SECOND_MOMENT[group["second_moment"]][0]
                state["exp_avg"], state["exp_avg_scale"] = _encode(zeros, m_fmt, group["block"])
                state["exp_avg_sq"], state["exp_avg_sq_scale"] = _encode(
                    zeros, v_fmt, group["block"]
                )
            else:
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = state["step"]

        if quantized:
            exp_avg, exp_avg_sq = self._decoded(state, group)
            g = _as_2d(g)
            target = _as_2d(param)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            target = param
        # The arithmetic of torch.optim.AdamW's single-tensor path, op for op.
        target.mul_(1 - lr * wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        target.addcdiv_(exp_avg, denom, value=-step_size)
        if quantized:
            generator = None
            if group["rounding"] == "stochastic":
                # Seeded from (parameter, step) alone: no random state to save, so a
                # resumed run draws what the uninterrupted one would.
                generator = torch.Generator(device=param.device)
                generator.manual_seed(_SEED_STRIDE * index + step)
            self._store(state, group, exp_avg, exp_avg_sq, generator)

    def _decoded(
        self, state: dict[str, Any], group: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = group["block"]
        v_fmt, root = _SECOND_MOMENT[group["second_moment"]]
        m = _decode(state["exp_avg"], state["exp_avg_scale"], _FIRST_MOMENT_FORMAT, block)
        v = _decode(state["exp_avg_sq"], state["exp_avg_sq_scale"], v_fmt, block)
        return m, v * v if root else v

    def _store(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        m: torch.Tensor,
        v: torch.Tensor,
        generator: torch.Generator | None,
    ) -> None:
        block, rounding = group["block"], group["rounding"]
        v_fmt, root = _SECOND_MOMENT[group["second_moment"]]
        state["exp_avg"], state["exp_avg_scale"] = _encode(
            m, _FIRST_MOMENT_FORMAT, block, rounding, generator
        )
        state["exp_avg_sq"], state["exp_avg_sq_scale"] = _encode(
            v.sqrt() if root else v, v_fmt, block, rounding, generator
        )

    # -------------------------------------------------------------------- inspection

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(m, v)`` of ``p`` decoded to fp32 in ``p``'s (local) shape, or None before
        its first step. For an FP8 parameter these are what the next step starts from."""
        state = self.state.get(p)
        if not state:
            return None
        if not _fp8_states(p):
            return state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        m, v = self._decoded(state, group)
        shape = _local(p).shape
        return m.reshape(shape), v.reshape(shape)

    def state_bytes(self) -> int:
        """Bytes held by the moments of every parameter stepped so far (this rank's
        shards under FSDP2): FP8 payloads, fp32 scales and fp32 moments; the step
        counters are Python ints and are not counted."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    @staticmethod
    def state_bytes_for(params: Iterable[torch.Tensor], block: int = 128) -> int:
        """The bytes :meth:`state_bytes` will report once every parameter in ``params``
        has stepped, computed from the shapes alone (local shapes for DTensors)."""
        total = 0
        for p in params:
            shape = _local(p).shape
            if _fp8_states(p):
                rows, k = math.prod(shape[:-1]), shape[-1]
                total += 2 * (rows * k + 4 * rows * -(-k // block))
            else:
                total += 8 * math.prod(shape)
        return total

    # -------------------------------------------------------------------- state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps its
        saved dtype (FP8 payloads, fp32 scales), moved to its parameter's device."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            if i not in saved:
                continue
            for key, value in saved[i].items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=_local(p).device, copy=True)
        for group in self.param_groups:
            _check_group(group)


def _check_group(group: dict[str, Any]) -> None:
    """Validate one parameter group's settings (ValueError/TypeError naming the fix)."""
    block, form = group["block"], group["second_moment"]
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (elements per scale), got {block!r}")
    if group["rounding"] not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {group['rounding']!r}")
    if form not in _SECOND_MOMENT:
        raise ValueError(
            f"second_moment must be one of {', '.join(SECOND_MOMENT_FORMS)}, got {form!r}"
        )
    beta1, beta2 = group["betas"]
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
    for name in ("lr", "eps", "weight_decay"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    for p in group["params"]:
        if p.is_complex():
            raise TypeError(f"Fp8AdamW does not support complex parameters (shape {p.shape})")
