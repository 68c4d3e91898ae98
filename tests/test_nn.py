"""``convert``, ``Fp8Linear`` and the recipe state (nn.py): swapping, filters, Parameter
identity, ``state_dict`` compatibility and an exact resume of delayed scaling."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train import Fp8Linear, Recipe, load_recipe_state_dict, recipe_state_dict
from fp8train.nn import fp8_layers
from fp8train.recipes import RecipeName
from fp8train.testing import assert_bitwise_equal

D_IN, D, D_OUT = 32, 64, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = x + self.proj(self.fc2(F.gelu(self.fc1(x))))
        return y


class Net(nn.Module):
    """Nested Linears: stem, blocks.{0,1}.{fc1,fc2,proj}, head (registration order)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        y: torch.Tensor = self.head(self.norm(h))
        return y


ALL_LINEARS = [
    "stem",
    "blocks.0.fc1",
    "blocks.0.fc2",
    "blocks.0.proj",
    "blocks.1.fc1",
    "blocks.1.fc2",
    "blocks.1.proj",
    "head",
]


def _fp8(model: nn.Module, name: str) -> Fp8Linear:
    layer = model.get_submodule(name)
    assert isinstance(layer, Fp8Linear), f"{name} is {type(layer).__name__}"
    return layer


def _converted(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]


def _plain(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def _x(batch: int = 3, seq: int = 5, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, seq, D_IN) * scale


# ------------------------------------------------------------------------- conversion


def test_convert_swaps_nested_linears_in_place_and_keeps_parameters() -> None:
    model = Net()
    before = dict(model.named_parameters())
    out = fp8train.convert(model, "tensorwise")
    assert out is model
    assert _converted(model) == ALL_LINEARS and _plain(model) == []
    assert isinstance(model.norm, nn.LayerNorm)
    for name in ALL_LINEARS:
        layer = model.get_submodule(name)
        assert type(layer) is Fp8Linear
        assert layer.recipe is Recipe.from_name("tensorwise")
        assert layer.fp8_state.name == name, "the state carries the qualified name"
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, p in before.items():
        assert after[name] is p, f"{name} was replaced"
        assert p.device.type == "cpu" and not p.is_meta


@pytest.mark.parametrize("recipe", ["DELAYED", RecipeName.ROWWISE, Recipe.from_name("int8")])
def test_convert_accepts_name_enum_or_recipe(recipe: Any) -> None:
    model = fp8train.convert(Net(), recipe)
    assert model.stem.recipe is Recipe.from_name(recipe)


def test_optimizer_built_before_conversion_still_updates_the_parameters() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stem_w = model.stem.weight
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp8train.convert(model, "tensorwise")
    model(_x()).pow(2).mean().backward()
    opt.step()
    assert model.stem.weight is stem_w
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert not torch.equal(p.detach(), snapshot[name]), f"{name} did not move"


def test_train_and_eval_mode_is_kept() -> None:
    model = Net()
    model.blocks[1].eval()
    fp8train.convert(model, "tensorwise")
    assert _fp8(model, "blocks.0.fc1").training and not _fp8(model, "blocks.1.fc1").training


def test_converting_a_bare_linear_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"bare nn.Linear"):
        fp8train.convert(nn.Linear(64, 64), "tensorwise")


def test_repr_shows_the_recipe() -> None:
    model = fp8train.convert(Net(), "blockwise", skip=["head"])
    assert repr(model.blocks[0].fc1) == (
        "Fp8Linear(in_features=64, out_features=128, bias=True, recipe=blockwise)"
    )
    text = repr(model)  # (ModuleList folds the two identical blocks into one entry)
    assert "(stem): Fp8Linear(in_features=32, out_features=64, bias=True, recipe=blockwise)" in text
    assert (
        "(proj): Fp8Linear(in_features=64, out_features=64, bias=False, recipe=blockwise)" in text
    )
    assert "(head): Linear(in_features=64, out_features=16, bias=True)" in text


# ---------------------------------------------------------------------------- filters


