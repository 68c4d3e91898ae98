"""The cost model of one Linear: three GEMMs and the recipe's quantisation passes.

A Linear with input ``x (m, k)`` and weight ``W (n, k)`` runs three GEMMs per training
step (``fp8train.recipes`` writes them out): output ``x . W^T`` (an ``m x n`` output),
grad_input ``dy . W`` (``m x k``) and grad_weight ``dy^T . x`` (``n x k``), each
``2 m k n`` FLOPs. Each is priced as the slower of its compute time and its memory time,
plus a fixed per-kernel time:

    compute = 2 m k n / (peak[dtype] * gemm_efficiency[dtype] * wave_efficiency * scaling)
    memory  = (bytes of both operands + bytes of the output) / (hbm * HBM_EFFICIENCY)

In FP8 each of the three tensors ``x``, ``W`` and ``dy`` is quantised once per step, in
two orientations (one per GEMM it enters), by memory-bound passes priced by the bytes
they read and write (:func:`quant_passes` lists them per recipe). bf16 has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8train.planner.gpus import (
    HBM_EFFICIENCY,
    KERNEL_OVERHEAD_US,
    Gpu,
    gemm_efficiency_curve,
    get_gpu,
)
from fp8train.recipes import Recipe, RecipeName
from fp8train.scaling import Granularity

__all__ = ["LinearPlan", "Pass", "gemm_ms", "plan_linear", "quant_passes"]

_HP_BYTES = 2  # bf16 source tensors and GEMM outputs


@dataclass(frozen=True)
class Pass:
    """One memory-bound kernel over a tensor: ``read``/``write`` bytes per element of
    the tensor, ``what`` says which pass it is."""

    what: str
    read: float
    write: float

    @property
    def bytes_per_element(self) -> float:
        return self.read + self.write


def _granularity(recipe: Recipe) -> str:
    g = recipe.input.granularity
    return {
        Granularity.TENSOR: "tensor",
        Granularity.ROW: "row",
        Granularity.BLOCK: "block",
        Granularity.MX: "mx",
    }[g]


def _scale_bytes(recipe: Recipe) -> float:
    """Bytes of scale per element of one FP8 copy (block and MX grids; ~0 otherwise)."""
    spec = recipe.input
    if spec.granularity is Granularity.MX:
        return 1.0 / spec.block[1]  # one E8M0 byte per block
    if spec.granularity is Granularity.BLOCK:
        return 4.0 / spec.block[1]  # one fp32 scale per 1x128 tile
    return 0.0


def _fp8_gemms(recipe: Recipe) -> tuple[bool, bool, bool]:
    """Which of (output, grad_input, grad_weight) run in FP8 under ``recipe``."""
    fprop = bool(getattr(recipe, "fp8_fprop", True))  # a newer Recipe field
    return fprop, recipe.fp8_dgrad, recipe.fp8_wgrad


def quant_passes(recipe: Recipe | str, *, sharded_weight_world: int = 1) -> dict[str, list[Pass]]:
    """The passes this model assumes for each tensor (``"x"``, ``"W"``, ``"dy"``), as
    ``torch.compile`` fuses them: each tensor is read from bf16 and written once per
    orientation its FP8 GEMMs need (x: output along K, grad_weight along M; W: output
    along K, grad_input along N; dy: grad_input along N, grad_weight along M). With
    both orientations:

    * ``delayed``: one fused cast-and-transpose (read 2, write 1 + 1 bytes per element);
      the amax for the history is reduced inside that kernel, so there is no amax pass.
    * ``tensorwise`` and ``int8`` (current scaling): an amax pass (read 2), then the
      same fused cast-and-transpose: the scale must be known before the first element
      is cast.
    * ``rowwise`` and ``int8_rowwise``: the cast along the first orientation computes
      each row's amax in the same kernel (a row is local to a thread block): read 2,
      write 1. The other orientation needs one scale per *column*, a reduction over
      every row: an amax pass (read 2) and a second cast (read 2, write 1).
    * ``blockwise`` and ``mxfp8``: every block's amax is local, so one kernel reads the
      tensor once and writes both orientations with their scale grids (read 2, write
      1 + 1 plus the scales).

    A tensor whose GEMMs run in high precision (``fp8_dgrad=False`` ...) loses that
    orientation's write (rowwise: that orientation's passes); with neither, no pass.
    ``sharded_weight_world > 1``: the weight is cast on its FSDP shard before an FP8
    all-gather (recipes whose weight scales survive transposition), so its passes
    read and write ``1 / world`` of the tensor; the gathered FP8 weight is then
    transposed for the grad_input GEMM (read 1, write 1).
    """
    recipe = Recipe.from_name(recipe)
    g = _granularity(recipe)
    s = _scale_bytes(recipe)
    fprop, dgrad, wgrad = _fp8_gemms(recipe)
    # (first orientation, second orientation) needed in FP8, per tensor
    needs = {"x": (fprop, wgrad), "W": (fprop, dgrad), "dy": (dgrad, wgrad)}
    passes: dict[str, list[Pass]] = {}
    for tensor, (first, second) in needs.items():
        copies = int(first) + int(second)
        if copies == 0:
            passes[tensor] = []
        elif recipe.scaling == "delayed":
            passes[tensor] = [Pass("cast (+transpose), amax fused", 2, copies)]
        elif g == "tensor":
            passes[tensor] = [Pass("amax", 2, 0), Pass("cast (+transpose)", 2, copies)]
        elif g == "row":
            passes[tensor] = [Pass("cast, row amax fused", 2, 1)] if first else []
            if second:
                passes[tensor] += [Pass("column amax", 2, 0), Pass("cast along columns", 2, 1)]
        else:  # block, mx
            passes[tensor] = [Pass("cast, block amaxes fused", 2, copies * (1 + s))]
    if sharded_weight_world > 1 and passes["W"]:
        w = sharded_weight_world
        passes["W"] = [
            Pass(f"{p.what} on the 1/{w} shard", p.read / w, p.write / w) for p in passes["W"]
        ] + [Pass("transpose the gathered FP8 weight", 1, 1)]
    return passes


def _pass_ms(passes: list[Pass], elements: int, gpu: Gpu) -> float:
    """Each pass streams ``elements`` at the achievable bandwidth, plus its launch."""
    bw = gpu.hbm_tbs * 1e12 * HBM_EFFICIENCY  # bytes/s
    return sum(p.bytes_per_element * elements / bw * 1e3 + KERNEL_OVERHEAD_US / 1e3 for p in passes)


def gemm_ms(
    rows: int,
    cols: int,
    inner: int,
    *,
    gpu: Gpu,
    dtype: str,
    operand_bytes: float,
    scaling: float = 1.0,
) -> float:
    """One GEMM with a ``rows x cols`` bf16 output contracting ``inner``, in ms."""
    flops = 2.0 * rows * cols * inner
    rate = (
        gpu.peak_tflops(dtype)
        * 1e12
        * gpu.gemm_efficiency[dtype]
        * gemm_efficiency_curve(gpu, rows, cols, inner)
        * scaling
    )
    moved = (rows * inner + cols * inner) * operand_bytes + rows * cols * _HP_BYTES
    memory = moved / (gpu.hbm_tbs * 1e12 * HBM_EFFICIENCY)
    return max(flops / rate, memory) * 1e3 + KERNEL_OVERHEAD_US / 1e3


@dataclass(frozen=True)
class LinearPlan:
    """Predicted forward+backward time of one Linear on one GPU. Times in ms:
    ``bf16_gemm_ms`` (three bf16 GEMMs), ``fp8_gemm_ms`` (three FP8 GEMMs, operands
    already quantised), ``quant_ms`` (the recipe's passes), ``bf16_ms`` and ``fp8_ms``
    (totals: ``fp8_ms = fp8_gemm_ms + quant_ms``) and ``speedup = bf16_ms / fp8_ms``.
    ``supported`` is False (and every FP8 figure equals bf16's) where the GPU's GEMM
    cannot take the recipe's scaling; ``reason`` then says why."""

    m: int
    k: int
    n: int
    gpu: str
    recipe: str
    bf16_gemm_ms: float
    fp8_gemm_ms: float
    quant_ms: float
    supported: bool = True
    reason: str = ""

    @property
    def bf16_ms(self) -> float:
        return self.bf16_gemm_ms

    @property
    def fp8_ms(self) -> float:
        return self.fp8_gemm_ms + self.quant_ms

    @property
    def speedup(self) -> float:
        return self.bf16_ms / self.fp8_ms

    @property
    def flops(self) -> float:
        """FLOPs of the three GEMMs."""
        return 6.0 * self.m * self.k * self.n


def _dtype(recipe: Recipe) -> str:
    return "int8" if recipe.input.fmt.name.lower().startswith("int8") else "fp8"


def plan_linear(
    m: int,
    k: int,
    n: int,
    *,
    gpu: str | Gpu,
    recipe: Recipe | RecipeName | str,
    sharded_weight_world: int = 1,
) -> LinearPlan:
    """Predict one Linear's forward+backward on ``gpu`` in bf16 and under ``recipe``:
    ``m`` tokens, ``k`` in_features, ``n`` out_features. ``sharded_weight_world``: the
    FSDP world size when the weight is cast on its shard before an FP8 all-gather (see
    :func:`quant_passes`). Raises ``ValueError`` for a non-positive dimension, an
    unknown GPU or recipe."""
    for dim, value in (("m", m), ("k", k), ("n", n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{dim} must be a positive int, got {value!r}")
    g = get_gpu(gpu)
    r = Recipe.from_name(recipe)
    # output (m x n, contracts k), grad_input (m x k, contracts n), grad_weight (n x k,
    # contracts m)
    shapes = ((m, n, k), (m, k, n), (n, k, m))
    bf16 = sum(gemm_ms(*s, gpu=g, dtype="bf16", operand_bytes=_HP_BYTES) for s in shapes)
    dtype = _dtype(r)
    factor = g.scaling_factor(_granularity(r))
    reason = ""
    if factor is None:
        reason = f"{g.label}'s GEMM cannot take {_granularity(r)} scaling"
    elif (dtype == "int8" and g.int8 is None) or (dtype == "fp8" and not g.fp8):
        reason = f"{g.label} has no {dtype} tensor cores"
        factor = None
    if factor is None:
        return LinearPlan(m, k, n, g.name, r.name, bf16, bf16, 0.0, False, reason)
    fp8 = sum(
        gemm_ms(*s, gpu=g, dtype=dtype, operand_bytes=1 + _scale_bytes(r), scaling=factor)
        if in_fp8
        else gemm_ms(*s, gpu=g, dtype="bf16", operand_bytes=_HP_BYTES)
        for s, in_fp8 in zip(shapes, _fp8_gemms(r), strict=True)
    )
    passes = quant_passes(r, sharded_weight_world=sharded_weight_world)
    quant = (
        _pass_ms(passes["x"], m * k, g)
        + _pass_ms(passes["W"], n * k, g)
        + _pass_ms(passes["dy"], m * n, g)
    )
    return LinearPlan(m, k, n, g.name, r.name, bf16, fp8, quant)
