"""One scaling pipeline: amax -> scale -> cast.

Scale direction, stated once for the whole library: **multiply to enter FP8, divide to
leave it**: ``payload = cast(x * scale)``, ``x ~= payload / scale``. (``torch._scaled_mm``
takes the inverse, the dequantisation factor; :mod:`fp8train.matmul` converts.)

Granularity is a parameter of :class:`ScaleSpec`, not a separate function. Every
non-tensor granularity works on the 2-D view ``x.reshape(-1, x.shape[-1])``; dimensions
that are not multiples of a block are zero-padded internally for the amax (zeros do
not change a maximum) and the payload keeps the original shape, so no element is
ever dropped.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

from fp8train._bits import exp2i, floor_log2, is_power_of_two
from fp8train.cast import Rounding, cast
from fp8train.formats import E4M3, E8M0, Format, by_name

__all__ = [
    "AMAX_FLOOR",
    "MAX_SCALE",
    "Granularity",
    "NonFiniteAmaxError",
    "ScaleSpec",
    "amax_floor",
    "check_finite_amax",
    "compute_amax",
    "count_floored",
    "expand_scale",
    "multiply_by_scale",
    "scale_from_amax",
    "two_level_scale",
]

# The amax an all-zero tensor or block is treated as, so that its scale stays finite (any
# finite scale reproduces zeros exactly): fmt.max / 2^-40, far from fp32 overflow. Only
# an amax of exactly 0 gets it; a tiny non-zero amax keeps its own value down to
# amax_floor(fmt) (it is not a clamp: a tensor of 1e-30s must not quantise to zeros).
AMAX_FLOOR = 2.0**-40

# The largest scale: 2^126 (~8.5e37), whose reciprocal, the dequantisation factor
# (fp8train.tensor), is 2^-126, fp32's smallest *normal* number. A larger scale would
# have a subnormal reciprocal that loses significand bits, and a scale near fp32's max
# would overflow to inf.
MAX_SCALE = 2.0**126


def amax_floor(fmt: Format) -> float:
    """The smallest amax that gets its own scale: ``fmt.max / MAX_SCALE``
    (``fmt.max * 2^-126``: E4M3 ~5.3e-36, E5M2 ~6.7e-34, INT8 ~1.5e-36).

    Every group whose amax is at least this quantises within the format's relative error
    bound. A non-zero amax below it (fp32 values within a factor ``fmt.max`` of fp32's
    smallest normal) is clamped to it: the group gets ``MAX_SCALE``, so its payload uses
    only the bottom of the format's range and its values lose relative precision, down
    to zero for fp32 subnormals below ``fmt.min_subnormal * 2^-126``.
    :func:`count_floored` counts such groups.
    """
    return fmt.max / MAX_SCALE


def count_floored(amax: torch.Tensor, spec: ScaleSpec) -> int:
    """How many groups of ``amax`` have a non-zero amax below :func:`amax_floor`, and so
    lose relative precision (always 0 for MX, whose limit is E8M0's range)."""
    if spec.granularity is Granularity.MX:
        return 0
    a = amax.float()
    return int(((a > 0) & (a < amax_floor(spec.fmt))).sum())


class Granularity(enum.Enum):
    """How many scales a tensor gets.

    * ``TENSOR`` -- one scale for the whole tensor: cheapest; one outlier shrinks the
      resolution of every element.
    * ``ROW`` -- one scale per row (``axis=-1``) or per column (``axis=0``) of the 2-D
      view; the reduced axis must be a GEMM's contraction axis.
    * ``BLOCK`` -- one scale per ``block`` tile (1x128 for activations, 128x128 for
      weights in the DeepSeek-V3 recipe); outliers only affect their own tile. With
      ``ScaleSpec.scale_fmt`` set, the two-level scaling of NVFP4: block scales stored
      in that format under one fp32 per-tensor scale (:func:`scale_from_amax`).
    * ``MX`` -- OCP Microscaling: 32-element blocks along one axis with E8M0 (pure
      power-of-two) scales chosen from the block's exponent.
    """

    TENSOR = "tensor"
    ROW = "row"
    BLOCK = "block"
    MX = "mx"


class NonFiniteAmaxError(ValueError):
    """An amax was NaN or inf: it must never become a scale or enter a history."""


# ScaleSpec fields added after recipe states were first saved (ScaleSpec.__repr__).
_LATER_SPEC_FIELDS = ("scale_fmt",)


@dataclass(frozen=True)
class ScaleSpec:
    """How one operand is quantised.

    ``fmt``: element format. ``granularity``/``axis``/``block``: see :class:`Granularity`
    (``axis`` is the axis the amax is reduced over for ``ROW``; ``block`` is (rows, cols)
    of one tile for ``BLOCK`` and ``MX``). ``margin``: scale is divided by ``2**margin``
    to leave headroom. ``power_of_two``: round the scale *down* to a power of two, which
    keeps ``x * scale`` exact in its significand and lets the emulated GEMM run in bf16.
    ``mx_rounding``: ``"floor"`` is the OCP spec rule (shared exponent
    ``floor(log2 amax) - emax``; the block maximum may saturate), ``"rceil"`` rounds the
    scale so nothing saturates. ``saturate``/``rounding``: passed to :func:`fp8train.cast`.
    ``scale_fmt``: ``None`` (each block's scale is an fp32 number) or E4M3 for BLOCK
    granularity: two-level scaling as in NVFP4, each block's decode scale rounded to
    E4M3 under one fp32 per-tensor scale that brings them into E4M3's range (the rule is
    :func:`scale_from_amax`'s).
    """

    fmt: Format = E4M3
    granularity: Granularity = Granularity.TENSOR
    axis: int = -1
    block: tuple[int, int] = (1, 128)
    margin: int = 0
    power_of_two: bool = False
    mx_rounding: Literal["floor", "rceil"] = "floor"
    saturate: bool = True
    rounding: Rounding = "nearest"
    scale_fmt: Format | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", by_name(self.fmt))
        if self.scale_fmt is not None:
            object.__setattr__(self, "scale_fmt", by_name(self.scale_fmt))
        if isinstance(self.granularity, str):
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.fmt is E8M0:
            raise ValueError("E8M0 is a scale format, not an element format; pick e.g. e4m3")
        if self.axis not in (0, -1, 1):
            raise ValueError(f"axis must be 0 or -1 (the 2-D view's axes), got {self.axis}")
        if self.axis == 1:
            object.__setattr__(self, "axis", -1)
        block = self.block
        if (
            not isinstance(block, (tuple, list))
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
        ):
            raise TypeError(
                f"block must be a (rows, cols) pair of ints, got {block!r}; e.g. block=(1, 128) "
                "for 1x128 tiles, (128, 128) for square ones"
            )
        object.__setattr__(self, "block", tuple(block))
        br, bc = self.block
        if br < 1 or bc < 1:
            raise ValueError(f"block sizes must be positive, got {self.block}")
        for flag in ("power_of_two", "saturate"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"{flag} must be a bool, got {getattr(self, flag)!r}; pass True or False"
                )
        if isinstance(self.margin, bool) or not isinstance(self.margin, int):
            raise TypeError(
                f"margin must be an int (a power of two of headroom), got {self.margin!r}"
            )
        if self.granularity is Granularity.MX:
            if 1 not in self.block:
                raise ValueError(f"MX blocks are one-dimensional (1xB or Bx1), got {self.block}")
            if self.margin:
                raise ValueError("MX scales come from the block exponent; margin is not used")
        if self.mx_rounding not in ("floor", "rceil"):
            raise ValueError(f"mx_rounding must be 'floor' or 'rceil', got {self.mx_rounding!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.scale_fmt is not None:
            if self.scale_fmt is not E4M3:
                raise ValueError(
                    f"scale_fmt must be None (fp32 scales) or e4m3 (NVFP4's two-level block "
                    f"scales), got {self.scale_fmt.name}"
                )
            if self.granularity is not Granularity.BLOCK:
                raise ValueError(
                    f"scale_fmt=e4m3 stores per-block scales: use granularity='block' (e.g. "
                    f"block=(1, 16)), got {self.granularity.value}"
                )
            if self.power_of_two or self.margin:
                raise ValueError(
                    "two-level (scale_fmt) scales follow NVFP4's rule: power_of_two and "
                    "margin do not apply; leave them at False and 0"
                )

    @property
    def scales_are_power_of_two(self) -> bool:
        return self.power_of_two or self.granularity is Granularity.MX

    @property
    def two_level(self) -> bool:
        """Whether block scales sit under a per-tensor scale (``scale_fmt``, NVFP4)."""
        return self.scale_fmt is not None

    def __repr__(self) -> str:
        # Recipe.canonical() compares saved recipe states by these strings: a field added
        # after states were first saved appears only away from its default (the
        # behaviour before it existed), so those states still load.
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if not (f.name in _LATER_SPEC_FIELDS and getattr(self, f.name) == f.default)
        ]
        return f"ScaleSpec({', '.join(shown)})"

    def transposed(self) -> ScaleSpec:
        """The spec describing the transpose of a tensor quantised with this spec."""
        if torch.compiler.is_compiling():  # dynamo traces through caches; build it
            return _build_transposed(self)
        return _transposed(self)

    def describe(self) -> str:
        g = self.granularity
        if g is Granularity.TENSOR:
            where = "tensorwise"
        elif g is Granularity.ROW:
            where = "rowwise" if self.axis == -1 else "columnwise"
        elif g is Granularity.BLOCK and self.scale_fmt is not None:
            where = f"{self.block[0]}x{self.block[1]} blocks, {self.scale_fmt.name} x fp32 scales"
        elif g is Granularity.BLOCK:
            where = f"{self.block[0]}x{self.block[1]} blocks"
        else:
            where = f"MX {self.block[0]}x{self.block[1]} E8M0"
        pow2 = ", pow2" if self.power_of_two and g is not Granularity.MX else ""
        sr = ", stochastic rounding" if self.rounding == "stochastic" else ""
        return f"{self.fmt.name} {where}{pow2}{sr}"


def _build_transposed(spec: ScaleSpec) -> ScaleSpec:
    return replace(spec, axis=0 if spec.axis == -1 else -1, block=spec.block[::-1])


# Cached: every backward asks for it, and building a validated spec is not free.
_transposed = functools.lru_cache(maxsize=256)(_build_transposed)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def _blocks(spec: ScaleSpec) -> tuple[int, int]:
    return spec.block


def _pad_to_blocks(x2d: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    pad_r, pad_c = (-x2d.shape[0]) % br, (-x2d.shape[1]) % bc
    if pad_r or pad_c:
        x2d = F.pad(x2d, (0, pad_c, 0, pad_r))
    return x2d


def compute_amax(x: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    """``max |x|`` per scaling group, fp32, shaped like the scale grid.

    Shapes: TENSOR ``()``; ROW ``(M, 1)`` for ``axis=-1`` or ``(1, K)`` for ``axis=0``;
    BLOCK and MX ``(ceil(M/br), ceil(K/bc))`` on the 2-D view ``(M, K)``.
    """
    g = spec.granularity
    if g is Granularity.TENSOR:
        return x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    x2d = _as_2d(x)
    if g is Granularity.ROW:
        return x2d.abs().amax(dim=spec.axis, keepdim=True).float()
    br, bc = _blocks(spec)
    xp = _pad_to_blocks(x2d, br, bc)
    # (Mp, Kp) -> (Mp/br, br, Kp/bc, bc): one tile per (i, j)
    tiles = xp.reshape(xp.shape[0] // br, br, xp.shape[1] // bc, bc)
    return tiles.abs().amax(dim=(1, 3)).float()


def check_finite_amax(amax: torch.Tensor, name: str = "tensor") -> None:
    """Raise :class:`NonFiniteAmaxError` naming ``name`` if any amax is NaN or inf."""
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(amax)).sum())
        raise NonFiniteAmaxError(
            f"{name}: {bad} of {amax.numel()} amax values are NaN/inf (scale grid shape "
            f"{tuple(amax.shape)}); the tensor holds non-finite values and no scale was "
            "computed from it"
        )


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2 v) for positive normal fp32 v."""
    return floor_log2(v) + (~is_power_of_two(v)).to(torch.int32)


def scale_from_amax(amax: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    """Multiply-to-enter scale from amax (fp32, same shape as ``amax``).

    ``scale = fmt.max / (a * 2**margin)``, optionally rounded down to a power of two,
    with ``a = amax`` clamped below to :func:`amax_floor` (so ``scale <= MAX_SCALE``),
    and ``a = AMAX_FLOOR`` for an all-zero group (amax exactly 0).
    MX: ``scale = 2**-E`` with the shared exponent
    ``E = floor(log2 amax) - floor(log2 fmt.max)`` (``"floor"``, the OCP rule) or
    ``E = ceil(log2(amax / fmt.max))`` (``"rceil"``), clamped to E8M0's range (no
    AMAX_FLOOR: E8M0's own range is the limit).
    Two-level (``spec.scale_fmt`` E4M3, NVFP4): see :func:`two_level_scale`.
    The caller must have checked that amax is finite.
    """
    fmt = spec.fmt
    if spec.scale_fmt is not None:
        return two_level_scale(amax, spec)
    if spec.granularity is Granularity.MX:
        # No floor: a tiny block's exponent is representable down to E8M0's 2^-127, and
        # floor_log2 maps zero to -127, so an all-zero block gets the E8M0 clamp.
        a = amax.float()
        if spec.mx_rounding == "floor":
            emax_elem = math.floor(math.log2(fmt.max))
            shared_exp = floor_log2(a) - emax_elem
        else:
            shared_exp = _ceil_log2(a / fmt.max)
        lo, hi = math.frexp(E8M0.min_subnormal)[1] - 1, math.frexp(E8M0.max)[1] - 1
        shared_exp = shared_exp.clamp(lo, hi)
        return exp2i(-shared_exp)
    a = amax.float()
    # Zero -> AMAX_FLOOR; tiny -> amax_floor (the scale's reciprocal stays a normal fp32).
    # (A NaN amax stays NaN: clamp propagates it, and `a == 0` is false.)
    a = torch.where(a == 0, max(AMAX_FLOOR, amax_floor(fmt)), a.clamp(min=amax_floor(fmt)))
    # A tensor numerator: one correctly rounded division (a Python-float numerator runs
    # as a reciprocal times max, which rounds twice and can push a pow2 scale up).
    scale = torch.full_like(a, fmt.max) / a
    if spec.margin:
        scale = scale / 2.0**spec.margin
    if spec.power_of_two:
        # Round down, so amax * scale never exceeds max; computed on the exponent, so
        # a scale near fp32's top cannot become inf.
        scale = exp2i(floor_log2(scale))
    return scale


def two_level_scale(amax: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    """NVFP4's scales (``spec.scale_fmt`` E4M3) from a block amax grid: the fp32 encode
    scale of each block, shaped like ``amax``.

    The rule of NVIDIA's NVFP4 pretraining recipe (arXiv 2509.25149, "Pretraining Large
    Language Models with NVFP4", its appendix on NVFP4 quantisation; Transformer
    Engine's ``NVFP4BlockScaling``), each step one fp32 operation (one rounding):

    * tensor amax ``A = max over blocks of amax_b`` (the tensor's largest ``|x|``);
    * global encode scale ``s_enc = (E4M3.max * fmt.max) / A`` (448 * 6 / A), 1 when
      ``A`` is 0, which maps the largest block's decode scale onto E4M3's max;
      global decode scale ``s_dec = 1 / s_enc``;
    * block decode scale ``d_b = amax_b / fmt.max``, stored as
      ``q_b = e4m3(d_b * s_enc)`` (round to nearest even, saturating);
    * block encode scale ``s_b = 1 / (q_b * s_dec)``, returned: elements enter E2M1
      as ``cast(x * s_b)`` and leave it multiplied by the fp32 reciprocal of ``s_b``
      (the library's one dequantisation formula; it may differ from NVIDIA's
      ``q_b * s_dec`` by an fp32 rounding).

    One corner departs from the hardware rule: where ``q_b`` rounds to zero (an all-zero
    block, or one with ``amax_b`` below about ``A * 2^-10 / 448``) it is raised to E4M3's
    smallest subnormal 2^-9, so the scale stays finite and the block keeps what E2M1 can
    hold of it instead of becoming zeros. The result is clamped to :data:`MAX_SCALE`.
    Not a power of two in general, so the emulated GEMM runs in fp32.
    """
    assert spec.scale_fmt is not None
    sfmt = spec.scale_fmt
    a = amax.float()
    big = a.amax()
    # A tensor numerator: one correctly rounded division (see scale_from_amax).
    s_enc = torch.where(
        big > 0, torch.full_like(big, sfmt.max * spec.fmt.max) / big, torch.ones_like(big)
    )
    s_enc = s_enc.clamp(max=torch.finfo(torch.float32).max)
    s_dec = torch.ones_like(s_enc) / s_enc
    d_b = a / spec.fmt.max
    q_b = cast(d_b * s_enc, sfmt, saturate=True).float()
    q_b = q_b.clamp(min=sfmt.min_subnormal)
    s_b = torch.ones_like(q_b) / (q_b * s_dec)
    return s_b.clamp(max=MAX_SCALE)


def expand_scale(scale: torch.Tensor, shape2d: tuple[int, int], spec: ScaleSpec) -> torch.Tensor:
    """Broadcast a scale grid to the 2-D view's element shape ``(M, K)``."""
    if spec.granularity in (Granularity.TENSOR, Granularity.ROW):
        return scale
    br, bc = _blocks(spec)
    m, k = shape2d
    full = scale.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[:m, :k]


def multiply_by_scale(x2d: torch.Tensor, grid: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    """``x2d.float() * expand_scale(grid, x2d.shape, spec)``: the same products, with each
    element's scale gathered from the grid by its tile index, so that no padded or tiled
    view is built. The fused kernels use this form because inductor miscompiled both
    others on the CPU: the expanded form with dynamic shapes applied block 0's scale to
    every block of a weight, and the tiled (padded, 4-D) and expanded forms with static
    shapes scaled the last, partial 1xB tile of each row wrongly when B does not divide
    the row (tests/test_kernels.py keeps both cases)."""
    x32 = x2d.float()
    if spec.granularity in (Granularity.TENSOR, Granularity.ROW):
        return x32 * grid
    br, bc = _blocks(spec)
    m, k = x32.shape
    rows = torch.arange(m, device=x32.device) // br  # (M,) tile row of each element row
    cols = torch.arange(k, device=x32.device) // bc  # (K,) tile column of each column
    return x32 * grid[rows[:, None], cols[None, :]]


def apply_scale_and_cast(
    x: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``cast(x * scale)`` with the product taken in fp32; returns the payload in x's shape.

    We upcast before scaling so that eager and compiled code round identically and a
    bf16 input is not scaled in bf16 (which would round twice).
    """
    x2d = _as_2d(x).float()
    scaled = x2d * expand_scale(scale, (x2d.shape[0], x2d.shape[1]), spec)
    payload = cast(
        scaled, spec.fmt, saturate=spec.saturate, rounding=spec.rounding, generator=generator
    )
    return payload.reshape(x.shape)