def test_skip_by_exact_name() -> None:
    model = fp8train.convert(Net(), "tensorwise", skip=["head"])
    assert _plain(model) == ["head"]
    assert _converted(model) == ALL_LINEARS[:-1]


def test_skip_by_pattern_string() -> None:
    model = fp8train.convert(Net(), "tensorwise", skip="*.fc*")
    assert _plain(model) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert _converted(model) == ["stem", "blocks.0.proj", "blocks.1.proj", "head"]


def test_skip_several_patterns() -> None:
    model = fp8train.convert(Net(), "tensorwise", skip=["stem", "blocks.1.*"])
    assert _plain(model) == ["stem", "blocks.1.fc1", "blocks.1.fc2", "blocks.1.proj"]


def test_skip_first_last() -> None:
    model = fp8train.convert(Net(), "tensorwise", skip_first_last=True)
    assert _plain(model) == ["stem", "head"]
    assert _converted(model) == ALL_LINEARS[1:-1]


def test_min_features() -> None:
    # stem is 32 -> 64 and head 64 -> 16: their smaller side is below 64.
    model = fp8train.convert(Net(), "tensorwise", min_features=64)
    assert _plain(model) == ["stem", "head"]
    model = fp8train.convert(Net(), "tensorwise", min_features=128)
    assert _plain(model) == ALL_LINEARS, "every layer has a side below 128"


def test_filter_predicate_receives_module_and_qualified_name() -> None:
    calls: list[tuple[type, str, int]] = []

    def only_second_block(module: nn.Linear, name: str) -> bool:
        calls.append((type(module), name, module.in_features))
        return name.startswith("blocks.1.")

    model = fp8train.convert(Net(), "tensorwise", filter=only_second_block)
    assert [c[1] for c in calls] == ALL_LINEARS
    assert all(c[0] is nn.Linear for c in calls)
    assert calls[0][2] == D_IN
    assert _converted(model) == ["blocks.1.fc1", "blocks.1.fc2", "blocks.1.proj"]


def test_filters_combine() -> None:
    model = fp8train.convert(
        Net(),
        "tensorwise",
        skip="*.proj",
        skip_first_last=True,
        filter=lambda m, n: not n.startswith("blocks.0."),
    )
    assert _converted(model) == ["blocks.1.fc1", "blocks.1.fc2"]


def test_unsupported_shape_stays_high_precision_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ModuleDict({"odd": nn.Linear(100, 64)}))
    # Every shape converts by default; a recipe asking for multiples of 16 leaves it.
    recipe = dataclasses.replace(fp8train.Recipe.from_name("tensorwise"), min_multiple=16)
    with caplog.at_level(logging.DEBUG, logger="fp8train"):
        fp8train.convert(model, recipe)
    assert type(model.get_submodule("1.odd")) is nn.Linear
    assert type(model[0]) is Fp8Linear
    records = [r for r in caplog.records if r.name == "fp8train"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "'1.odd'" in message
    assert "in_features=100" in message and "multiples of 16" in message
    assert records[0].levelno == logging.WARNING


def test_every_shape_converts_by_default(caplog: pytest.LogCaptureFixture) -> None:
    # The digits classifier's head (128 -> 10) and widths that are not multiples of 32
    # run in FP8 under every recipe: the emulation takes any shape, the CUDA route pads.
    for name in fp8train.RECIPE_NAMES:
        model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 100), nn.Linear(100, 10))
        # (nvfp4 keeps its last 4 layers in high precision unless told otherwise)
        recipe = dataclasses.replace(fp8train.Recipe.from_name(name), high_precision_last=0)
        with caplog.at_level(logging.DEBUG, logger="fp8train"):
            fp8train.convert(model, recipe)
        assert _converted(model) == ["0", "1", "2"], name
        assert not [r for r in caplog.records if r.name == "fp8train"], name
        model(torch.randn(3, 64)).sum().backward()


# ---------------------------------------------------------------------------- state_dict


