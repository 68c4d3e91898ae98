"""Number formats as data.

A :class:`Format` is described by its bit fields and its special-value policy; every
limit (max, smallest normal and subnormal, epsilon, dynamic range, the full list of
finite values) is *derived* by decoding every code, never written by hand. That keeps
one code path for all formats and makes a wrong table impossible to hide: the
derivation is checked against ``ml_dtypes.finfo`` in the tests.

Special-value policies (``Format.special``):

* ``"ieee"``  -- the all-ones exponent is reserved: mantissa 0 is inf, others NaN (E5M2).
* ``"fn"``    -- finite-only plus NaN: no inf, only the all-ones code per sign is NaN (E4M3).
* ``"fnuz"``  -- no inf, no negative zero: the code 0x80 is the single NaN.
* ``"finite"``-- every code is a number, no inf, no NaN (E2M1, the FP4 element format).
* ``"e8m0"``  -- unsigned power-of-two scale of the OCP MX spec: no sign, no mantissa,
  code 0xFF is NaN, no zero.
* ``"int"``   -- symmetric two's-complement integer grid (INT8, for comparison). The
  code -128 is not used, so the grid is symmetric around zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Special = Literal["ieee", "fn", "fnuz", "finite", "e8m0", "int"]

__all__ = [
    "E2M1",
    "E4M3",
    "E4M3FNUZ",
    "E5M2",
    "E5M2FNUZ",
    "E8M0",
    "FORMATS",
    "INT8",
    "Format",
    "by_name",
]


@dataclass(frozen=True)
class Format:
    """One number format: bit fields, bias and special-value policy.

    ``torch_dtype`` is the torch dtype holding exactly this format's codes, or ``None``
    when torch has none (then casts return float32 holding exact values).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    special: Special
    torch_dtype: torch.dtype | None
    # Derived by __post_init__ from the codes:
    # every finite value, sorted ascending, each once (+0 and -0 merge)
    values: tuple[float, ...] = field(init=False, repr=False, compare=False)
    max: float = field(init=False, repr=False, compare=False)  # largest finite value
    min_subnormal: float = field(init=False, repr=False, compare=False)  # smallest positive

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy or unpickled copy of a known format is that format itself, so identity
        # checks (``fmt is INT8``) survive ``copy.deepcopy`` of a converted model.
        if FORMATS.get(self.name.lower()) is self:
            return (by_name, (self.name,))
        return (Format, tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init))

    # ------------------------------------------------------------------ codes
    @property
    def signed(self) -> bool:
        return self.special != "e8m0"

    @property
    def is_integer(self) -> bool:
        return self.special == "int"

    @property
    def bits(self) -> int:
        if self.is_integer:
            return self.mantissa_bits + 1
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special in ("ieee", "fn", "fnuz", "e8m0")

    @property
    def has_negative_zero(self) -> bool:
        return self.special in ("ieee", "fn", "finite")

    def decode(self, code: int) -> float:
        """Value of one code (an int in ``[0, 2**bits)``), as a Python float."""
        if not 0 <= code < 2**self.bits:
            raise ValueError(f"{self.name}: code {code} is outside [0, {2**self.bits})")
        if self.is_integer:
            return float(code - 2**self.bits if code >= 2 ** (self.bits - 1) else code)
        m_mask = (1 << self.mantissa_bits) - 1
        e_all = (1 << self.exponent_bits) - 1
        mantissa = code & m_mask
        exponent = (code >> self.mantissa_bits) & e_all
        sign = -1.0 if self.signed and code >> (self.bits - 1) else 1.0
        if self.special == "e8m0" and exponent == e_all:
            return math.nan
        if self.special == "ieee" and exponent == e_all:
            return sign * math.inf if mantissa == 0 else math.nan
        if self.special == "fn" and exponent == e_all and mantissa == m_mask:
            return math.nan
        if self.special == "fnuz" and code == 1 << (self.bits - 1):
            return math.nan
        if exponent == 0 and self.special != "e8m0":  # subnormal (E8M0 has no subnormals)
            return sign * math.ldexp(mantissa, 1 - self.bias - self.mantissa_bits)
        return sign * math.ldexp(
            (1 << self.mantissa_bits) + mantissa, exponent - self.bias - self.mantissa_bits
        )

    # ---------------------------------------------------------- derived limits
    def __post_init__(self) -> None:
        # Decoded once, stored as plain attributes: a cached_property takes a lock on
        # first access (Python 3.11), which makes torch.compile break the graph of every
        # kernel that reads fmt.max, splitting one fused kernel into five.
        finite = {self.decode(c) for c in range(2**self.bits)}
        if self.is_integer:  # symmetric grid: -128 is left out so that -q(x) == q(-x)
            finite.discard(-float(2 ** (self.bits - 1)))
        values = tuple(sorted(v for v in finite if math.isfinite(v)))
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "max", values[-1])
        object.__setattr__(self, "min_subnormal", min(v for v in values if v > 0))

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (for INT8: 1, the grid step)."""
        if self.is_integer or self.special == "e8m0":
            return self.min_subnormal
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def epsilon(self) -> float:
        """Distance from 1.0 to the next larger value (for INT8: the step, 1)."""
        if self.is_integer:
            return 1.0
        return math.ldexp(1.0, -self.mantissa_bits) if self.mantissa_bits else 1.0

    @property
    def binades(self) -> float:
        """Dynamic range in binades: log2(max / smallest positive value)."""
        return math.log2(self.max / self.min_subnormal)

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal binade (the subnormal quantum's base)."""
        return 1 - self.bias if self.special != "e8m0" else -self.bias

    def __repr__(self) -> str:
        return f"Format({self.name})"


# Literal limits in these comments are what the derivation gives (checked in tests).
E4M3 = Format("e4m3", 4, 3, 7, "fn", torch.float8_e4m3fn)  # max 0x1.cp8 (448)
E5M2 = Format("e5m2", 5, 2, 15, "ieee", torch.float8_e5m2)  # max 0x1.cp15 (57344)
E8M0 = Format("e8m0", 8, 0, 127, "e8m0", getattr(torch, "float8_e8m0fnu", None))  # 0x1p127
E2M1 = Format("e2m1", 2, 1, 1, "finite", None)  # max 0x1.8p2 (6); torch packs it 2-per-byte
INT8 = Format("int8", 0, 7, 0, "int", torch.int8)  # symmetric grid [-127, 127]
E4M3FNUZ = Format("e4m3fnuz", 4, 3, 8, "fnuz", torch.float8_e4m3fnuz)  # max 0x1.ep7 (240)
E5M2FNUZ = Format("e5m2fnuz", 5, 2, 16, "fnuz", torch.float8_e5m2fnuz)  # max 0x1.cp15 (57344)

FORMATS: dict[str, Format] = {f.name: f for f in (E4M3, E5M2, E8M0, E2M1, INT8, E4M3FNUZ, E5M2FNUZ)}
_ALIASES = {
    "e4m3fn": "e4m3",
    "float8_e4m3fn": "e4m3",
    "float8_e5m2": "e5m2",
    "e8m0fnu": "e8m0",
    "fp4": "e2m1",
    "e2m1fn": "e2m1",
}


def by_name(name: str | Format) -> Format:
    """Look a format up by name (case-insensitive; a few common aliases accepted)."""
    if isinstance(name, Format):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[key]
