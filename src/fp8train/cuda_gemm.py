"""The CUDA route of the scaled GEMM: which scaling of ``torch.nn.functional.scaled_mm`` a
GPU's compute capability takes for a pair of operands, and the layouts that kernel needs.

``route(a, b, out_dtype, capability)`` decides; ``hardware_mm`` pads, lays out and calls.
What the kernel requires (torch's checks, CUDA side and meta side):

* the first operand row-major, the second column-major; K and N multiples of 16 (M free);
* no E5M2 x E5M2 pair; a bias in the output dtype, and none with an fp32 output;
* per scaling (``_SCALINGS`` holds the table; docs/cuda.md prints it):

  - tensorwise x tensorwise: compute capability 8.9 or newer, any output dtype;
  - rowwise x rowwise: 8.9 or newer, bf16 output only (torch's CUTLASS kernel), the
    second operand E4M3;
  - 1x128 x 128x128 and 1x128 x 1x128 blocks (DeepSeek-V3): 9.x only, E4M3 operands, K
    (and N where the second operand has 128x128 blocks) whole blocks;
  - MX 1x32 with E8M0 scales: 10.x (B200, B300), E4M3 operands, K whole blocks, bf16
    output, scales padded to 128 x 4 tiles and swizzled (``swizzle_mx_scales``).

Shapes the kernel cannot take are zero-padded: zero rows and columns add nothing to a
sum, and the output is cut back. Everything else takes the exact emulation
(:mod:`fp8train.matmul`), with the reason :func:`route` gives.

Our scales multiply to enter FP8; the kernel's scales multiply to leave it, so it gets
the reciprocals (exact: every recipe's scales are powers of two, or the division's
single rounding is the one the emulation applies too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fp8train.formats import E2M1, E4M3, E5M2
from fp8train.recipes import Recipe
from fp8train.scaling import Granularity, ScaleSpec
from fp8train.tensor import ScaledTensor

__all__ = [
    "CAPABILITIES",
    "Call",
    "Capability",
    "Route",
    "device_capability",
    "gemm_specs",
    "hardware_mm",
    "prepare",
    "route",
    "route_table",
    "swizzle_mx_scales",
]

Capability = tuple[int, int]
Scaling = Literal["tensorwise", "rowwise", "blockwise", "mx"]

# The compute capabilities the routing table is written for, with a GPU of each.
CAPABILITIES: dict[Capability, str] = {
    (8, 0): "A100",
    (8, 9): "L40S, RTX 4090",
    (9, 0): "H100, H200",
    (10, 0): "B200, GB200",
    (10, 3): "B300",
    (12, 0): "RTX 5090",
}


def _supports(scaling: Scaling, cap: Capability) -> bool:
    if cap < (8, 9):
        return False
    if scaling in ("tensorwise", "rowwise"):
        return True
    if scaling == "blockwise":
        # torch's F.scaled_mm: "DeepSeek style (1x128, 128x128) scaling only supported in
        # CUDA for SM90" (cuBLAS 12.9 scale modes).
        return cap[0] == 9
    # MX: cuBLAS's E8M0 1x32 scale mode runs on sm100/sm103; sm120 is not confirmed.
    return cap[0] == 10


_SCALING_NAMES: dict[Scaling, str] = {
    "tensorwise": "TensorWise",
    "rowwise": "RowWise",
    "blockwise": "BlockWise1x128 / BlockWise128x128",
    "mx": "BlockWise1x32 (E8M0, swizzled)",
}


@dataclass(frozen=True)
class Route:
    """How one scaled GEMM runs on a CUDA device.

    ``hardware``: through ``torch.nn.functional.scaled_mm`` (else the emulation);
    ``scaling``: the operands' scaling (None when the operands have no hardware form);
    ``reason``: why the emulation, one clause ("" on the hardware route), and ``short``,
    the same in a few words (the docs' table); ``pad``: the multiples (K, N) the operands
    are zero-padded to."""

    hardware: bool
    scaling: Scaling | None
    reason: str = ""
    short: str = ""
    pad: tuple[int, int] = (16, 16)

    def describe(self) -> str:
        if self.hardware:
            assert self.scaling is not None
            return f"F.scaled_mm {_SCALING_NAMES[self.scaling]}"
        return f"emulated: {self.reason}"


def device_capability(device: torch.device) -> Capability:
    """The compute capability of a CUDA ``device`` (read once per call from torch, which
    caches the device's properties)."""
    major, minor = torch.cuda.get_device_capability(device)
    return (int(major), int(minor))


def _scaling_of(a: ScaleSpec, b: ScaleSpec) -> tuple[Scaling | None, str]:
    """The hardware scaling of ``a (M, K) @ b (K, N)``, or None and why there is none."""
    ga, gb = a.granularity, b.granularity
    if a.fmt is E2M1 or b.fmt is E2M1:
        # Blackwell has FP4 tensor cores; routing to them (packed operands, swizzled E4M3
        # or E8M0 scales) is not built yet, so FP4 GEMMs emulate on every capability.
        return None, f"{a.fmt.name} x {b.fmt.name} operands: no FP4 route built"
    if a.fmt not in (E4M3, E5M2) or b.fmt not in (E4M3, E5M2):
        return None, f"{a.fmt.name} x {b.fmt.name} operands: F.scaled_mm multiplies FP8"
    if ga is gb is Granularity.TENSOR:
        return "tensorwise", ""
    if ga is gb is Granularity.ROW:
        return "rowwise", ""
    if ga is gb is Granularity.BLOCK:
        # a's tiles along its rows and K; b's along K and its columns.
        if a.block == (1, 128) and b.block in ((128, 128), (128, 1)):
            return "blockwise", ""
        return None, (
            f"{a.block[0]}x{a.block[1]} x {b.block[0]}x{b.block[1]} "
            "blocks: F.scaled_mm takes 1x128 x 128x128 and 1x128 x 1x128"
        )
    if ga is gb is Granularity.MX:
        if a.block == (1, 32) and b.block == (32, 1):
            return "mx", ""
        return None, f"MX blocks {a.block} x {b.block}: F.scaled_mm takes 1x32 along K"
    return None, f"{ga.value} x {gb.value} scales: F.scaled_mm pairs like with like"


def route(a: ScaleSpec, b: ScaleSpec, out_dtype: torch.dtype, capability: Capability) -> Route:
    """The route of ``a (M, K) @ b (K, N) -> out_dtype`` on a GPU of ``capability``, for
    operands quantised with the specs ``a`` and ``b`` (``b``'s as a ``(K, N)`` matrix:
    the transpose of the weight's spec in the output GEMM)."""
    scaling, reason = _scaling_of(a, b)
    cap = f"compute capability {capability[0]}.{capability[1]}"
    if scaling is None:
        short = "no FP4 route" if E2M1 in (a.fmt, b.fmt) else "no FP8 kernel"
        return Route(False, None, reason, short)
    if not _supports(scaling, capability):
        why = f"{cap} has no {_SCALING_NAMES[scaling]} FP8 GEMM"
        return Route(False, scaling, why, "no kernel here")
    fa, fb = a.fmt, b.fmt
    if fa is fb is E5M2:
        why = "E5M2 x E5M2: FP8 tensor cores need an E4M3 operand"
        return Route(False, scaling, why, "E5M2 x E5M2")
    if scaling == "rowwise" and fb is not E4M3:
        why = "rowwise F.scaled_mm takes an E4M3 second operand"
        return Route(False, scaling, why, "E5M2 second operand")
    if scaling in ("blockwise", "mx") and not fa is fb is E4M3:
        why = f"{_SCALING_NAMES[scaling]} F.scaled_mm takes E4M3 only"
        return Route(False, scaling, why, "E4M3 only")
    if scaling in ("rowwise", "mx") and out_dtype != torch.bfloat16:
        name = str(out_dtype).removeprefix("torch.")
        why = f"{_SCALING_NAMES[scaling]} F.scaled_mm writes bf16, not {name}"
        return Route(False, scaling, why, "bf16 output only")
    if scaling == "blockwise":
        return Route(True, scaling, pad=(128, 128 if b.block == (128, 128) else 16))
    if scaling == "mx":
        return Route(True, scaling, pad=(32, 16))
    return Route(True, scaling)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_bytes(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A 2-D FP8 payload zero-padded to ``(rows, cols)`` (through its bytes: the byte 0
    is +0.0 in E4M3 and E5M2, and padding is defined for bytes on every device)."""
    if tuple(t.shape) == (rows, cols):
        return t
    raw = t.view(torch.uint8)
    return F.pad(raw, (0, cols - t.shape[1], 0, rows - t.shape[0])).view(t.dtype)


def _pad_grid(grid: torch.Tensor, rows: int, cols: int, value: float) -> torch.Tensor:
    if tuple(grid.shape) == (rows, cols):
        return grid
    return F.pad(grid, (0, cols - grid.shape[1], 0, rows - grid.shape[0]), value=value)


def _e8m0_codes(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes of the dequantisation factors ``1 / scale`` (scales ``2**-E``): the
    biased exponent ``E + 127`` as uint8. float64 holds every scale (E8M0 reaches 2^-127,
    below fp32's normal range) and its log2 of a power of two is exact."""
    exponent = -torch.log2(scale.double()).round()
    return (exponent + 127).to(torch.uint8)


def swizzle_mx_scales(codes: torch.Tensor) -> torch.Tensor:
    """A ``(rows, K/32)`` grid of E8M0 codes in cuBLAS's block-scaling layout
    (``SWIZZLE_32_4_4``): padded to whole 128 x 4 tiles (code 127, a factor of 1; those
    rows and blocks hold zeros or are cut from the output), tiles in row-major order,
    and within a tile the scale of ``(r, c)`` at ``(r % 32) * 16 + (r // 32) * 4 + c``.
    Returns uint8 of shape ``(round_up(rows, 128), round_up(K/32, 4))``, contiguous."""
    rows, cols = codes.shape
    padded = _pad_grid(codes, _round_up(rows, 128), _round_up(cols, 4), 127)
    tr, tc = padded.shape[0] // 128, padded.shape[1] // 4
    # (tile row, r // 32, r % 32, tile col, c) -> (tile row, tile col, r % 32, r // 32, c)
    tiles = padded.reshape(tr, 4, 32, tc, 4).permute(0, 3, 2, 1, 4)
    return _contiguous(tiles.reshape(padded.shape))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, as a clone (which fake CUDA tensors also run on a CPU-only
    build, so that torch's meta checks see these very calls)."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the same values laid out column-major (stride ``(1, rows)``)."""
    return _contiguous(t.t()).t()


@dataclass
class Call:
    """The arguments of one ``F.scaled_mm`` call, and how to cut its output back."""

    a: torch.Tensor
    b: torch.Tensor
    scale_a: torch.Tensor
    recipe_a: F.ScalingType
    scale_b: torch.Tensor
    recipe_b: F.ScalingType
    swizzle: F.SwizzleType | None
    bias: torch.Tensor | None
    out_dtype: torch.dtype
    m: int
    n: int
    bias_after: torch.Tensor | None  # added in fp32 after the GEMM (fp32 output)

    def run(self) -> torch.Tensor:
        swizzle = None if self.swizzle is None else [self.swizzle]
        out = F.scaled_mm(
            self.a,
            self.b,
            self.scale_a,
            self.recipe_a,
            self.scale_b,
            self.recipe_b,
            swizzle_a=swizzle,
            swizzle_b=swizzle,
            bias=self.bias,
            output_dtype=self.out_dtype,
        )
        if out.shape[1] != self.n:
            out = out.narrow(1, 0, self.n)  # the padded columns cut off (a view)
        if self.bias_after is not None:
            out = out + self.bias_after
        return out


def prepare(
    a: ScaledTensor,
    b: ScaledTensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    chosen: Route,
) -> Call:
    """The ``F.scaled_mm`` arguments for ``a (M, K) @ b (K, N) [+ bias]`` on ``chosen``
    (a hardware route): payloads padded (K and N to ``chosen.pad``), ``a`` row-major,
    ``b`` column-major, scales inverted and laid out as the scaling requires."""
    assert chosen.hardware and chosen.scaling is not None
    (m, k), n = a.shape, b.shape[1]
    kp, np_ = _round_up(k, chosen.pad[0]), _round_up(n, chosen.pad[1])
    a_data = _contiguous(_pad_bytes(a.data, m, kp))
    # b column-major: its transpose (N, K) padded and contiguous, transposed back.
    b_data = _contiguous(_pad_bytes(b.data.t(), np_, kp)).t()
    Scaling = F.ScalingType
    swizzle = None
    if chosen.scaling == "tensorwise":
        recipe_a = recipe_b = Scaling.TensorWise
        scale_a, scale_b = a.scale.reciprocal(), b.scale.reciprocal()
    elif chosen.scaling == "rowwise":
        recipe_a = recipe_b = Scaling.RowWise
        scale_a = _contiguous(a.scale.reciprocal().reshape(m, 1))
        scale_b = _contiguous(_pad_grid(b.scale.reciprocal().reshape(1, n), 1, np_, 1.0))
    elif chosen.scaling == "blockwise":
        kb = kp // 128
        recipe_a = Scaling.BlockWise1x128
        # a's grid (M, K/128), stride (1, M)
        scale_a = _column_major(a.scale.reciprocal())
        inv_b = b.scale.reciprocal()
        if b.spec.block == (128, 128):
            recipe_b = Scaling.BlockWise128x128
            # b's grid (K/128, N/128), K blocks padded to a multiple of 4, stride (1, L4)
            scale_b = _column_major(_pad_grid(inv_b, _round_up(kb, 4), np_ // 128, 1.0))
        else:
            recipe_b = Scaling.BlockWise1x128
            # b's grid (K/128, N) as (N, K/128) with stride (1, N)
            scale_b = _contiguous(_pad_grid(inv_b, kb, np_, 1.0)).t()
    else:
        recipe_a = recipe_b = Scaling.BlockWise1x32
        swizzle = F.SwizzleType.SWIZZLE_32_4_4
        scale_a = swizzle_mx_scales(_e8m0_codes(a.scale)).view(torch.float8_e8m0fnu)
        # b's grid (K/32, N) is its transpose's (N, K/32), a grid like a's.
        codes_b = _pad_grid(_e8m0_codes(b.scale).t(), np_, kp // 32, 127)
        scale_b = swizzle_mx_scales(codes_b).view(torch.float8_e8m0fnu)
    bias_in = bias_after = None
    if bias is not None:
        if out_dtype == torch.float32 or chosen.scaling != "tensorwise":
            # No bias epilogue with an fp32 output (torch refuses it), and none confirmed
            # with row, block or MX scales: added after, rounded once more.
            bias_after = bias.to(out_dtype)
        else:
            bias_in = _pad_grid(bias.to(out_dtype).reshape(1, n), 1, np_, 0.0).reshape(np_)
    return Call(
        a_data,
        b_data,
        scale_a,
        recipe_a,
        scale_b,
        recipe_b,
        swizzle,
        bias_in,
        out_dtype,
        m,
        n,
        bias_after,
    )


def hardware_mm(
    a: ScaledTensor,
    b: ScaledTensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    chosen: Route,
) -> torch.Tensor:
    """``a @ b [+ bias]`` through ``torch.nn.functional.scaled_mm`` on ``chosen``."""
    return prepare(a, b, bias, out_dtype, chosen).run()


def gemm_specs(recipe: Recipe) -> dict[str, tuple[ScaleSpec, ScaleSpec]]:
    """The operand specs ``(a, b)`` of a recipe's three FP8 GEMMs, ``a (M, K) @ b (K, N)``:
    output ``x . W^T``, grad_input ``dy . W``, grad_weight ``dy^T . x``, each operand
    scaled along the axis its GEMM contracts (as fp8train.autograd quantises them)."""
    w_t = recipe.weight.transposed()
    return {
        "output": (recipe.input, w_t),
        "grad_input": (recipe.grad_output, w_t),
        "grad_weight": (recipe.grad_output, recipe.input.transposed()),
    }


def route_table(recipes: dict[str, Recipe], out_dtype: torch.dtype = torch.bfloat16) -> str:
    """A markdown table: recipe x compute capability -> the route of its three GEMMs
    with ``out_dtype`` outputs (docs/cuda.md prints it for bf16 and fp32)."""
    caps = list(CAPABILITIES)
    head = "| recipe | " + " | ".join(_cap_label(c) for c in caps) + " |"
    lines = [head, "|---" * (len(caps) + 1) + "|"]
    for name, recipe in recipes.items():
        cells = []
        for cap in caps:
            routes = {
                gemm: route(a, b, out_dtype, cap) for gemm, (a, b) in gemm_specs(recipe).items()
            }
            kinds = {_cell(r) for r in routes.values()}
            if len(kinds) == 1:
                cells.append(_cell(next(iter(routes.values()))))
            else:
                cells.append("; ".join(f"{g}: {_cell(r)}" for g, r in routes.items()))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: Route) -> str:
    if r.hardware:
        assert r.scaling is not None
        return f"**{_SHORT_NAMES[r.scaling]}**"
    return f"emulated ({r.short})"


_SHORT_NAMES: dict[Scaling, str] = {
    "tensorwise": "TensorWise",
    "rowwise": "RowWise",
    "blockwise": "1x128 / 128x128",
    "mx": "MX 1x32",
}


def _cap_label(cap: Capability) -> str:
    return f"{cap[0]}.{cap[1]} ({CAPABILITIES[cap]})"