def test_state_dict_keys_identical_and_strict_loads_both_ways() -> None:
    torch.manual_seed(1)
    plain = Net()
    fp8 = fp8train.convert(copy.deepcopy(plain), "tensorwise")
    assert list(fp8.state_dict()) == list(plain.state_dict())
    x = _x()
    y_plain, y_fp8 = plain(x), fp8(x)
    assert not torch.equal(y_plain, y_fp8), "the converted model really runs FP8"

    fresh_plain = Net()  # different init
    fresh_plain.load_state_dict(fp8.state_dict(), strict=True)
    assert_bitwise_equal(fresh_plain(x), y_plain, "converted -> unconverted")

    fresh_fp8 = fp8train.convert(Net(), "tensorwise")
    fresh_fp8.load_state_dict(fresh_plain.state_dict(), strict=True)
    assert_bitwise_equal(fresh_fp8(x), y_fp8, "unconverted -> converted")


def test_recipe_state_is_not_in_state_dict() -> None:
    model = fp8train.convert(Net(), "delayed")
    model(_x())
    assert list(model.state_dict()) == list(Net().state_dict())
    assert set(recipe_state_dict(model)["layers"]) == set(ALL_LINEARS)


# ---------------------------------------------------------------------- recipe state resume

LR = 1e-2


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    # The first three batches are 8x larger, so the amax histories they leave behind
    # set smaller scales than steps 4-5 would pick on their own: resuming without the
    # recipe state gives different losses (checked below, so the test has teeth).
    return [
        (
            torch.randn(4, 6, D_IN, generator=g) * (8.0 if i < 3 else 1.0),
            torch.randn(4, 6, D_OUT, generator=g),
        )
        for i in range(5)
    ]


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _fresh(recipe: Recipe | str = "delayed") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = fp8train.convert(Net(), recipe)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def _roundtrip(obj: Any) -> Any:
    """Through torch.save/torch.load, as a real checkpoint would go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_recipe_state_round_trip_resumes_delayed_scaling_bitwise() -> None:
    torch.manual_seed(3)
    batches = _batches()
    model, opt = _fresh()
    _train(model, opt, batches[:3])
    ckpt = _roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "recipe": recipe_state_dict(model)}
    )
    hist = _fp8(model, "stem").fp8_state.histories["input"]
    assert len(hist) == 3
    losses_a = _train(model, opt, batches[3:])
    params_a = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed, resumed_opt = _fresh()
    resumed.load_state_dict(ckpt["model"], strict=True)
    resumed_opt.load_state_dict(ckpt["opt"])
    load_recipe_state_dict(resumed, ckpt["recipe"])
    assert len(_fp8(resumed, "stem").fp8_state.histories["input"]) == 3
    losses_b = _train(resumed, resumed_opt, batches[3:])
    assert_bitwise_equal(losses_b, losses_a, "losses after resume")
    for name, p in resumed.named_parameters():
        assert_bitwise_equal(p.detach(), params_a[name], name)
    # The recipe states match after the two steps as well.
    state_a, state_b = recipe_state_dict(model), recipe_state_dict(resumed)
    for name in ALL_LINEARS:
        for role, h in state_a["layers"][name]["histories"].items():
            h_b = state_b["layers"][name]["histories"][role]
            assert h["count"] == h_b["count"] == 5
            assert_bitwise_equal(h_b["window"], h["window"], f"{name}.{role}")

    # Teeth: the same resume without the recipe state takes different steps.
    no_state, no_state_opt = _fresh()
    no_state.load_state_dict(ckpt["model"], strict=True)
    no_state_opt.load_state_dict(ckpt["opt"])
    losses_c = _train(no_state, no_state_opt, batches[3:])
    assert not torch.equal(losses_c, losses_a)


def test_recipe_state_dict_is_versioned_and_keyed_by_layer() -> None:
    model, _ = _fresh()
    model(_x())
    state = recipe_state_dict(model)
    assert state["version"] == 2
    entry = state["layers"]["blocks.0.fc1"]
    assert entry["recipe"] == "delayed"
    assert entry["recipe_config"] == Recipe.from_name("delayed").canonical()
    assert state["layers"]["stem"]["features"] == (D_IN, D)
    assert set(entry["histories"]) == {"input", "weight", "grad_output"}


def test_version_mismatch_raises() -> None:
    model, _ = _fresh()
    state = recipe_state_dict(model)
    state["version"] = 99
    with pytest.raises(ValueError, match=r"version 99 .*expected 2.*save it again"):
        load_recipe_state_dict(model, state)


def test_layer_set_mismatch_raises() -> None:
    full, _ = _fresh()
    state = recipe_state_dict(full)
    partial = fp8train.convert(Net(), "delayed", skip=["head"])
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['head'\]"):
        load_recipe_state_dict(partial, state)
    with pytest.raises(ValueError, match=r"missing \['head'\], unexpected \[\]"):
        load_recipe_state_dict(full, recipe_state_dict(partial))


def test_recipe_mismatch_raises() -> None:
    delayed, _ = _fresh()
    tensorwise = fp8train.convert(Net(), "tensorwise")
    with pytest.raises(
        ValueError, match="checkpoint recipe 'delayed' != model recipe 'tensorwise'"
    ):
        load_recipe_state_dict(tensorwise, recipe_state_dict(delayed))


def test_history_config_mismatch_raises() -> None:
    delayed, _ = _fresh()
    delayed(_x())
    short = fp8train.convert(Net(), dataclasses.replace(Recipe.from_name("delayed"), history_len=4))
    with pytest.raises(ValueError, match=r"history_len: checkpoint 16, model 4\); convert"):
        load_recipe_state_dict(short, recipe_state_dict(delayed))


# ------------------------------------------------------------- recipe state is checked first


def _trained(recipe: Recipe | str = "delayed") -> nn.Module:
    model = fp8train.convert(Net(), recipe, kernels="eager")
    model(_x() * 3.0).square().mean().backward()
    return model


def _histories(model: nn.Module) -> dict[str, Any]:
    return {
        f"{n}.{r}": (h.count, None if h.window is None else h.window.clone())
        for n, m in fp8_layers(model)
        for r, h in m.fp8_state.histories.items()
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _histories(model)
    for key, (count, window) in before.items():
        assert after[key][0] == count, key
        assert (window is None) == (after[key][1] is None), key
        assert window is None or torch.equal(after[key][1], window), key


def _edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set one field of a state, addressed as 'layer/field[/role/field]'."""

    def apply(state: dict[str, Any]) -> None:
        layer, *rest = path.split("/")
        node = state["layers"][layer]
        for key in rest[:-1]:
            node = node[key]
        node[rest[-1]] = value

    return apply


