"""``Fp8Linear`` and ``convert``: swap ``nn.Linear`` layers of any model for FP8 ones.

The module is thin: it holds the recipe and the layer's state and calls
:func:`fp8train.autograd.fp8_linear`. Conversion reuses the original Parameters, so an
optimizer built before ``convert`` keeps working and ``model.state_dict()`` keeps its
keys and loads into the unconverted model (strictly) and back. Recipe state (amax
histories) lives outside ``state_dict()``, in :func:`recipe_state_dict`, a versioned
entry of its own.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fp8train._kernels import KernelChoice, Kernels, shared_kernels
from fp8train.autograd import LayerState, demoted_recipe, fp8_linear
from fp8train.history import AmaxHistory
from fp8train.recipes import Recipe, RecipeName
from fp8train.scaling import compute_amax

__all__ = [
    "Fp8Linear",
    "convert",
    "fp8_layers",
    "load_recipe_state_dict",
    "migrate_recipe_state",
    "recipe_state_dict",
]

log = logging.getLogger("fp8train")

Filter = Callable[[nn.Linear, str], bool]

# 2: each layer also records its recipe's full description and (in, out) features.
_STATE_VERSION = 2


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run under an FP8 recipe.

    Same parameters, same ``state_dict`` keys as ``nn.Linear``; ``fp8_state`` holds the
    delayed-scaling histories and non-finite counters. ``kernels``: as for :func:`convert`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: Recipe | str,
        name: str = "",
        kernels: KernelChoice = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = Recipe.from_name(recipe)
        self.fp8_state = LayerState(name or "linear", self.recipe, Kernels(kernels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            out: torch.Tensor = _forward_in_compiled_model(self, x)
            return out
        return fp8_linear(x, self.weight, self.bias, self.fp8_state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: Recipe, name: str, kernels: KernelChoice = "auto"
    ) -> Fp8Linear:
        """Wrap ``linear``'s own Parameters (built on meta: no second weight allocation)."""
        with torch.device("meta"):
            new = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                recipe=recipe,
                name=name,
                kernels=kernels,
            )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new


# Under torch.compile(model) each Fp8Linear is one graph break, and the layer runs
# outside the graph with the compiled kernels (why: fp8train/autograd.py). The module
# itself crosses the break, not its weight and bias: dynamo then compiles one frame for
# every layer, where passing the parameters made it guard their shapes and recompile
# per layer shape; past its recompile limit (8) the remaining layers ran uncompiled,
# with the eager kernels (a 13-layer stack of distinct widths: 8 of 13 compiled).
def _forward_with_compiled_kernels(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, layer.weight, layer.bias, layer.fp8_state, shared_kernels("compiled"))


_forward_in_compiled_model: Callable[..., torch.Tensor] = torch.compiler.disable(  # type: ignore[no-untyped-call]
    _forward_with_compiled_kernels
)


