"""``plan_model``: every Linear of a model with its real token count, planned on a GPU.

The walk runs one forward of ``example_input`` (on any device, the meta device
included) with a hook on each ``nn.Linear`` that records how many rows its input has
(``m``: the tokens, whatever leading shape the input has). Each layer then gets
:func:`~fp8train.planner.model.plan_linear`'s prediction, its saved-activation bytes and,
under FSDP2, the bytes an FP8 weight all-gather saves. A whole-step estimate adds the
time outside the Linear GEMMs (:class:`StepEstimate` says where it comes from).

``calibrate_steps > 0`` trains a copy of the model on the CPU under the recipe with
:class:`fp8train.Monitor` watching every step, and each row gets its numerics and a
recommendation (:mod:`fp8train.planner.advice`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.distributed.fp8_all_gather import fp8_all_gather_unsupported_reason
from fp8train.nn import Filter
from fp8train.planner.advice import Numerics, calibrate, recommend
from fp8train.planner.gpus import HBM_EFFICIENCY, Gpu, get_gpu
from fp8train.planner.model import LinearPlan, plan_linear
from fp8train.recipes import Recipe, RecipeName

__all__ = ["NON_GEMM_FRACTION", "LayerRow", "ModelPlan", "StepEstimate", "plan_model"]

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]

# Share of a bf16 training step spent outside the Linear GEMMs (attention, norms,
# activations, the loss, the optimizer, exposed communication) when nothing better is
# known. 0.4: Megatron-style transformer steps at 7-70B on H100 run at 35-45% MFU while
# their Linear GEMMs reach ~75% of peak alone, so about half of a step is the GEMMs
# plus their share of the rest; we take the GEMMs at 60% of the step. An assumption,
# documented in docs/planner.md; pass bf16_step_ms when the real step time is known.
NON_GEMM_FRACTION = 0.4

# One direction of the scale-up link is what an all-gather receives; NCCL's all-gather
# bus bandwidth on NVLink reaches ~80% of it (nccl-tests on 8xH100: ~360 of 450 GB/s).
_LINK_EFFICIENCY = 0.8


@dataclass
class LayerRow:
    """One Linear: its qualified ``name``, ``m`` tokens (summed over calls), ``k`` in and
    ``n`` out features; ``plan`` the prediction; ``calls`` forward calls in the example
    step; saved activations in bytes (bf16 vs the recipe's storage); the FP8
    all-gather's saving per step in bytes received per GPU (0 without FSDP or where the
    recipe's weight cannot be gathered in FP8); ``convertible`` False, with
    ``why_not``, where ``convert`` would leave the layer in high precision. After
    calibration: ``numerics`` and the recommendation (``"fp8"``, ``"finer"``, ``"bf16"``)
    with its ``reason`` and, for ``"finer"``, the ``suggested_recipe``."""

    name: str
    m: int
    k: int
    n: int
    calls: int
    plan: LinearPlan
    saved_act_bf16: int
    saved_act_fp8: int
    ag_bytes_saved: int
    convertible: bool = True
    why_not: str = ""
    numerics: Numerics | None = None
    recommendation: str = "fp8"
    reason: str = ""
    suggested_recipe: str = ""

    @property
    def bf16_ms(self) -> float:
        return self.plan.bf16_ms

    @property
    def fp8_ms(self) -> float:
        return self.plan.fp8_ms

    @property
    def speedup(self) -> float:
        return self.plan.speedup

    @property
    def risk(self) -> str:
        """``"unknown"`` (not calibrated), ``"low"``, ``"medium"`` or ``"high"``."""
        return "unknown" if self.numerics is None else self.numerics.risk


@dataclass(frozen=True)
class StepEstimate:
    """A whole training step on the GPU, in ms. ``linear_bf16_ms``: every Linear's
    three GEMMs in bf16 (times ``1 + recompute_forward / 3``: recomputed forward GEMMs);
    ``linear_fp8_ms``: the same with the selected layers under the recipe;
    ``non_gemm_ms``: the rest of the step, from ``non_gemm_source`` (``"measured bf16
    step"``, ``"CPU profile scaled by bandwidth"`` or ``"fraction 0.40"``);
    ``ag_saved_ms``: exposed all-gather time the FP8 all-gather removes."""

    linear_bf16_ms: float
    linear_fp8_ms: float
    non_gemm_ms: float
    non_gemm_source: str
    ag_saved_ms: float = 0.0

    @property
    def bf16_ms(self) -> float:
        return self.linear_bf16_ms + self.non_gemm_ms

    @property
    def fp8_ms(self) -> float:
        return self.linear_fp8_ms + self.non_gemm_ms - self.ag_saved_ms

    @property
    def speedup(self) -> float:
        return self.bf16_ms / self.fp8_ms


@dataclass
class ModelPlan:
    """The plan: ``rows`` (one per Linear, in call order), the ``step`` estimate with
    the selected layers in FP8 and ``step_all`` with every convertible layer in FP8,
    and :meth:`filter` for ``fp8train.convert(model, recipe, filter=plan.filter)``."""

    gpu: Gpu
    recipe: Recipe
    world_size: int
    fsdp: bool
    rows: list[LayerRow]
    step: StepEstimate
    step_all: StepEstimate
    calibrated: bool = False
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def selected(self) -> list[str]:
        """Names of the layers the plan converts under its recipe."""
        return [r.name for r in self.rows if r.recommendation == "fp8"]

    def filter(self, module: nn.Linear, name: str) -> bool:
        """``convert``'s filter: true for the layers recommended for FP8 under this
        plan's recipe (faster, and numerically sound when calibrated)."""
        return name in set(self.selected)

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no Linear named {name!r} in the plan; have {[r.name for r in self.rows]}")


def _default_loss(output: Any, example_input: Any) -> torch.Tensor:
    """Next-token cross-entropy for ``(batch, seq, vocab)`` logits from ``(batch, seq)``
    integer ids; otherwise the mean square of the output (a stand-in gradient)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; pass loss_fn=")
    ids = example_input if isinstance(example_input, torch.Tensor) else None
    if (
        ids is not None
        and not ids.is_floating_point()
        and out.dim() == ids.dim() + 1
        and out.shape[:-1] == ids.shape
        and ids.shape[-1] > 1
    ):
        logits = out[..., :-1, :].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[..., 1:].reshape(-1))
    return out.float().pow(2).mean()


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _walk(model: nn.Module, example_input: Any) -> dict[str, list[int]]:
    """``name -> [m, k, n, calls]`` for every Linear the forward calls, in call order."""
    seen: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue

        def hook(mod: nn.Linear, args: tuple[Any, ...], *, name: str = name) -> None:
            x = args[0]
            k = int(x.shape[-1])
            row = seen.setdefault(name, [0, k, mod.out_features, 0])
            row[0] += x.numel() // k if k else 0
            row[3] += 1

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _cpu_bandwidth() -> float:
    """Bytes/s of a large copy on this CPU (read + write), best of three."""
    src = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def _profile_non_gemm_ms(model: nn.Module, example_input: Any, loss_fn: LossFn, gpu: Gpu) -> float:
    """Time outside the Linears in one fp32 training step on this CPU, scaled to the
    GPU by the ratio of memory bandwidths (and halved: bf16 moves half fp32's bytes)."""
    model = copy.deepcopy(model)
    inside = [0.0]
    starts: dict[int, float] = {}
    handles = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue

        def start(mod: nn.Module, *_: Any) -> None:
            starts[id(mod)] = time.perf_counter()

        def stop(mod: nn.Module, *_: Any) -> None:
            inside[0] += time.perf_counter() - starts.pop(id(mod), time.perf_counter())

        handles += [
            module.register_forward_pre_hook(start),
            module.register_forward_hook(stop),
            module.register_full_backward_pre_hook(start),
            module.register_full_backward_hook(stop),
        ]
    best = float("inf")
    # The first Linear's input needs no gradient, so its backward hook fires once the
    # gradient of its output is known (torch warns about it): its weight-gradient GEMM
    # is then counted outside the Linears, a small error on the safe side.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for i in range(3):  # the first is a warm-up
                inside[0] = 0.0
                t0 = time.perf_counter()
                loss_fn(_call(model, example_input), example_input).backward()  # type: ignore[no-untyped-call]
                total = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                if i:
                    best = min(best, max(total - inside[0], 0.0))
        finally:
            for h in handles:
                h.remove()
    gpu_bw = gpu.hbm_tbs * 1e12 * HBM_EFFICIENCY
    return best * 1e3 * _cpu_bandwidth() / gpu_bw / 2


def _on_meta(model: nn.Module, example_input: Any) -> bool:
    meta_input = isinstance(example_input, torch.Tensor) and example_input.is_meta
    return meta_input or any(p.is_meta for p in model.parameters())


def plan_model(
    model: nn.Module,
    example_input: Any,
    *,
    gpu: str | Gpu,
    recipe: Recipe | RecipeName | str,
    world_size: int = 1,
    fsdp: bool = False,
    calibrate_steps: int = 0,
    filter: Filter | None = None,
    bf16_step_ms: float | None = None,
    non_gemm_fraction: float | None = None,
    recompute_forward: float = 0.0,
    exposed_comm: float = 0.0,
    loss_fn: LossFn | None = None,
    lr: float = 1e-3,
) -> ModelPlan:
    """Plan ``model`` (called as ``model(example_input)``; a tuple is unpacked, a dict
    passed as keywords) on ``gpu`` under ``recipe``; the model is not modified.

    ``world_size``/``fsdp``: data-parallel ranks and whether weights are sharded with
    FSDP2 (the FP8 all-gather, for recipes whose weights allow it). ``filter``: as
    ``convert``'s; layers it rejects stay bf16 in the plan. The time outside the
    Linear GEMMs comes from, in order: ``bf16_step_ms`` (a measured bf16 step on the
    GPU: the rest is the step minus the predicted bf16 GEMMs), ``non_gemm_fraction`` (of
    the bf16 step), a profile of one step on this CPU (a model with real weights), or
    :data:`NON_GEMM_FRACTION` (a meta-device model). ``recompute_forward``: share of
    forward GEMMs recomputed by activation checkpointing (0.5 for a policy that
    recomputes every second matmul). ``exposed_comm``: share of the bf16 all-gather
    time not hidden behind compute (the FP8 all-gather saves that share of its bytes'
    time). ``calibrate_steps``: train a copy that many CPU steps under the recipe
    (``loss_fn(output, example_input)``, default next-token cross-entropy or mean
    square; AdamW at ``lr``) with the health monitor, and recommend per layer.
    """
    g = get_gpu(gpu)
    r = Recipe.from_name(recipe)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0.0 <= recompute_forward <= 1.0 or not 0.0 <= exposed_comm <= 1.0:
        raise ValueError("recompute_forward and exposed_comm are shares between 0 and 1")
    if non_gemm_fraction is not None and not 0.0 <= non_gemm_fraction < 1.0:
        raise ValueError(f"non_gemm_fraction must be in [0, 1), got {non_gemm_fraction}")
    if calibrate_steps and _on_meta(model, example_input):
        raise ValueError("calibrate_steps needs real weights and inputs, not the meta device")
    loss = loss_fn if loss_fn is not None else _default_loss

    fp8_ag = fsdp and world_size > 1 and fp8_all_gather_unsupported_reason(r) is None
    modules = dict(model.named_modules())
    rows = []
    for name, (m, k, n, calls) in _walk(model, example_input).items():
        module = modules[name]
        why_not = r.unsupported_reason(k, n) or ""
        if not why_not and filter is not None and not filter(module, name):
            why_not = "excluded by the filter"
        plan = plan_linear(
            max(m, 1), k, n, gpu=g, recipe=r, sharded_weight_world=world_size if fp8_ag else 1
        )
        act_fp8 = 1 if r.save_fp8_activations else 2
        # Each FSDP2 step gathers a weight twice (forward, and backward after the
        # forward resharded it); a rank receives (world - 1) / world of it each time.
        ag = 2 * n * k * (world_size - 1) // world_size if fp8_ag else 0
        saved = (2 * m * k, act_fp8 * m * k)  # the input, kept for the grad_weight GEMM
        rows.append(LayerRow(name, m, k, n, calls, plan, *saved, ag, not why_not, why_not))

    warnings: list[dict[str, Any]] = []
    calibrated = calibrate_steps > 0
    if calibrated:
        numerics, warnings = calibrate(
            model,
            example_input,
            r,
            [row.name for row in rows if row.convertible],
            steps=calibrate_steps,
            loss_fn=loss,
            call=_call,
            lr=lr,
        )
        for row in rows:
            row.numerics = numerics.get(row.name)
    for row in rows:
        recommend(row, g, r)

    if bf16_step_ms is not None:
        source = "measured bf16 step"
    elif non_gemm_fraction is not None:
        source = f"fraction {non_gemm_fraction:.2f}"
    elif _on_meta(model, example_input):
        non_gemm_fraction, source = NON_GEMM_FRACTION, f"fraction {NON_GEMM_FRACTION:.2f}"
    else:
        source = "CPU profile scaled by bandwidth"
    redo = 1.0 + recompute_forward / 3.0
    lin_bf16 = sum(row.bf16_ms for row in rows) * redo
    if bf16_step_ms is not None:
        non = bf16_step_ms - lin_bf16
        if non < 0:
            raise ValueError(
                f"bf16_step_ms={bf16_step_ms:.1f} is less than the predicted bf16 Linear "
                f"GEMMs alone ({lin_bf16:.1f} ms on {g.label}): check the token count and "
                "the GPU"
            )
    elif non_gemm_fraction is not None:
        non = lin_bf16 * non_gemm_fraction / (1.0 - non_gemm_fraction)
    else:
        non = _profile_non_gemm_ms(model, example_input, loss, g)
    link = g.link_gbs / 2 * 1e9 * _LINK_EFFICIENCY  # bytes/s received

    def estimate(selected: set[str]) -> StepEstimate:
        lin_fp8 = sum(row.fp8_ms if row.name in selected else row.bf16_ms for row in rows) * redo
        saved = sum(row.ag_bytes_saved for row in rows if row.name in selected)
        return StepEstimate(lin_bf16, lin_fp8, non, source, exposed_comm * saved / link * 1e3)

    chosen = {row.name for row in rows if row.recommendation == "fp8"}
    convertible = {row.name for row in rows if row.convertible and row.plan.supported}
    step = estimate(chosen)
    step_all = step if chosen == convertible else estimate(convertible)
    return ModelPlan(g, r, world_size, fsdp, rows, step, step_all, calibrated, warnings)