# Each case used to load silently (or fail later inside torch, or with KeyError).
BAD_LAYER_STATES = {
    "nan-window": (
        _edit("blocks.1.fc2/histories/input/window", torch.full((16,), math.nan)),
        r"layer 'blocks.1.fc2', input: 'window' holds 16 NaN",
    ),
    "negative-count": (
        _edit("blocks.1.fc2/histories/weight/count", -3),
        r"layer 'blocks.1.fc2', weight: 'count' must be an int >= 0.*got -3",
    ),
    "window-shape": (
        _edit("blocks.1.fc2/histories/grad_output/window", torch.ones(16, 4)),
        r"layer 'blocks.1.fc2', grad_output: 'window' must have shape \(16,\).*got \(16, 4\)",
    ),
    "window-dtype": (
        _edit("blocks.1.fc2/histories/input/window", torch.ones(16, dtype=torch.float16)),
        r"'window' must be an fp32 tensor, got torch.float16",
    ),
    "negative-nonfinite": (
        _edit("blocks.1.fc2/nonfinite", {"input": -1, "weight": 0, "grad_output": 0}),
        r"layer 'blocks.1.fc2': 'nonfinite' must map each of .* to an int >= 0",
    ),
    "missing-role": (
        _edit("blocks.1.fc2/histories", {}),
        r"layer 'blocks.1.fc2': 'histories' must hold one amax history for each of",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LAYER_STATES))