def fp8_layers(model: nn.Module) -> Iterable[tuple[str, Fp8Linear]]:
    """``(qualified name, layer)`` for every converted layer, in registration order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear))


def convert(
    model: nn.Module,
    recipe: Recipe | RecipeName | str,
    *,
    filter: Filter | None = None,
    skip: str | Iterable[str] = (),
    skip_first_last: bool = False,
    min_features: int = 0,
    kernels: KernelChoice = "auto",
) -> nn.Module:
    """Swap ``nn.Linear`` layers of ``model`` for :class:`Fp8Linear` in place; return it.

    A layer is converted when every condition holds: ``filter(module, qualified_name)``
    is true (if given); its name matches none of the ``skip`` fnmatch patterns (e.g.
    ``"lm_head"``, ``"*.attn.*"``); it is not the first or last Linear when
    ``skip_first_last``; both its features are >= ``min_features`` (small layers gain
    nothing from FP8); and the recipe can take its shape (else one log line says why).

    ``kernels``: ``"eager"`` runs the quantisation with plain PyTorch ops; ``"compiled"``
    runs the same functions compiled by inductor (fused into one pass per operand,
    several times faster on the CPU, a few seconds of compilation per new shape on first
    use); ``"auto"`` (the default) picks ``"compiled"`` where this torch and the
    device can compile (CPU: inductor finds a C++ compiler; CUDA: triton), else
    ``"eager"``, on first use per device type, and logs its choice and why once (logger
    ``"fp8train"``: INFO for compiled, a warning for the eager fall-back). All give
    bitwise-identical results, except the bias gradient: an fp32 column sum, added in
    another order. FP4 recipes run the eager kernels whatever is asked (one INFO line
    says so).

    ``recipe.high_precision_last`` (N > 0, e.g. nvfp4's 4): of the layers every other
    condition above lets through, the last N in module order stay ``nn.Linear`` (one
    INFO line names them).
    """
    Kernels(kernels)  # validate before touching the model
    recipe = Recipe.from_name(recipe)
    if filter is not None and not callable(filter):
        raise TypeError(
            f"filter must be a callable (module, qualified_name) -> bool, got "
            f"{type(filter).__name__} {filter!r}; to skip layers by name pattern, pass "
            "skip=... instead"
        )
    patterns = [skip] if isinstance(skip, str) else list(skip) if isinstance(skip, Iterable) else []
    if not isinstance(skip, (str, Iterable)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"skip must be an fnmatch pattern or an iterable of them, got {skip!r}; "
            "e.g. skip='lm_head' or skip=['*.attn.*'], or skip=() to skip nothing"
        )
    others = sorted({m.recipe.name for _, m in fp8_layers(model) if m.recipe != recipe})
    if others:
        raise ValueError(
            f"model is already converted to recipe {', '.join(map(repr, others))}; "
            f"convert does not re-convert layers to {recipe.name!r}: convert a fresh "
            "(unconverted) copy of the model with the recipe you want"
        )
    if isinstance(model, nn.Linear) and not isinstance(model, Fp8Linear):
        raise TypeError(
            "convert swaps Linear layers inside a model; wrap a bare nn.Linear "
            "in a container (e.g. nn.Sequential) or use Fp8Linear.from_linear"
        )
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, Fp8Linear)
    ]
    edge = {linears[0][0], linears[-1][0]} if linears and skip_first_last else set()
    eligible: list[tuple[str, nn.Linear]] = []
    for name, module in linears:
        if filter is not None and not filter(module, name):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) or name in edge:
            continue
        if min(module.in_features, module.out_features) < min_features:
            continue
        reason = recipe.unsupported_reason(module.in_features, module.out_features)
        if reason is not None:
            log.warning(
                "fp8train: layer %r stays in high precision: recipe %r needs %s",
                name,
                recipe.name,
                reason,
            )
            continue
        eligible.append((name, module))
    last = recipe.high_precision_last
    if last:
        kept = [name for name, _ in eligible[-last:]]
        eligible = eligible[: max(len(eligible) - last, 0)]
        log.info(
            "fp8train: recipe %r keeps its last %d eligible Linear layers in high precision "
            "(high_precision_last): %s",
            recipe.name,
            last,
            ", ".join(kept) or "none",
        )
    for name, module in eligible:
        _set_submodule(model, name, Fp8Linear.from_linear(module, recipe, name, kernels))
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_LAYER_KEYS = frozenset({"recipe", "recipe_config", "features", "histories", "nonfinite"})
# Present only on a demoted layer: "high_precision" (True) on one demoted to high
# precision (LayerState.high_precision), "demoted_to" (a named recipe's name and
# canonical description) on one demoted to a finer recipe (LayerState.demote); the
# histories are then those of that recipe; "random_steps" for recipes that draw random
# numbers (LayerState.random_steps: stochastic rounding, Hadamard signs).
_OPTIONAL_KEYS = frozenset({"high_precision", "demoted_to", "random_steps"})


def recipe_state_dict(model: nn.Module) -> dict[str, Any]:
    """Versioned recipe state of every converted layer: its recipe (name and
    :meth:`Recipe.canonical` description), ``(in_features, out_features)`` (a per-tensor
    history does not show the width), amax histories and non-finite counters, and
    ``"high_precision": True`` for a layer demoted to high precision
    (``LayerState.high_precision``, e.g. by :class:`fp8train.Guard`), ``"demoted_to"``
    (``{"recipe", "recipe_config"}``) for one demoted to a finer recipe
    (``LayerState.demote``), whose histories it then holds."""
    layers = {
        name: {
            "recipe": m.recipe.name,
            "recipe_config": m.recipe.canonical(),
            "features": (m.in_features, m.out_features),
            **m.fp8_state.state_dict(),
        }
        for name, m in fp8_layers(model)
    }
    return {"version": _STATE_VERSION, "layers": layers}


def load_recipe_state_dict(
    model: nn.Module, state: dict[str, Any], *, migrate: bool = False
) -> None:
    """Restore :func:`recipe_state_dict` output exactly.

    All of ``state`` is checked before any layer changes (so a bad state leaves the model
    as it was): the version, the set of FP8 layers, each layer's recipe (every field, not
    just the name), its ``(in_features, out_features)``, each amax history
    (:meth:`AmaxHistory.check_state`: length, algo, count, window dtype, shape and
    finiteness) and the non-finite counters. Raises ``TypeError``/``ValueError`` naming
    the layer and the field.

    ``migrate=True``: the model may run another recipe than the checkpoint (or be
    converted to fewer layers, or not at all): ``state`` first passes through
    :func:`migrate_recipe_state`, which says in one log line what it changed.
    """
    if not isinstance(migrate, bool):
        raise TypeError(f"migrate must be a bool, got {migrate!r}; pass migrate=True or False")
    if migrate:
        state = migrate_recipe_state(state, model)
    _check_recipe_state(model, state)
    for name, layer in fp8_layers(model):
        layer.fp8_state.load_state_dict(state["layers"][name])


def _check_recipe_state(model: nn.Module, state: object) -> None:
    _check_state_header(state)
    assert isinstance(state, dict)  # checked above; narrows the type for mypy
    ours = dict(fp8_layers(model))
    theirs: dict[str, Any] = state["layers"]
    if set(ours) != set(theirs):
        missing, extra = set(ours) - set(theirs), set(theirs) - set(ours)
        raise ValueError(
            f"recipe state does not match the model's FP8 layers: missing "
            f"{sorted(missing)}, unexpected {sorted(map(str, extra))}; convert the model "
            f"with the same recipe and filters as the one that saved it, {_MIGRATE_HINT}"
        )
    for name, layer in ours.items():
        _check_layer_state(name, layer, theirs[name])


_MIGRATE_HINT = (
    "or, to resume under the model's recipe, pass migrate=True to "
    "fp8train.load_recipe_state_dict (see fp8train.migrate_recipe_state)"
)


def _check_state_header(state: object) -> None:
    fix = "pass the dict fp8train.recipe_state_dict(model) returned, unmodified"
    if not isinstance(state, dict):
        raise TypeError(
            f"recipe state: expected the dict fp8train.recipe_state_dict returns, got "
            f"{type(state).__name__}; {fix}"
        )
    if state.get("version") != _STATE_VERSION:
        raise ValueError(
            f"fp8train recipe state version {state.get('version')!r} is not "
            f"supported (expected {_STATE_VERSION}); save it again with "
            "fp8train.recipe_state_dict (version 1 lacked the recipe's full "
            "description and the layer shapes)"
        )
    if set(state) != {"version", "layers"} or not isinstance(state["layers"], dict):
        raise ValueError(
            f"recipe state: expected keys ['layers', 'version'] with 'layers' a dict, got "
            f"keys {sorted(map(str, state))}; {fix}"
        )


# Recipe fields that earlier versions saved in a layer's recipe_config but that never
# changed the numerics (``min_multiple`` only chose which layers convert).
_NOT_NUMERICS = ("min_multiple",)


def _stored_config(config: object) -> object:
    """A checkpoint's recipe_config without the fields that are not numerics."""
    if isinstance(config, dict) and any(k in config for k in _NOT_NUMERICS):
        return {k: v for k, v in config.items() if k not in _NOT_NUMERICS}
    return config


