"""Exact power-of-two arithmetic on fp32 bit fields.

``torch.frexp``/``torch.ldexp`` are exact in eager mode, but inductor lowers them to
``log2``/``exp2`` math whose results are not exact powers of two (we saw a "power-of-two"
scale of 1205150.75 under torch.compile). Reading and writing the exponent field
directly is exact on every backend, so eager and compiled code agree bit for bit.
"""

from __future__ import annotations

import torch

_MANTISSA_BITS = 23
_BIAS = 127


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2 |v|) as int32 for fp32 ``v``; values below 2^-126 (fp32 subnormals
    and zero) give -127, which every caller clamps to a format minimum >= -127."""
    field = (v.float().view(torch.int32) >> _MANTISSA_BITS) & 0xFF
    return torch.where(field == 0, torch.full_like(field, -_BIAS), field - _BIAS)


def is_power_of_two(v: torch.Tensor) -> torch.Tensor:
    """Whether each normal fp32 ``v`` has a zero mantissa field."""
    return (v.float().view(torch.int32) & ((1 << _MANTISSA_BITS) - 1)) == 0


def exp2i(e: torch.Tensor) -> torch.Tensor:
    """2**e as fp32 for integer ``e`` in [-149, 127] (subnormal powers included)."""
    e = e.to(torch.int32)
    normal = (e + _BIAS).clamp(min=1) << _MANTISSA_BITS
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= 1 - _BIAS, normal, subnormal).view(torch.float32)
