"""A model of the FP8 tensor-core accumulator: what an FP8 GEMM keeps while it sums.

fp8train's emulation accumulates in fp32 (``accumulation="fp32"``). Hopper's FP8 tensor
cores do not: DeepSeek-V3 (arXiv 2412.19437, §3.3.2) measured that an H800's FP8 GEMM
keeps "around 14 bits" while accumulating, a maximum relative error of nearly 2% for
K = 4096 with random operands, and fixed it by adding the tensor core's partial sums
into FP32 registers every N_C = 128 elements of K (four WGMMA instructions of K = 32).
An independent analysis reports the H100 FP8 accumulator as an e8m13 format (13 stored
fraction bits plus the implicit one: the same 14 significant bits), and Khattak and
Mikaitis (arXiv 2512.07004) give bit-accurate software models of the V100 to B200
tensor cores, FP8 on the H100 included. :class:`TensorCoreAccumulator` is a small model
built on the first two figures, so the error can be seen, tested and trained with on
any CPU.

The model, for one output ``c = sum_k a_k b_k`` (``a``, ``b`` the dequantised operands,
what the emulation multiplies):

1. K is cut into consecutive groups of ``k_step`` elements (the last may be shorter).
2. Each group's products are summed exactly (in float64, where E4M3 values times
   power-of-two scales make every product and sum exact whatever the order;
   :func:`tensor_core_mm` gives the bounds, and E5M2's corner).
3. The group sum is added exactly to the partial sum, and the result is truncated to
   ``mantissa_bits`` significant bits, toward zero (the hardware's alignment shift
   drops the low bits of the sum; nothing rounds them).
4. Every ``promote_every`` elements of K (``None``: never) the partial sum is added
   into an fp32 accumulator (one fp32 rounding, to nearest even) and reset to zero.
5. The result is the fp32 accumulator plus the last partial sum, in fp32.

Where this is a model, not the silicon: the hardware aligns every product of a group to
the group's largest exponent and truncates each before the sum (Fasi et al. found this
on earlier tensor cores; the bit-accurate H100 model is more detailed still), while here
each group sum is exact and only the running sum is truncated; the width of 14 bits
comes from DeepSeek's measurement, not from a bit-level probe; the exponent range is
not modelled (an fp32-range overflow shows up only when the result is cast to fp32);
and the scales enter before the sum (the model runs on dequantised operands), which is
the hardware's arithmetic exactly only for power-of-two scales, as every built-in
recipe uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

__all__ = ["Accumulation", "TensorCoreAccumulator", "check_accumulation", "tensor_core_mm"]

# fp32's significand (24 bits with the implicit one): the accumulator is an fp32-format
# register, so a wider one means nothing.
_FP32_SIGNIFICAND = 24
# float64's stored fraction bits, for the truncation mask.
_FP64_FRACTION = 52
# How many float64 group sums one batched GEMM of tensor_core_mm writes at most (32 MiB).
_BATCH_ELEMENTS = 1 << 22
# At most this many output values per element-wise step of tensor_core_mm's loop: ATen's
# grain size (at::internal::GRAIN_SIZE), below which an element-wise op runs serially.
_TILE_ELEMENTS = 32768


@dataclass(frozen=True)
class TensorCoreAccumulator:
    """The tensor-core accumulator model (the module docstring gives each step).

    ``mantissa_bits``: significant bits the partial sum keeps, the implicit one
    included (14: DeepSeek-V3's "around 14 bits" on Hopper, an e8m13 register).
    ``k_step``: products summed per instruction before the partial sum is truncated
    (32: the K of one FP8 WGMMA instruction). ``promote_every``: elements of K after
    which the partial sum is added into fp32 and reset (N_C = 128 in DeepSeek-V3, four
    instructions); ``None`` never promotes, a plain tensor-core GEMM. Must be a
    multiple of ``k_step``.
    """

    mantissa_bits: int = 14
    k_step: int = 32
    promote_every: int | None = 128

    def __post_init__(self) -> None:
        for name in ("mantissa_bits", "k_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TensorCoreAccumulator.{name} must be an int, got {value!r}")
        if not 1 <= self.mantissa_bits <= _FP32_SIGNIFICAND:
            raise ValueError(
                f"TensorCoreAccumulator.mantissa_bits must be 1 to {_FP32_SIGNIFICAND} (the "
                f"register is fp32-format), got {self.mantissa_bits}"
            )
        if self.k_step < 1:
            raise ValueError(f"TensorCoreAccumulator.k_step must be >= 1, got {self.k_step}")
        p = self.promote_every
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, int) or p < 1 or p % self.k_step
        ):
            raise ValueError(
                f"TensorCoreAccumulator.promote_every must be None or a positive multiple of "
                f"k_step={self.k_step} (promotion happens between instructions), got {p!r}"
            )


# What an FP8 GEMM accumulates in: "fp32" (exact emulation) or the tensor-core model.
Accumulation: TypeAlias = Literal["fp32"] | TensorCoreAccumulator


def check_accumulation(accumulation: object, where: str) -> None:
    """Raise (naming ``where``) unless ``accumulation`` is ``"fp32"`` or a
    :class:`TensorCoreAccumulator`."""
    if accumulation == "fp32" or isinstance(accumulation, TensorCoreAccumulator):
        return
    raise ValueError(
        f"{where}: accumulation must be 'fp32' or a fp8train.TensorCoreAccumulator, got "
        f"{accumulation!r}; e.g. accumulation=fp8train.TensorCoreAccumulator()"
    )


def tensor_core_mm(a: torch.Tensor, b: torch.Tensor, model: TensorCoreAccumulator) -> torch.Tensor:
    """``a (M, K) @ b (K, N) -> (M, N)`` in fp32, accumulated as ``model`` says.

    ``a`` and ``b`` are the dequantised operands in any float dtype (taken to float64).
    The result is bitwise the model's whenever every group sum and every partial sum is
    exact in float64 (then no summation order matters). For E4M3 values times
    power-of-two scales it is, up to K = 2**17: the products are multiples of 2**-18
    below 2**18 (before the scales), so a sum of K of them needs fewer than 53 bits.
    E5M2 widens the products' span to 2**-32 .. 2**32: a group sum can then round, at
    float64's precision (39 bits below the modelled accumulator), only when subnormal
    and near-maximal values meet in one group.
    Vectorised over the output: the group sums come from batched GEMMs (a few groups
    at a time, so the extra memory stays near ``_BATCH_ELEMENTS`` float64 values), and
    the loop runs over the ``k_step`` groups of K, never over elements.
    """
    m, k = a.shape
    n = b.shape[1]
    step, every = model.k_step, model.promote_every
    groups = -(-k // step)
    pad = groups * step - k
    if pad:  # zero products complete the last group: they add nothing
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    # One copy each: to float64, in the layout the batched GEMM reads.
    a_groups = a.reshape(m, groups, step).transpose(0, 1)  # (groups, M, k_step)
    a_groups = a_groups.to(torch.float64, memory_format=torch.contiguous_format)
    b_groups = b.reshape(groups, step, n).to(torch.float64)  # (groups, k_step, N)
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    partial = torch.zeros(m, n, dtype=torch.float64, device=a.device)
    # Truncation toward zero to mantissa_bits significant bits: clear the float64
    # fraction bits below them (sign and magnitude are stored apart, so this shortens
    # the magnitude whatever the sign; zero stays zero, a quiet NaN keeps its quiet bit).
    dropped = _FP64_FRACTION - (model.mantissa_bits - 1)
    mask = ~((1 << dropped) - 1)
    bits = partial.view(torch.int64)
    # The loop's element-wise steps run on tiles of whole output rows of at most
    # _TILE_ELEMENTS values: below ATen's parallel grain size, so each runs on one
    # thread with no parallel region to enter and leave per step (K / k_step of them),
    # and the tile stays in cache while its groups are added.
    rows = max(1, _TILE_ELEMENTS // max(1, n))
    per_batch = max(1, _BATCH_ELEMENTS // max(1, m * n))
    for g0 in range(0, groups, per_batch):
        sums = torch.bmm(a_groups[g0 : g0 + per_batch], b_groups[g0 : g0 + per_batch])
        for r0 in range(0, m, rows):
            tile, tile_bits = partial[r0 : r0 + rows], bits[r0 : r0 + rows]
            for i, group_sum in enumerate(sums[:, r0 : r0 + rows], start=g0):
                tile += group_sum  # exact (step 3), then truncated
                tile_bits.bitwise_and_(mask)
                if every is not None and (i + 1) * step % every == 0:
                    out[r0 : r0 + rows] += tile.to(torch.float32)  # step 4: one fp32 rounding
                    tile.zero_()
    if every is None or groups * step % every:  # groups not yet promoted
        out += partial.to(torch.float32)
    return out
