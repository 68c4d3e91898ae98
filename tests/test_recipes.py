"""Recipes: lookup by name, immutability, validation of conflicting options, the GEMM
summary, and the format/granularity table every recipe promises (recipes.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import fp8train
from fp8train import E4M3, E5M2, INT8, RECIPE_NAMES, Granularity, Recipe, ScaleSpec
from fp8train.recipes import RecipeName

G = Granularity


# ----------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_from_name_string_enum_and_passthrough_agree(name: str) -> None:
    by_string = Recipe.from_name(name)
    assert isinstance(by_string, Recipe)
    assert by_string.name == name
    assert Recipe.from_name(RecipeName(name)) is by_string
    assert Recipe.from_name(by_string) is by_string


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_from_name_is_case_insensitive(name: str) -> None:
    assert Recipe.from_name(name.upper()) is Recipe.from_name(name)
    assert Recipe.from_name(name.title()) is Recipe.from_name(name)


def test_recipe_names_cover_the_enum() -> None:
    assert set(RECIPE_NAMES) == {r.value for r in RecipeName}
    assert len(RECIPE_NAMES) == len(set(RECIPE_NAMES)) == 9


def test_passthrough_keeps_a_custom_variant() -> None:
    custom = dataclasses.replace(Recipe.from_name("delayed"), history_len=4)
    assert Recipe.from_name(custom) is custom


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'fp8_magic'") as info:
        Recipe.from_name("fp8_magic")
    for name in RECIPE_NAMES:
        assert name in str(info.value)


# ------------------------------------------------------------------- frozen and variants


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipes_are_frozen(name: str) -> None:
    recipe = Recipe.from_name(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.history_len = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.input.power_of_two = False


def test_delayed_variant_via_replace_leaves_the_registered_recipe_alone() -> None:
    delayed = Recipe.from_name("delayed")
    variant = dataclasses.replace(delayed, history_len=4, history_algo="most_recent")
    assert (variant.history_len, variant.history_algo) == (4, "most_recent")
    assert (delayed.history_len, delayed.history_algo) == (16, "max")
    assert Recipe.from_name("delayed") is delayed
    # The variant drives the layer state: its histories have the variant's window.
    layer = fp8train.Fp8Linear(32, 16, recipe=variant)
    hist = layer.fp8_state.histories["input"]
    assert (hist.length, hist.algo) == (4, "most_recent")


def test_tensorwise_variant_without_power_of_two_scales() -> None:
    tw = Recipe.from_name("tensorwise")
    no_pow2 = dataclasses.replace(
        tw,
        input=dataclasses.replace(tw.input, power_of_two=False),
        weight=dataclasses.replace(tw.weight, power_of_two=False),
        grad_output=dataclasses.replace(tw.grad_output, power_of_two=False),
    )
    assert not any(s.power_of_two for s in (no_pow2.input, no_pow2.weight, no_pow2.grad_output))
    assert tw.input.power_of_two  # the registered recipe is untouched
    # amax 3.0: power-of-two scale is 2**floor(log2(448/3)) = 128; exact scale is 448/3.
    x = torch.tensor([[3.0, -1.0]])
    assert float(fp8train.quantize(x, tw.input).scale) == 128.0
    assert float(fp8train.quantize(x, no_pow2.input).scale) == pytest.approx(448.0 / 3.0)


# --------------------------------------------------------------------------- validation

_ROW = ScaleSpec(E4M3, G.ROW, power_of_two=True)
_BLOCK_1x128 = ScaleSpec(E4M3, G.BLOCK, block=(1, 128))
_TENSOR = ScaleSpec(E4M3, G.TENSOR)


def _conflicts() -> list[tuple[str, Recipe, dict[str, Any], str]]:
    """(id, base recipe, replace() fields, message regex) of every conflicting option."""
    r = Recipe.from_name
    return [
        ("delayed-row-input", r("delayed"), {"input": _ROW}, "delayed scaling .* tensorwise"),
        (
            "delayed-block-weight",
            r("delayed"),
            {"weight": ScaleSpec(E4M3, G.BLOCK, block=(128, 128))},
            "delayed scaling .* tensorwise",
        ),
        (
            "delayed-mx-grad",
            r("delayed"),
            {"grad_output": ScaleSpec(E4M3, G.MX, block=(1, 32))},
            "delayed scaling .* tensorwise",
        ),
        ("int8-with-e4m3-input", r("int8"), {"input": _TENSOR}, "INT8 and FP8"),
        ("int8-with-e5m2-grad", r("int8"), {"grad_output": ScaleSpec(E5M2)}, "INT8 and FP8"),
        ("fp8-with-int8-weight", r("tensorwise"), {"weight": ScaleSpec(INT8)}, "INT8 and FP8"),
        ("mx-with-tensor-weight", r("mxfp8"), {"weight": _TENSOR}, "MX scaling"),
        (
            "tensor-with-mx-grad",
            r("tensorwise"),
            {"grad_output": ScaleSpec(E4M3, G.MX, block=(1, 32))},
            "MX scaling",
        ),
        ("block-with-tensor-weight", r("blockwise"), {"weight": _TENSOR}, "block scaling"),
        ("block-with-row-grad", r("blockwise"), {"grad_output": _ROW}, "block scaling"),
        (
            "row-input-axis0",
            r("rowwise"),
            {"input": ScaleSpec(E4M3, G.ROW, axis=0)},
            "contraction axis",
        ),
        (
            "row-weight-axis0",
            r("rowwise"),
            {"weight": ScaleSpec(E4M3, G.ROW, axis=0)},
            "contraction axis",
        ),
        (
            "input-tile-128x128",
            r("blockwise"),
            {"input": ScaleSpec(E4M3, G.BLOCK, block=(128, 128))},
            r"input tiles must be 1xB",
        ),
        (
            "input-mx-32x1",
            r("mxfp8"),
            {"input": ScaleSpec(E4M3, G.MX, block=(32, 1))},
            r"input tiles must be 1xB",
        ),
        ("history-len-0", r("delayed"), {"history_len": 0}, "history_len must be >= 1"),
        ("history-algo", r("delayed"), {"history_algo": "mean"}, "history_algo .*'mean'"),
        ("scaling", r("tensorwise"), {"scaling": "static"}, "scaling must be .*'static'"),
        ("min-multiple-0", r("tensorwise"), {"min_multiple": 0}, "min_multiple must be >= 1"),
    ]


@pytest.mark.parametrize(
    ("base", "fields", "match"), [c[1:] for c in _conflicts()], ids=[c[0] for c in _conflicts()]
)
def test_conflicting_options_raise(base: Recipe, fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        dataclasses.replace(base, **fields)
    assert repr(base.name) in str(info.value), "the message names the recipe"


def test_non_spec_operand_raises_type_error() -> None:
    not_a_spec: Any = "e4m3"
    with pytest.raises(TypeError, match="weight must be a ScaleSpec, got str"):
        dataclasses.replace(Recipe.from_name("tensorwise"), weight=not_a_spec)


def test_delayed_with_history_variants_is_valid() -> None:
    delayed = Recipe.from_name("delayed")
    for length in (1, 4, 1024):
        for algo in ("max", "most_recent"):
            assert (
                dataclasses.replace(delayed, history_len=length, history_algo=algo).scaling
                == "delayed"
            )


# ---------------------------------------------------------------------- the recipe table


def _spec(recipe: Recipe, role: str) -> ScaleSpec:
    spec = getattr(recipe, role)
    assert isinstance(spec, ScaleSpec)
    return spec


ROLES = ("input", "weight", "grad_output")


def test_tensorwise_and_delayed() -> None:
    for name, scaling in (("tensorwise", "current"), ("delayed", "delayed")):
        r = Recipe.from_name(name)
        assert r.scaling == scaling
        assert r.input.fmt is E4M3 and r.weight.fmt is E4M3, "E4M3 forward"
        assert r.grad_output.fmt is E5M2, "E5M2 gradients"
        assert all(_spec(r, role).granularity is G.TENSOR for role in ROLES)
        assert all(_spec(r, role).power_of_two for role in ROLES)
        assert r.min_multiple == 1, "every shape: the CUDA route pads"
    delayed = Recipe.from_name("delayed")
    assert (delayed.history_len, delayed.history_algo) == (16, "max")


def test_rowwise() -> None:
    r = Recipe.from_name("rowwise")
    for role in ROLES:
        s = _spec(r, role)
        assert (s.fmt, s.granularity, s.axis, s.power_of_two) == (E4M3, G.ROW, -1, True), role
    assert r.scaling == "current"


def test_blockwise() -> None:
    r = Recipe.from_name("blockwise")
    expected_block = {"input": (1, 128), "weight": (128, 128), "grad_output": (1, 128)}
    for role in ROLES:
        s = _spec(r, role)
        assert (s.fmt, s.granularity, s.block, s.power_of_two) == (
            E4M3,
            G.BLOCK,
            expected_block[role],
            True,
        ), role


def test_mxfp8() -> None:
    r = Recipe.from_name("mxfp8")
    for role in ROLES:
        s = _spec(r, role)
        assert (s.fmt, s.granularity, s.block, s.mx_rounding) == (E4M3, G.MX, (1, 32), "floor"), (
            role
        )
        # E8M0 scales are implied by the granularity: every scale is a power of two.
        assert s.scales_are_power_of_two
    assert r.min_multiple == 1, "every shape: the CUDA route pads K to 32"
    q = fp8train.quantize(torch.randn(4, 64) * 3.7, r.input)
    mantissa, _ = torch.frexp(q.scale)
    assert bool((mantissa == 0.5).all()), "E8M0 scales are pure powers of two"


@pytest.mark.parametrize(("name", "granularity"), [("int8", G.TENSOR), ("int8_rowwise", G.ROW)])
def test_int8_recipes(name: str, granularity: Granularity) -> None:
    r = Recipe.from_name(name)
    for role in ROLES:
        s = _spec(r, role)
        assert (s.fmt, s.granularity) == (INT8, granularity), role


# ------------------------------------------------------------------------------ gemms()


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_gemms_names_each_operands_format(name: str) -> None:
    r = Recipe.from_name(name)
    lines = r.gemms().splitlines()
    assert [ln.split()[0] for ln in lines] == ["output", "grad_input", "grad_weight"]
    out, dgrad, wgrad = lines
    # output: x and W; grad_input: dy and W; grad_weight: dy and x.
    for line, roles in (
        (out, ("input", "weight")),
        (dgrad, ("grad_output", "weight")),
        (wgrad, ("grad_output", "input")),
    ):
        for role in roles:
            assert _spec(r, role).fmt.name in line, (line, role)
        assert line.count(" . ") == 1, line


def test_tensorwise_gemms_spell_out_e4m3_forward_and_e5m2_dy() -> None:
    out, dgrad, wgrad = Recipe.from_name("tensorwise").gemms().splitlines()
    assert "e4m3 tensorwise, pow2 . e4m3 tensorwise, pow2" in out
    assert "e5m2" not in out
    assert dgrad.split(":", 1)[1].strip().startswith("e5m2"), "dy is the E5M2 operand"
    assert wgrad.split(":", 1)[1].strip().startswith("e5m2"), "dy^T is the E5M2 operand"


def test_gemms_show_axis_changes_and_high_precision_variants() -> None:
    rowwise = Recipe.from_name("rowwise")
    out, dgrad, wgrad = rowwise.gemms().splitlines()
    assert "columnwise" not in out
    assert "e4m3 rowwise, pow2 . e4m3 columnwise, pow2" in dgrad, "W is re-scaled along N"
    assert wgrad.count("columnwise") == 2, "dy and x are re-scaled along M"
    assert "MX 32x1 E8M0" in Recipe.from_name("mxfp8").gemms().splitlines()[2]
    hp = dataclasses.replace(rowwise, fp8_dgrad=False, fp8_wgrad=False).gemms().splitlines()
    assert "e4m3" in hp[0]
    assert "high precision" in hp[1] and "e4m3" not in hp[1]
    assert "high precision" in hp[2] and "e4m3" not in hp[2]


# ------------------------------------------------------------------ unsupported_reason


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_shape_is_supported_by_default(name: str) -> None:
    # The emulation takes any shape and the CUDA route pads to its kernels' multiples
    # (tests/numerics/test_cuda_route.py), so no recipe refuses a layer by its shape.
    r = Recipe.from_name(name)
    for shape in ((64, 10), (10, 64), (100, 64), (8, 8), (1, 1), (256, 384)):
        assert r.unsupported_reason(*shape) is None, shape


def test_min_multiple_still_filters_and_is_not_numerics() -> None:
    r = dataclasses.replace(Recipe.from_name("tensorwise"), min_multiple=16)
    assert r.unsupported_reason(256, 384) is None
    for shape in ((100, 64), (64, 100), (24, 32)):
        reason = r.unsupported_reason(*shape)
        assert reason is not None, shape
        assert f"in_features={shape[0]}" in reason and f"out_features={shape[1]}" in reason
        assert "multiples of 16" in reason
    assert "min_multiple" not in r.canonical(), "it chooses layers, it does not change numerics"
    assert r.canonical() == Recipe.from_name("tensorwise").canonical()
