"""Property-based invariants of the quantisation pipeline (hypothesis), over random
shapes (1..300 per axis), magnitudes 1e-30..1e30, fp32 and bf16 inputs and every spec
of every recipe:

* finite in, finite out: the scale is finite and > 0, the dequantised values finite;
* the error of each element is within the format's bound relative to its group's amax;
* re-quantising the dequantised values with the same scale gives the same payload.

Examples are kept small (seeded random tensors, modest ``max_examples``) so the file
runs in seconds.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp8train import Granularity, Recipe, ScaleSpec, quantize
from fp8train.recipes import RECIPE_NAMES
from fp8train.scaling import compute_amax, expand_scale

# Every distinct operand spec of every recipe, in a stable order.
SPECS: list[ScaleSpec] = sorted(
    {
        spec
        for name in RECIPE_NAMES
        for spec in (
            Recipe.from_name(name).input,
            Recipe.from_name(name).weight,
            Recipe.from_name(name).grad_output,
        )
    },
    key=repr,
)

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow],
)


def _error_bound(spec: ScaleSpec) -> float:
    """Largest error of one element, as a fraction of its group's amax.

    INT8: a step is amax / 127 at most (half of it for a non-power-of-two scale, one
    whole step's worth kept for power-of-two scales rounding down). Floats, nearest
    rounding: the group's amax lands in the format's top binade or below it, where half
    a step is at most 2^-(m+1) of the value; stochastic rounding may move a whole step.
    MX "floor" (the OCP rule) may put the amax up to 2^(emax+1) and saturate it to
    fmt.max: 1 - fmt.max / 2^(emax+1) (1/8 for E4M3 and E5M2).
    """
    fmt = spec.fmt
    if fmt.torch_dtype is torch.int8:
        return 1 / fmt.max
    bound = 2.0 ** -(fmt.mantissa_bits + (0 if spec.rounding == "stochastic" else 1))
    if spec.granularity is Granularity.MX and spec.mx_rounding == "floor":
        emax = math.floor(math.log2(fmt.max))
        bound = max(bound, 1 - fmt.max / 2.0 ** (emax + 1))
    return bound


@st.composite
def _inputs(draw: st.DrawFn) -> tuple[torch.Tensor, ScaleSpec]:
    rows = draw(st.integers(1, 300))
    cols = draw(st.integers(1, 300))
    exponent = draw(st.integers(-30, 30))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    spec = draw(st.sampled_from(SPECS))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 10.0**exponent
    return x.to(dtype), spec


@PROPERTY_SETTINGS
@given(_inputs())
def test_finite_in_finite_out_within_the_format_bound(case: tuple[torch.Tensor, ScaleSpec]) -> None:
    x, spec = case
    q = quantize(x, spec)
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all()), spec.describe()
    deq = q.dequantize(torch.float32)
    assert bool(torch.isfinite(deq).all()), spec.describe()
    ref = x.float()
    group_amax = expand_scale(compute_amax(ref, spec), (ref.shape[0], ref.shape[1]), spec)
    # Slack: the two fp32 roundings around the cast (x * scale, payload * (1 / scale)).
    allowed = group_amax * (_error_bound(spec) + 2.0**-20)
    err = (deq - ref).abs()
    worst = (err - allowed).max().item()
    assert worst <= 0, (
        f"{spec.describe()} {x.dtype} shape {tuple(x.shape)}: max error "
        f"{err.max().item():.3g} over bound by {worst:.3g}"
    )


@PROPERTY_SETTINGS
@given(_inputs())
def test_dequantised_values_are_on_the_grid(case: tuple[torch.Tensor, ScaleSpec]) -> None:
    """quantize(dequantize(q)) with q's scale gives q's payload back bit for bit."""
    x, spec = case
    q = quantize(x, spec)
    again = quantize(q.dequantize(torch.float32), replace(spec, rounding="nearest"), scale=q.scale)
    # Compared as bytes: bitwise, and NaN-safe.
    assert torch.equal(again.data.view(torch.uint8), q.data.view(torch.uint8)), (
        f"{spec.describe()} {x.dtype} shape {tuple(x.shape)}"
    )