def test_bad_layer_state_raises_before_any_layer_changes(case: str) -> None:
    """The bad field sits in a late layer: the early layers must not have been restored
    (loading used to go layer by layer)."""
    edit, match = BAD_LAYER_STATES[case]
    source = _trained()
    state = recipe_state_dict(source)
    edit(state)
    target = _trained()
    target(_x()).sum().backward()  # other histories than the source's
    before = _histories(target)
    with pytest.raises((ValueError, TypeError), match=match):
        load_recipe_state_dict(target, state)
    _assert_unchanged(target, before)


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        (None, TypeError, r"expected the dict fp8train.recipe_state_dict returns, got NoneType"),
        ([], TypeError, r"got list"),
        ({"version": 2}, ValueError, r"expected keys \['layers', 'version'\].*got keys"),
        ({"version": 1}, ValueError, r"version 1 is not supported \(expected 2\)"),
        ({"version": 2, "layers": None}, ValueError, r"'layers' a dict"),
    ],
)
def test_malformed_top_level_state_raises(state: Any, error: type, match: str) -> None:
    """``None`` used to raise AttributeError and ``{"version": 1}`` KeyError."""
    with pytest.raises(error, match=match):
        load_recipe_state_dict(_trained(), state)


def test_state_of_a_wider_model_with_the_same_names_raises() -> None:
    """Per-tensor histories do not show the width; the recorded features do."""

    def mlp(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 16))

    narrow = fp8train.convert(mlp(32), "delayed", kernels="eager")
    narrow(torch.randn(4, 32))
    wide = fp8train.convert(mlp(64), "delayed", kernels="eager")
    with pytest.raises(
        ValueError, match=r"layer '0': 'features' .* is \(32, 32\) in the checkpoint, \(32, 64\)"
    ):
        load_recipe_state_dict(wide, recipe_state_dict(narrow))


@pytest.mark.parametrize(
    "variant",
    [
        {"history_algo": "most_recent"},
        {"fp8_wgrad": False},
        {"input": dataclasses.replace(Recipe.from_name("delayed").input, margin=2)},
    ],
    ids=["algo", "wgrad", "input-margin"],
)
def test_same_named_recipe_with_other_parameters_raises(variant: dict[str, Any]) -> None:
    """Only the names used to be compared."""
    other = dataclasses.replace(Recipe.from_name("delayed"), **variant)
    assert other.name == "delayed"
    target = fp8train.convert(Net(), other, kernels="eager")
    field_name = next(iter(variant))
    with pytest.raises(ValueError, match=rf"'recipe_config'.*\b{field_name}: checkpoint"):
        load_recipe_state_dict(target, recipe_state_dict(_trained()))


def test_checked_state_still_round_trips_through_torch_save() -> None:
    source = _trained()
    target = fp8train.convert(Net(), "delayed", kernels="eager")
    load_recipe_state_dict(target, _roundtrip(recipe_state_dict(source)))
    _assert_unchanged(target, _histories(source))


def test_convert_defaults_to_the_compiled_kernels_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a ``kernels`` argument, convert (and Fp8Linear) take "auto", which on this
    machine (standalone_compile and a C++ compiler) runs the compiled kernels; the choice
    is made on first use, so a layer built on the meta device resolves nothing."""
    from fp8train._kernels import kernel_set

    on_meta = Fp8Linear(64, 64, recipe="tensorwise", device="meta")
    assert on_meta.fp8_state.kernels.mode == "auto"
    model = fp8train.convert(nn.Sequential(nn.Linear(64, 32)), "tensorwise")
    kernels = model[0].fp8_state.kernels
    assert kernels.mode == "auto" and kernels.resolved("cpu") == "compiled"
    compiled_fns: list[str] = []
    real = kernel_set.compiled
    monkeypatch.setattr(
        kernel_set, "compiled", lambda fn: compiled_fns.append(fn.__name__) or real(fn)
    )
    x = torch.randn(8, 64, requires_grad=True)
    model(x).square().mean().backward()
    assert compiled_fns, "the layer's kernel calls did not go through the compiled kernels"