def _check_entry_keys(where: str, entry: object) -> None:
    if not isinstance(entry, dict) or not _LAYER_KEYS <= set(entry) <= _LAYER_KEYS | _OPTIONAL_KEYS:
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(
            f"{where}: expected a dict with keys {sorted(_LAYER_KEYS)}, got {got}; save it "
            "with fp8train.recipe_state_dict"
        )


def _check_layer_state(name: str, layer: Fp8Linear, entry: object) -> None:
    where = f"recipe state of layer {name!r}"
    _check_entry_keys(where, entry)
    assert isinstance(entry, dict)  # checked above; narrows the type for mypy
    recipe = layer.recipe
    if entry["recipe"] != recipe.name:
        raise ValueError(
            f"{where}: checkpoint recipe {entry['recipe']!r} != model recipe "
            f"{recipe.name!r}; convert the model with the checkpoint's recipe, "
            f"{_MIGRATE_HINT}"
        )
    ours = recipe.canonical()
    theirs = _stored_config(entry["recipe_config"])
    if theirs != ours:
        if isinstance(theirs, dict):
            keys = sorted(set(ours) | set(map(str, theirs)))
            diff = "; ".join(
                f"{k}: checkpoint {theirs.get(k, '(absent)')}, model {ours.get(k, '(absent)')}"
                for k in keys
                if theirs.get(k) != ours.get(k)
            )
        else:
            diff = f"expected a dict of recipe fields, got {type(theirs).__name__}"
        raise ValueError(
            f"{where}: 'recipe_config': recipe {recipe.name!r} has other parameters in the "
            f"checkpoint ({diff}); convert the model with the checkpoint's recipe (e.g. "
            f"the same dataclasses.replace variant), {_MIGRATE_HINT}"
        )
    features = (layer.in_features, layer.out_features)
    if not isinstance(entry["features"], (tuple, list)) or tuple(entry["features"]) != features:
        raise ValueError(
            f"{where}: 'features' (in_features, out_features) is {entry['features']!r} in "
            f"the checkpoint, {features} in the model; load it into a model of the same "
            "shape"
        )
    if not isinstance(entry.get("high_precision", False), bool):
        raise ValueError(
            f"{where}: 'high_precision' must be a bool (the layer runs in high precision), "
            f"got {entry['high_precision']!r}"
        )
    steps = entry.get("random_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(
            f"{where}: 'random_steps' must be an int >= 0 (backward passes that drew random "
            f"numbers), got {steps!r}"
        )
    # A layer demoted to a finer recipe keeps that recipe's histories.
    demoted = demoted_recipe(entry.get("demoted_to"), where)
    if demoted == recipe:
        raise ValueError(
            f"{where}: 'demoted_to' names the layer's own recipe {recipe.name!r}; a "
            "layer that was not demoted has no 'demoted_to'"
        )
    if demoted is not None:
        reason = demoted.unsupported_reason(layer.in_features, layer.out_features)
        if reason is not None:
            raise ValueError(f"{where}: 'demoted_to' recipe {demoted.name!r} needs {reason}")
        recipe = demoted
    histories = layer.fp8_state._new_histories(recipe)
    saved = entry["histories"]
    if not isinstance(saved, dict) or set(saved) != set(histories):
        got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"{where}: 'histories' must hold one amax history for each of "
            f"{sorted(histories)} (recipe {recipe.name!r}), got {got}"
        )
    samples = {
        "input": (1, layer.in_features),
        "weight": (layer.out_features, layer.in_features),
        "grad_output": (1, layer.out_features),
    }
    specs = {"input": recipe.input, "weight": recipe.weight, "grad_output": recipe.grad_output}
    for role, history in histories.items():
        # The amax's shape, derived as the pipeline derives it, for an operand of this layer.
        sample = torch.empty(samples[role], device="meta")
        amax_shape = tuple(compute_amax(sample, specs[role]).shape)
        history.check_state(saved[role], amax_shape=amax_shape, where=f"{where}, {role}")
    counters = entry["nonfinite"]
    expected = set(layer.fp8_state.nonfinite)
    if (
        not isinstance(counters, dict)
        or set(counters) != expected
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counters.values()
        )
    ):
        raise ValueError(
            f"{where}: 'nonfinite' must map each of {sorted(expected)} to an int >= 0 "
            f"(a count of non-finite operands), got {counters!r}"
        )


