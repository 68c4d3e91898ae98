"""The GPUs the planner knows, as data: peak tensor throughput, bandwidths, FP8 scalings.

Every figure is the vendor's *dense* (no 2:4 sparsity) number; where a datasheet prints
only the sparse figure we halve it and say so. Throughput in TFLOP/s, memory bandwidth
in TB/s, interconnect in GB/s per GPU (all links, both directions added, as vendors
print it). The planner uses half of the interconnect figure: one direction, what an
all-gather receives.

What a GPU delivers is less than its peak. Three measured effects, each a constant
fixed here once (``docs/planner.md`` gives the reasoning and where they are wrong):

* ``gemm_efficiency``: the share of peak a large, well-shaped GEMM reaches with the
  vendor library (cuBLAS, hipBLASLt), per dtype;
* the GEMM-efficiency curve by problem size (:func:`gemm_efficiency_curve`): wave
  quantisation over the GPU's SMs plus a fixed launch-and-tail time per kernel, which is
  why small GEMMs never reach the large-GEMM figure;
* ``scalings``: the FP8 GEMM's throughput under each scaling granularity relative to
  its tensorwise kernel, or absent where the GEMM cannot take that scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "GPUS",
    "HBM_EFFICIENCY",
    "KERNEL_OVERHEAD_US",
    "SPLIT_K_MIN",
    "TILE",
    "Gpu",
    "gemm_efficiency_curve",
    "get_gpu",
]

# Share of the datasheet memory bandwidth a streaming kernel (read once, write once)
# reaches. STREAM-like copy kernels on H100/H200/MI300X reach 80-90% of the datasheet
# figure (NVIDIA's H100 tuning guide; AMD's MI300X instinct docs report ~4.3 of 5.3
# TB/s); we take 0.85 for every GPU.
HBM_EFFICIENCY = 0.85

# Launch plus tail of one kernel, in microseconds: the floor under every GEMM and every
# quantisation pass. CUDA's launch latency is ~2-4 us and a kernel's last partial wave
# adds about as much (NVIDIA "CUDA C++ Best Practices": launch overhead); under
# torch.compile with CUDA graphs it is lower, which this model does not assume.
KERNEL_OVERHEAD_US = 4.0

# Output tile (rows x cols) a GEMM kernel gives each SM per wave. 128x128 is the tile
# cuBLAS and CUTLASS pick for large bf16/FP8 GEMMs on Hopper and CDNA3 (NVIDIA "Matrix
# Multiplication Background User's Guide", section on wave quantisation).
TILE = 128

# Shortest contraction chunk a split-K GEMM gives one SM: below ~1024 elements of K
# the partial-sum reduction costs more than the parallelism gains (CUTLASS split-K
# examples use slices of 1-4K; an assumption, docs/planner.md).
SPLIT_K_MIN = 1024


@dataclass(frozen=True)
class Gpu:
    """One accelerator. ``bf16``/``fp8``/``fp4``/``int8``: dense tensor-core TFLOP/s
    (``fp4``/``int8`` None where it has none or none we plan for); ``hbm_tbs``: memory
    TB/s; ``link_gbs``: scale-up interconnect GB/s per GPU, both directions; ``sms``: SMs
    or CUs (the wave-quantisation width); ``gemm_efficiency``: share of peak a large GEMM
    reaches, per dtype name; ``scalings``: FP8 GEMM throughput per granularity
    (``"tensor"``, ``"row"``, ``"block"``, ``"mx"``) relative to the tensorwise kernel,
    absent where the GEMM cannot take it; ``fp8_flavour``: ``"fn"`` (OCP E4M3FN/E5M2)
    or ``"fnuz"`` (AMD CDNA3's variant, one binade less of range at the top)."""

    name: str
    label: str
    bf16: float
    fp8: float
    fp4: float | None
    int8: float | None
    hbm_tbs: float
    link_gbs: float
    sms: int
    gemm_efficiency: dict[str, float] = field(hash=False)
    scalings: dict[str, float] = field(hash=False)
    fp8_flavour: str = "fn"

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak for ``"bf16"``, ``"fp8"``, ``"fp4"`` or ``"int8"``; ``ValueError``
        where this GPU has no such tensor cores."""
        value = {"bf16": self.bf16, "fp8": self.fp8, "fp4": self.fp4, "int8": self.int8}.get(dtype)
        if value is None:
            raise ValueError(f"{self.label} has no {dtype} tensor cores the planner knows of")
        return value

    def scaling_factor(self, granularity: str) -> float | None:
        """The FP8 GEMM's throughput under ``granularity`` relative to tensorwise, or
        None where this GPU's GEMM cannot take that scaling."""
        return self.scalings.get(granularity)


# Large-GEMM efficiencies. NVIDIA: cuBLAS reaches ~75% of the dense bf16 peak on large
# GEMMs on H100 SXM (~740 of 989 TFLOP/s; SemiAnalysis "MI300X vs H100 vs H200
# benchmark part 1: training", Dec 2024, measured ~720). The FP8 share is set so that
# FP8 over bf16 on the same large GEMMs is Transformer Engine's measured 1.92x on H200
# ("low precision training: speedups", pre-quantised operands): 0.75 * 1.92 / 2 = 0.72.
# Blackwell: no comparable public measurement found; assumed equal to Hopper (known to
# be optimistic for bf16 on early software, docs/planner.md).
_NVIDIA_EFF = {"bf16": 0.75, "fp8": 0.72, "fp4": 0.72, "int8": 0.72}
# AMD CDNA3: the same SemiAnalysis study measured ~620 of 1307 TFLOP/s bf16 and ~990 of
# 2615 FP8 on MI300X GEMMs (~47% and ~38%).
_AMD_EFF = {"bf16": 0.47, "fp8": 0.38, "int8": 0.38}

# FP8 GEMM throughput per scaling granularity, relative to the tensorwise kernel.
# Hopper (sm90): tensorwise and rowwise scales are applied in the epilogue (cuBLAS 12.x,
# CUTLASS); rowwise costs an outer-product epilogue and runs on CUTLASS kernels that
# torch's _scaled_mm dispatches to, which we take as 10% slower. 1x128/128x128 block
# scales cannot ride the tensor-core accumulator: partial sums are promoted to FP32 on
# CUDA cores every 128 of K (DeepSeek-V3, arXiv 2412.19437, section 3.3), which we take
# to cost 20%. No MX hardware on sm90.
_HOPPER = {"tensor": 1.0, "row": 0.9, "block": 0.8}
# Blackwell (sm100): block-scaled tensor-core MMA takes 1x32 E8M0 scales natively (MX,
# NVIDIA PTX ISA tcgen05.mma block_scale) at the full FP8 rate; tensorwise runs at full
# rate; 128-blocks are taken through the same block-scaled path with a coarser grid
# (10% assumed). Rowwise had no native cuBLAS kernel on sm100 when torchao measured it
# (torchao float8 README: rowwise +4.0% against tensorwise +25.4% on B200); we take
# 0.7, an assumption.
_BLACKWELL = {"tensor": 1.0, "row": 0.7, "block": 0.9, "mx": 1.0}
# Ada (sm89): FP8 tensor cores with per-tensor scales; torch's rowwise _scaled_mm did not
# run on sm89 (pytorch/pytorch#130359), no block or MX scaling.
_ADA = {"tensor": 1.0}
# CDNA3: hipBLASLt takes tensorwise and rowwise (per-row/column vector) scales; no
# block or MX scaling before CDNA4.
_CDNA3 = {"tensor": 1.0, "row": 0.9}

_TABLE = (
    # NVIDIA H100 datasheet (SXM5): bf16 989.4, FP8 1978.9, INT8 1978.9 dense (the sheet
    # prints 2x with sparsity); HBM3 3.35 TB/s; NVLink 4 900 GB/s; 132 SMs (Hopper
    # whitepaper).
    Gpu(
        "h100-sxm",
        "H100 SXM",
        bf16=989.0,
        fp8=1979.0,
        fp4=None,
        int8=1979.0,
        hbm_tbs=3.35,
        link_gbs=900.0,
        sms=132,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_HOPPER,
    ),
    # NVIDIA H100 datasheet (PCIe): bf16 756, FP8 1513, INT8 1513 dense; HBM2e 2.0 TB/s;
    # PCIe Gen5 x16 128 GB/s (NVLink bridge optional: 600 GB/s); 114 SMs.
    Gpu(
        "h100-pcie",
        "H100 PCIe",
        bf16=756.0,
        fp8=1513.0,
        fp4=None,
        int8=1513.0,
        hbm_tbs=2.0,
        link_gbs=128.0,
        sms=114,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_HOPPER,
    ),
    # NVIDIA H200 datasheet (SXM): the H100's tensor cores (bf16 989, FP8 1979 dense),
    # HBM3e 4.8 TB/s, 141 GB; NVLink 900 GB/s; 132 SMs.
    Gpu(
        "h200",
        "H200",
        bf16=989.0,
        fp8=1979.0,
        fp4=None,
        int8=1979.0,
        hbm_tbs=4.8,
        link_gbs=900.0,
        sms=132,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_HOPPER,
    ),
    # NVIDIA DGX B200 / HGX B200 datasheets: per GPU bf16 2.25 PFLOP/s, FP8 4.5, FP4 9,
    # INT8 4.5 dense (printed 2x with sparsity); HBM3e 8 TB/s; NVLink 5 1800 GB/s;
    # 148 SMs.
    Gpu(
        "b200",
        "B200",
        bf16=2250.0,
        fp8=4500.0,
        fp4=9000.0,
        int8=4500.0,
        hbm_tbs=8.0,
        link_gbs=1800.0,
        sms=148,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_BLACKWELL,
    ),
    # NVIDIA HGX B300 (Blackwell Ultra) datasheet: per GPU bf16 2.25 PFLOP/s, FP8 4.5,
    # dense FP4 raised to 13.5 (1.5x B200); INT8 cut to a fraction (not planned for);
    # HBM3e 8 TB/s, 288 GB; NVLink 5 1800 GB/s; 148 SMs enabled (160 on the die).
    Gpu(
        "b300",
        "B300",
        bf16=2250.0,
        fp8=4500.0,
        fp4=13500.0,
        int8=None,
        hbm_tbs=8.0,
        link_gbs=1800.0,
        sms=148,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_BLACKWELL,
    ),
    # NVIDIA GB200 NVL72 datasheet, divided by 72 GPUs and halved for density: bf16
    # 2.5 PFLOP/s, FP8 5, FP4 10, INT8 5 dense (higher clocks than B200 in a Grace
    # node); HBM3e 8 TB/s; NVLink 5 1800 GB/s; 148 SMs.
    Gpu(
        "gb200",
        "GB200",
        bf16=2500.0,
        fp8=5000.0,
        fp4=10000.0,
        int8=5000.0,
        hbm_tbs=8.0,
        link_gbs=1800.0,
        sms=148,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_BLACKWELL,
    ),
    # NVIDIA L40S datasheet: bf16 362, FP8 733, INT8 733 dense (printed 2x sparse);
    # GDDR6 864 GB/s; PCIe Gen4 x16 64 GB/s, no NVLink; 142 SMs.
    Gpu(
        "l40s",
        "L40S",
        bf16=362.0,
        fp8=733.0,
        fp4=None,
        int8=733.0,
        hbm_tbs=0.864,
        link_gbs=64.0,
        sms=142,
        gemm_efficiency=_NVIDIA_EFF,
        scalings=_ADA,
    ),
    # AMD Instinct MI300X datasheet: bf16 1307.4, FP8 2614.9, INT8 2614.9 dense; HBM3
    # 5.3 TB/s; Infinity Fabric 7 links x 128 GB/s = 896 GB/s; 304 CUs. FP8 is the
    # FNUZ variant (E4M3FNUZ max 240).
    Gpu(
        "mi300x",
        "MI300X",
        bf16=1307.4,
        fp8=2614.9,
        fp4=None,
        int8=2614.9,
        hbm_tbs=5.3,
        link_gbs=896.0,
        sms=304,
        gemm_efficiency=_AMD_EFF,
        scalings=_CDNA3,
        fp8_flavour="fnuz",
    ),
    # AMD Instinct MI325X datasheet: MI300X's compute (bf16 1307.4, FP8 2614.9 dense),
    # HBM3E 6.0 TB/s, 256 GB; Infinity Fabric 896 GB/s; 304 CUs.
    Gpu(
        "mi325x",
        "MI325X",
        bf16=1307.4,
        fp8=2614.9,
        fp4=None,
        int8=2614.9,
        hbm_tbs=6.0,
        link_gbs=896.0,
        sms=304,
        gemm_efficiency=_AMD_EFF,
        scalings=_CDNA3,
        fp8_flavour="fnuz",
    ),
)

GPUS: dict[str, Gpu] = {g.name: g for g in _TABLE}


def get_gpu(gpu: str | Gpu) -> Gpu:
    """A :class:`Gpu` by table name (``"h100-sxm"``; case, spaces and ``_`` ignored, and
    ``"h100"`` means the SXM part) or a ``Gpu`` passed through."""
    if isinstance(gpu, Gpu):
        return gpu
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a name from {', '.join(GPUS)} or a Gpu, got {gpu!r}")
    key = gpu.strip().lower().replace("_", "-").replace(" ", "-")
    key = {"h100": "h100-sxm"}.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def gemm_efficiency_curve(gpu: Gpu, rows: int, cols: int, inner: int) -> float:
    """Share of the large-GEMM throughput a GEMM with a ``rows x cols`` output and
    contraction ``inner`` reaches from wave quantisation: its ``TILE x TILE`` output
    tiles run in waves of ``gpu.sms`` and the last wave runs partly idle (NVIDIA "Matrix
    Multiplication Background User's Guide"). An output too small to fill the GPU is
    split along the contraction (split-K, as cuBLAS's heuristics do) into chunks of at
    least :data:`SPLIT_K_MIN` elements, up to one tile per SM. 1.0 for a whole number of
    full waves. The fixed per-kernel time is added separately
    (:data:`KERNEL_OVERHEAD_US`)."""
    tiles = math.ceil(rows / TILE) * math.ceil(cols / TILE)
    if tiles < gpu.sms:
        tiles *= max(1, min(gpu.sms // tiles, inner // SPLIT_K_MIN))
    waves = math.ceil(tiles / gpu.sms)
    return tiles / (waves * gpu.sms)
