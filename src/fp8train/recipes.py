"""Training recipes: named, frozen, validated descriptions of the three GEMMs.

A linear layer ``y = x W^T + b`` with ``x (M, K)``, ``W (N, K)``, ``dy (M, N)`` runs::

    output      y  = x  . W^T    (contracts K)
    grad_input  dx = dy . W      (contracts N)
    grad_weight dW = dy^T . x    (contracts M, the tokens)

A recipe gives one :class:`~fp8train.scaling.ScaleSpec` per operand *as the forward
(or grad_input) GEMM sees it*, reduced along that GEMM's contraction axis. When the
other GEMM contracts the other axis of the same tensor, the operand is quantised with
``spec.transposed()`` (row scales become column scales, 1x128 tiles become 128x1). A
quantisation is reused as is when transposition does not change it: tensorwise scales
and square blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Literal

from fp8train.accumulator import Accumulation, check_accumulation
from fp8train.formats import E2M1, E4M3, E5M2, INT8
from fp8train.scaling import Granularity, ScaleSpec

__all__ = ["RECIPE_NAMES", "Recipe", "RecipeName"]

G = Granularity


class RecipeName(str, enum.Enum):
    TENSORWISE = "tensorwise"
    DELAYED = "delayed"
    ROWWISE = "rowwise"
    BLOCKWISE = "blockwise"
    MXFP8 = "mxfp8"
    INT8 = "int8"
    INT8_ROWWISE = "int8_rowwise"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


RECIPE_NAMES: tuple[str, ...] = tuple(r.value for r in RecipeName)


@dataclass(frozen=True)
class Recipe:
    """One FP8 (or INT8) training recipe. Build variants with ``dataclasses.replace``.

    ``input``/``weight``: operands of the forward GEMM; ``grad_output``: ``dy`` as the
    grad_input GEMM sees it. ``scaling``: ``"current"`` derives each scale from the
    tensor being cast; ``"delayed"`` from an amax history of ``history_len`` steps
    reduced with ``history_algo`` (tensorwise specs only, as in Transformer Engine).
    ``fp8_fprop``/``fp8_dgrad``/``fp8_wgrad``: run that GEMM (output, grad_input,
    grad_weight) in FP8, else in the compute dtype on unquantised operands (ablations:
    which GEMM costs the loss). ``save_fp8_activations``: keep the layer input for
    backward as its FP8 payload (1 byte/element) instead of in high precision (the
    tensor ``quantize_from`` names; the compute dtype when the grad_weight GEMM runs in
    high precision).
    ``quantize_from``: what the input is quantised from when it arrives in another dtype
    than the compute dtype (fp32 LayerNorm outputs under bf16 autocast):

    * ``"input"``: x as it arrives, in its own dtype (one rounding, to FP8);
    * ``"compute_dtype"``: x first rounded to the compute dtype (two roundings, as a
      layer whose input was already bf16 would see it).

    ``accumulation``: what the FP8 GEMMs' sums keep: ``"fp32"`` (exact, the default) or
    a :class:`~fp8train.accumulator.TensorCoreAccumulator` (the model of an FP8 tensor
    core's narrower accumulator, emulated; FP8 recipes only). GEMMs the recipe runs in
    high precision are not affected.
    ``min_multiple``: in/out features must be multiples of this or ``convert`` leaves
    the layer in high precision. 1 (every shape) by default: the emulation takes any
    shape, and the CUDA route pads operands to the multiples its kernels need (16, or
    the block size along K). Not part of the numerics (``canonical`` leaves it out).

    FP4 options (the NVFP4 recipe of arXiv 2509.25149; each switchable for ablations):

    * ``hadamard_wgrad``: both operands of the grad_weight GEMM (``dy`` and ``x``) are
      multiplied along the tokens, the axis that GEMM contracts, by the same 16x16
      random Hadamard transform ``H diag(s) / 4`` (``s`` a random sign vector drawn
      from the layer's own seeded stream, :class:`fp8train.autograd.LayerState`)
      before they are quantised. The transform is orthogonal, so ``dy^T x`` is unchanged
      in exact arithmetic, while outliers spread over 16 tokens before the cast.
    * gradient rounding: ``grad_output``'s ``ScaleSpec.rounding`` (``"stochastic"`` in
      nvfp4), its random stream seeded from the layer's state, so a resumed run repeats
      it bit for bit.
    * ``high_precision_last``: the last N Linear layers that ``convert`` would convert
      (in module order, after its filters) are left in high precision.
    """

    name: str
    input: ScaleSpec
    weight: ScaleSpec
    grad_output: ScaleSpec
    scaling: Literal["current", "delayed"] = "current"
    history_len: int = 16
    history_algo: Literal["max", "most_recent"] = "max"
    fp8_dgrad: bool = True
    fp8_wgrad: bool = True
    save_fp8_activations: bool = True
    fp8_fprop: bool = True
    quantize_from: Literal["input", "compute_dtype"] = "input"
    accumulation: Accumulation = "fp32"
    hadamard_wgrad: bool = False
    high_precision_last: int = 0
    min_multiple: int = field(default=1, compare=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        specs = {"input": self.input, "weight": self.weight, "grad_output": self.grad_output}
        for role, spec in specs.items():
            if not isinstance(spec, ScaleSpec):
                raise TypeError(
                    f"recipe {self.name!r}: {role} must be a ScaleSpec, got {type(spec).__name__}"
                )
            if spec.granularity is G.ROW and spec.axis != -1:
                raise ValueError(
                    f"recipe {self.name!r}: {role} row scales must reduce the "
                    "contraction axis (axis=-1); the backward derives the other axis"
                )
            if spec.granularity in (G.BLOCK, G.MX) and spec.block[0] > 1 and role == "input":
                raise ValueError(
                    f"recipe {self.name!r}: input tiles must be 1xB (tokens are "
                    f"independent rows), got {spec.block}"
                )
        for option, choices in _CHOICES.items():
            if getattr(self, option) not in choices:
                raise ValueError(
                    f"recipe {self.name!r}: {option} must be "
                    f"{' or '.join(map(repr, choices))}, got {getattr(self, option)!r}"
                )
        if self.scaling == "delayed":
            for role, spec in specs.items():
                if spec.granularity is not G.TENSOR:
                    raise ValueError(
                        f"recipe {self.name!r}: delayed scaling keeps one amax per tensor, so "
                        f"{role} must be tensorwise, not {spec.granularity.value}"
                    )
        if self.history_len < 1:
            raise ValueError(f"recipe {self.name!r}: history_len must be >= 1")
        int8 = [s.fmt is INT8 for s in specs.values()]
        if any(int8) and not all(int8):
            raise ValueError(f"recipe {self.name!r}: INT8 and FP8 operands cannot share a GEMM")
        fp4 = [s.fmt is E2M1 for s in specs.values()]
        if any(fp4) and not all(fp4):
            raise ValueError(
                f"recipe {self.name!r}: E2M1 (FP4) operands pair only with E2M1 ones; give "
                "input, weight and grad_output the same element format"
            )
        kinds = {s.granularity for s in specs.values()}
        if G.MX in kinds and kinds != {G.MX}:
            raise ValueError(f"recipe {self.name!r}: MX scaling must be used for every operand")
        if G.BLOCK in kinds and kinds != {G.BLOCK}:
            raise ValueError(f"recipe {self.name!r}: block scaling must be used for every operand")
        check_accumulation(self.accumulation, f"recipe {self.name!r}")
        if self.accumulation != "fp32" and (any(int8) or any(fp4)):
            raise ValueError(
                f"recipe {self.name!r}: the tensor-core accumulator models FP8 GEMMs (INT8 "
                "tensor cores accumulate exactly in int32; no FP4 model is built); use "
                "accumulation='fp32'"
            )
        if not isinstance(self.hadamard_wgrad, bool):
            raise TypeError(
                f"recipe {self.name!r}: hadamard_wgrad must be a bool, got "
                f"{self.hadamard_wgrad!r}; pass True or False"
            )
        if (
            isinstance(self.high_precision_last, bool)
            or not isinstance(self.high_precision_last, int)
            or self.high_precision_last < 0
        ):
            raise ValueError(
                f"recipe {self.name!r}: high_precision_last must be an int >= 0 (how many of "
                f"the last Linear layers stay in high precision), got {self.high_precision_last!r}"
            )
        if self.min_multiple < 1:
            raise ValueError(f"recipe {self.name!r}: min_multiple must be >= 1")
        for flag in ("fp8_fprop", "fp8_dgrad", "fp8_wgrad", "save_fp8_activations"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"recipe {self.name!r}: {flag} must be a bool, got "
                    f"{getattr(self, flag)!r}; pass True or False"
                )
        if not self.fp8_fprop and self.scaling == "delayed":
            raise ValueError(
                f"recipe {self.name!r}: fp8_fprop=False needs current scaling: delayed "
                "histories record the forward's input and weight amaxes, which a "
                "high-precision output GEMM does not take; use scaling='current'"
            )

    @classmethod
    def from_name(cls, name: str | RecipeName | Recipe) -> Recipe:
        """Look a recipe up by name (or pass a Recipe through)."""
        if isinstance(name, Recipe):
            return name
        if not isinstance(name, str):  # RecipeName is a str
            raise TypeError(
                f"a recipe is a Recipe or one of the names {', '.join(RECIPE_NAMES)}, got "
                f"{name!r} ({type(name).__name__}); e.g. fp8train.convert(model, 'tensorwise')"
            )
        try:
            key = RecipeName(name.value if isinstance(name, RecipeName) else name.lower())
        except ValueError:
            raise ValueError(
                f"unknown recipe {name!r}; known recipes: {', '.join(RECIPE_NAMES)}"
            ) from None
        return _RECIPES[key]

    def canonical(self) -> dict[str, str]:
        """Every field that changes the numerics (all but ``description``), name -> repr:
        two recipes behave the same exactly when these are equal. Recipe state is saved
        with it, so a same-named variant (``dataclasses.replace``) is told apart.

        Fields added after recipe states were first saved (``_LATER_FIELDS``) appear
        only when they differ from their default, which is the behaviour of the versions
        before them: a state saved before a field existed still matches the recipe it
        was saved with, and one saved under a non-default value is still told apart."""
        return {
            f.name: repr(getattr(self, f.name))
            for f in fields(self)
            if f.compare and not (f.name in _LATER_FIELDS and getattr(self, f.name) == f.default)
        }

    def unsupported_reason(self, in_features: int, out_features: int) -> str | None:
        """Why a Linear of this shape cannot run this recipe, or None if it can."""
        m = self.min_multiple
        if in_features % m or out_features % m:
            return (
                f"in_features={in_features}, out_features={out_features} are not both "
                f"multiples of {m}"
            )
        return None

    def gemms(self) -> str:
        """The three GEMMs with each operand's format and granularity, one per line."""
        x, w, dy = self.input, self.weight, self.grad_output
        hp = "compute dtype (high precision)"
        fprop = f"{x.describe()} . {w.describe()}^T" if self.fp8_fprop else hp
        dgrad = f"{dy.describe()} . {w.transposed().describe()}" if self.fp8_dgrad else hp
        wgrad = (
            f"{dy.transposed().describe()}^T . {x.transposed().describe()}"
            if self.fp8_wgrad
            else hp
        )
        if self.fp8_wgrad and self.hadamard_wgrad:
            wgrad += " (both after a 16x16 random Hadamard transform along the tokens)"
        # (high_precision_last is not a GEMM's: the recipe's description says it.)
        return (
            f"output      = x.W^T : {fprop}\n"
            f"grad_input  = dy.W  : {dgrad}\n"
            f"grad_weight = dy^T.x: {wgrad}"
        )


# The options that take one of a few strings, and those strings.
_CHOICES: dict[str, tuple[str, ...]] = {
    "scaling": ("current", "delayed"),
    "history_algo": ("max", "most_recent"),
    "quantize_from": ("input", "compute_dtype"),
}

# Numerics fields added after recipe states were first saved, with the default that
# reproduces the earlier behaviour (Recipe.canonical leaves them out at that default).
_LATER_FIELDS = (
    "fp8_fprop",
    "quantize_from",
    "accumulation",
    "hadamard_wgrad",
    "high_precision_last",
)


def _spec(fmt=E4M3, g: Granularity = G.TENSOR, **kw: object) -> ScaleSpec:  # type: ignore[no-untyped-def]
    return ScaleSpec(fmt=fmt, granularity=g, **kw)  # type: ignore[arg-type]


# Power-of-two scales are on for every FP8 recipe: FP8 is floating point, so a scale
# rounded down to a power of two costs at most one of E4M3's ~18 binades of range and no
# precision, while it keeps every dequantised value exact in bf16 (the fast CPU path) and
# makes re-quantisation in backward lossless except in the subnormal range.
_RECIPES: dict[RecipeName, Recipe] = {
    # tensorwise:
    #   output      = x.W^T : e4m3 tensorwise, pow2 . e4m3 tensorwise, pow2^T
    #   grad_input  = dy.W  : e5m2 tensorwise, pow2 . e4m3 tensorwise, pow2
    #   grad_weight = dy^T.x: e5m2 tensorwise, pow2^T . e4m3 tensorwise, pow2
    RecipeName.TENSORWISE: Recipe(
        "tensorwise",
        input=_spec(E4M3, power_of_two=True),
        weight=_spec(E4M3, power_of_two=True),
        grad_output=_spec(E5M2, power_of_two=True),
        description="current per-tensor scaling; E4M3 forward, E5M2 gradients",
    ),
    # delayed:
    #   output      = x.W^T : e4m3 tensorwise, pow2 . e4m3 tensorwise, pow2^T
    #   grad_input  = dy.W  : e5m2 tensorwise, pow2 . e4m3 tensorwise, pow2
    #   grad_weight = dy^T.x: e5m2 tensorwise, pow2^T . e4m3 tensorwise, pow2
    RecipeName.DELAYED: Recipe(
        "delayed",
        input=_spec(E4M3, power_of_two=True),
        weight=_spec(E4M3, power_of_two=True),
        grad_output=_spec(E5M2, power_of_two=True),
        scaling="delayed",
        history_len=16,
        history_algo="max",
        description="per-tensor scales from a 16-step amax history (max); E4M3 fwd, E5M2 grads",
    ),
    # rowwise:
    #   output      = x.W^T : e4m3 rowwise, pow2 . e4m3 rowwise, pow2^T
    #   grad_input  = dy.W  : e4m3 rowwise, pow2 . e4m3 columnwise, pow2
    #   grad_weight = dy^T.x: e4m3 columnwise, pow2^T . e4m3 columnwise, pow2
    RecipeName.ROWWISE: Recipe(
        "rowwise",
        input=_spec(E4M3, G.ROW, power_of_two=True),
        weight=_spec(E4M3, G.ROW, power_of_two=True),
        grad_output=_spec(E4M3, G.ROW, power_of_two=True),
        description="one scale per row of each operand along K; E4M3 everywhere",
    ),
    # blockwise:
    #   output      = x.W^T : e4m3 1x128 blocks, pow2 . e4m3 128x128 blocks, pow2^T
    #   grad_input  = dy.W  : e4m3 1x128 blocks, pow2 . e4m3 128x128 blocks, pow2
    #   grad_weight = dy^T.x: e4m3 128x1 blocks, pow2^T . e4m3 128x1 blocks, pow2
    RecipeName.BLOCKWISE: Recipe(
        "blockwise",
        input=_spec(E4M3, G.BLOCK, block=(1, 128), power_of_two=True),
        weight=_spec(E4M3, G.BLOCK, block=(128, 128), power_of_two=True),
        grad_output=_spec(E4M3, G.BLOCK, block=(1, 128), power_of_two=True),
        description="DeepSeek-V3: 1x128 activation/gradient tiles, 128x128 weight blocks, E4M3",
    ),
    # mxfp8:
    #   output      = x.W^T : e4m3 MX 1x32 E8M0 . e4m3 MX 1x32 E8M0^T
    #   grad_input  = dy.W  : e4m3 MX 1x32 E8M0 . e4m3 MX 32x1 E8M0
    #   grad_weight = dy^T.x: e4m3 MX 32x1 E8M0^T . e4m3 MX 32x1 E8M0
    RecipeName.MXFP8: Recipe(
        "mxfp8",
        input=_spec(E4M3, G.MX, block=(1, 32)),
        weight=_spec(E4M3, G.MX, block=(1, 32)),
        grad_output=_spec(E4M3, G.MX, block=(1, 32)),
        description="OCP MXFP8: 1x32 blocks along K with E8M0 scales (floor rule), E4M3",
    ),
    # int8:
    #   output      = x.W^T : int8 tensorwise . int8 tensorwise^T
    #   grad_input  = dy.W  : int8 tensorwise . int8 tensorwise
    #   grad_weight = dy^T.x: int8 tensorwise^T . int8 tensorwise
    RecipeName.INT8: Recipe(
        "int8",
        input=_spec(INT8),
        weight=_spec(INT8),
        grad_output=_spec(INT8),
        description="symmetric INT8, per-tensor scales, same pipeline (for comparison)",
    ),
    # int8_rowwise:
    #   output      = x.W^T : int8 rowwise . int8 rowwise^T
    #   grad_input  = dy.W  : int8 rowwise . int8 columnwise
    #   grad_weight = dy^T.x: int8 columnwise^T . int8 columnwise
    RecipeName.INT8_ROWWISE: Recipe(
        "int8_rowwise",
        input=_spec(INT8, G.ROW),
        weight=_spec(INT8, G.ROW),
        grad_output=_spec(INT8, G.ROW),
        description="symmetric INT8, per-row scales along K (for comparison)",
    ),
    # mxfp4:
    #   output      = x.W^T : e2m1 MX 1x32 E8M0 . e2m1 MX 1x32 E8M0^T
    #   grad_input  = dy.W  : e2m1 MX 1x32 E8M0 . e2m1 MX 32x1 E8M0
    #   grad_weight = dy^T.x: e2m1 MX 32x1 E8M0^T . e2m1 MX 32x1 E8M0
    # (OCP MX floor rule: shared exponent floor(log2 amax) - 2, E2M1's emax being 2.)
    RecipeName.MXFP4: Recipe(
        "mxfp4",
        input=_spec(E2M1, G.MX, block=(1, 32)),
        weight=_spec(E2M1, G.MX, block=(1, 32)),
        grad_output=_spec(E2M1, G.MX, block=(1, 32)),
        description="OCP MXFP4: E2M1 in 1x32 blocks along K with E8M0 scales (floor rule)",
    ),
    # nvfp4 (arXiv 2509.25149):
    #   output      = x.W^T : e2m1 1x16 blocks, e4m3 x fp32 scales . e2m1 16x16 blocks,
    #                         e4m3 x fp32 scales^T
    #   grad_input  = dy.W  : e2m1 1x16 blocks, e4m3 x fp32 scales, stochastic rounding .
    #                         e2m1 16x16 blocks, e4m3 x fp32 scales (the forward's W reused)
    #   grad_weight = dy^T.x: H(dy) e2m1 16x1 blocks, e4m3 x fp32 scales, stochastic
    #                         rounding^T . H(x) e2m1 16x1 blocks, e4m3 x fp32 scales
    #   (H: 16x16 random Hadamard transform along the tokens); the last 4 converted
    #   Linear layers in high precision.
    RecipeName.NVFP4: Recipe(
        "nvfp4",
        input=_spec(E2M1, G.BLOCK, block=(1, 16), scale_fmt=E4M3),
        weight=_spec(E2M1, G.BLOCK, block=(16, 16), scale_fmt=E4M3),
        grad_output=_spec(E2M1, G.BLOCK, block=(1, 16), scale_fmt=E4M3, rounding="stochastic"),
        hadamard_wgrad=True,
        high_precision_last=4,
        description=(
            "NVIDIA NVFP4: E2M1 in 1x16 blocks (16x16 for W) with E4M3 block scales under an "
            "fp32 tensor scale; random Hadamard on the wgrad inputs, stochastic rounding of "
            "dy, the last 4 layers in high precision"
        ),
    ),
}


def describe_all() -> str:
    """Every recipe with its three GEMMs (used in docs and ``fp8train recipes``)."""
    return "\n\n".join(f"{r.name}: {r.description}\n{r.gemms()}" for r in _RECIPES.values())