def migrate_recipe_state(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state`` (from :func:`recipe_state_dict`, under any recipe) rewritten for
    ``model``'s FP8 layers and recipes; a new dict (``state`` is not changed) that
    :func:`load_recipe_state_dict` takes. What it does, per layer:

    * the same recipe (every field) in ``state`` and ``model``: kept as is;
    * another recipe: each amax history the model's recipe keeps is seeded from the
      checkpoint's history of the same operand when that one exists and its amaxes have
      the shape the new recipe takes (e.g. delayed with ``history_len`` 16 -> 8: the
      most recent ``min`` of the two lengths), else it starts empty; histories the new
      recipe does not keep are dropped; the non-finite counters are kept;
    * in ``state`` but not an FP8 layer of ``model`` (converted with fewer layers, or a
      bf16 model with none): dropped;
    * an FP8 layer of ``model`` not in ``state``: starts empty.

    Logs one line (logger ``"fp8train"``, INFO) listing, per recipe change, the layers
    and what was seeded, started empty or dropped; nothing if nothing changed. Raises
    ``TypeError``/``ValueError`` (as :func:`load_recipe_state_dict`) for a state that is
    not a :func:`recipe_state_dict` or whose layer has other ``(in_features,
    out_features)`` than the model's (another model, not another recipe).
    """
    _check_state_header(state)
    theirs: dict[str, Any] = state["layers"]
    ours = dict(fp8_layers(model))
    layers: dict[str, Any] = {}
    changes: dict[str, list[str]] = {}  # "old -> new: what happened" -> layer names
    for name, layer in ours.items():
        entry = theirs.get(name)
        if entry is None:
            layers[name] = _fresh_entry(layer, {r: 0 for r in layer.fp8_state.nonfinite})
            changes.setdefault(
                f"not in the checkpoint -> {layer.recipe.name}: started empty", []
            ).append(name)
            continue
        where = f"recipe state of layer {name!r}"
        _check_entry_keys(where, entry)
        features = (layer.in_features, layer.out_features)
        if not isinstance(entry["features"], (tuple, list)) or tuple(entry["features"]) != features:
            raise ValueError(
                f"{where}: 'features' (in_features, out_features) is {entry['features']!r} "
                f"in the checkpoint, {features} in the model; a migration changes the "
                "recipe, not the model: load it into a model of the same shape"
            )
        if _stored_config(entry["recipe_config"]) == layer.recipe.canonical():
            layers[name] = entry
            continue
        if "demoted_to" in entry:
            # The layer runs its demoted recipe, whatever it was converted with: keep
            # that (and its histories), and rebase it on the model's recipe.
            demoted = demoted_recipe(entry["demoted_to"], where)
            new = {k: v for k, v in entry.items() if k != "demoted_to"}
            new["recipe"], new["recipe_config"] = layer.recipe.name, layer.recipe.canonical()
            if demoted != layer.recipe:
                new["demoted_to"] = entry["demoted_to"]
            layers[name] = new
            changes.setdefault(
                f"{_recipe_label(entry, layer.recipe)}: kept its demotion", []
            ).append(name)
            continue
        layers[name], done = _migrated_entry(where, layer, entry)
        change = f"{_recipe_label(entry, layer.recipe)}: {done}"
        changes.setdefault(change, []).append(name)
    dropped = sorted(map(str, set(theirs) - set(ours)))
    parts = [f"{change} ({', '.join(names)})" for change, names in changes.items()]
    if dropped:
        parts.append(f"dropped layers no longer FP8 ({', '.join(dropped)})")
    if parts:
        log.info("fp8train: recipe state migrated: %s", "; ".join(parts))
    return {"version": _STATE_VERSION, "layers": layers}


def _fresh_entry(layer: Fp8Linear, nonfinite: dict[str, int]) -> dict[str, Any]:
    """The recipe state of ``layer`` with empty amax histories and ``nonfinite``."""
    return {
        "recipe": layer.recipe.name,
        "recipe_config": layer.recipe.canonical(),
        "features": (layer.in_features, layer.out_features),
        "histories": {r: h.state_dict() for r, h in _new_histories(layer).items()},
        "nonfinite": dict(nonfinite),
    }


def _new_histories(layer: Fp8Linear) -> dict[str, AmaxHistory]:
    r = layer.recipe
    return {role: AmaxHistory(r.history_len, r.history_algo) for role in layer.fp8_state.histories}


def _migrated_entry(where: str, layer: Fp8Linear, entry: dict[str, Any]) -> tuple[Any, str]:
    """``entry`` rewritten for ``layer``'s recipe, and what was done, in words."""
    saved = entry["histories"]
    if not isinstance(saved, dict):
        raise ValueError(
            f"{where}: 'histories' must be a dict of amax histories by operand, got "
            f"{type(saved).__name__}; save it with fp8train.recipe_state_dict"
        )
    old: dict[str, torch.Tensor] = {}  # role -> recorded amaxes, oldest first
    for role, h in saved.items():
        if not isinstance(h, dict) or not isinstance(h.get("length"), int):
            raise ValueError(
                f"{where}, {role}: expected an amax history's state_dict, got {h!r}; save "
                "it with fp8train.recipe_state_dict"
            )
        history = AmaxHistory(h["length"], h.get("algo", "max"))
        history.check_state(h, where=f"{where}, {role}")  # count, window shape, finiteness
        history.load_state_dict(h)
        if history.window is not None:
            n = len(history)
            order = [(history.count - n + i) % history.length for i in range(n)]
            old[str(role)] = history.window[order]
    histories = _new_histories(layer)
    specs = {
        "input": (layer.recipe.input, (1, layer.in_features)),
        "weight": (layer.recipe.weight, (layer.out_features, layer.in_features)),
        "grad_output": (layer.recipe.grad_output, (1, layer.out_features)),
    }
    seeded: dict[str, int] = {}
    for role, history in histories.items():
        amaxes = old.get(role)
        spec, sample = specs[role]
        # The amax's shape, derived as the pipeline derives it (as _check_layer_state).
        shape = compute_amax(torch.empty(sample, device="meta"), spec).shape
        if amaxes is None or amaxes.shape[1:] != shape:
            continue
        for amax in amaxes[-history.length :]:  # the most recent ones, oldest first
            history.record(amax)
        seeded[role] = len(history)
    nonfinite = entry["nonfinite"] if isinstance(entry["nonfinite"], dict) else {}
    new = _fresh_entry(layer, {r: nonfinite.get(r, 0) for r in layer.fp8_state.nonfinite})
    new["histories"] = {r: h.state_dict() for r, h in histories.items()}
    if entry.get("high_precision") is True:  # a demoted layer stays demoted
        new["high_precision"] = True
    done = []
    if seeded:
        by_count: dict[int, list[str]] = {}
        for role, n in seeded.items():
            by_count.setdefault(n, []).append(role)
        done.append(
            "seeded "
            + ", ".join(f"{', '.join(r)} with the last {n} amaxes" for n, r in by_count.items())
        )
    empty = sorted(set(histories) - set(seeded))
    if empty:
        done.append(f"started {', '.join(empty)} empty")
    gone = sorted(set(old) - set(histories))
    if gone:
        done.append(f"dropped the {', '.join(gone)} histories")
    return new, "; ".join(done) or "no amax histories to keep"


def _recipe_label(entry: dict[str, Any], recipe: Recipe) -> str:
    """``old -> new`` naming the recipes, with the fields that differ when the names
    are equal (a ``dataclasses.replace`` variant)."""
    old_name, new_name = str(entry["recipe"]), recipe.name
    theirs, ours = _stored_config(entry["recipe_config"]), recipe.canonical()
    if old_name != new_name or not isinstance(theirs, dict):
        return f"{old_name} -> {new_name}"
    keys = [k for k in ours if k != "name" and theirs.get(k) != ours[k]]
    old = ", ".join(f"{k}={theirs.get(k)}" for k in keys)
    new = ", ".join(f"{k}={ours[k]}" for k in keys)
    return f"{old_name}({old}) -> {new_name}({new})"
