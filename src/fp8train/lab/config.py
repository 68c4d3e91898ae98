"""The lab's one configuration object, its presets and its validation.

``LabConfig`` is frozen: the CLI builds it once (preset, then the user's options) and
never patches it; ``dataclasses.asdict(config)`` is saved with every result, so a run
can always be read back together with what produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fp8train.accumulator import TensorCoreAccumulator
from fp8train.formats import E4M3, E5M2
from fp8train.lab.stress import parse_guard, parse_stress
from fp8train.recipes import Recipe

__all__ = [
    "ABLATIONS",
    "ABLATION_SEPARATOR",
    "ACTIVATION_STORAGE_SUFFIX",
    "DIST_MODES",
    "FP4_RECIPES",
    "FP8_OPTIMIZER_SUFFIX",
    "FP8_RECIPES",
    "GRAD_COMMS",
    "GUARD_SUFFIX",
    "KNOWN_PRECISIONS",
    "LAB_RECIPES",
    "PEER_PRECISIONS",
    "PRECISIONS",
    "PRESETS",
    "REFERENCE_PRECISIONS",
    "TASKS",
    "LabConfig",
    "LabError",
    "check_precision",
    "from_dict",
    "guarded",
    "parse_precisions",
    "peer_of",
    "recipe_for",
    "recipe_of",
    "resolve",
    "runs_fp8",
    "stores_fp8_activations",
    "uses_fp8_optimizer",
]

# Precisions that need no FP8 library support: "fp32" runs nothing special, "bf16"
# runs the forward pass under CPU bf16 autocast.
REFERENCE_PRECISIONS = ("fp32", "bf16")
# Recipes handed by name to ``fp8train.convert``; each runs under bf16 autocast with
# every nn.Linear swapped. "int8" is the integer grid, kept for comparison.
FP8_RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise", "mxfp8", "int8")
PRECISIONS = REFERENCE_PRECISIONS + FP8_RECIPES
# FP4 recipes (issue 30), accepted wherever a recipe name is, with their own ablations
# below; not run by default. LAB_RECIPES: every recipe name the lab takes.
FP4_RECIPES = ("mxfp4", "nvfp4")
LAB_RECIPES = FP8_RECIPES + FP4_RECIPES
# "<recipe>+fp8act": the recipe, plus FP8 storage of the other activations saved for
# backward (LayerNorm, GELU and attention inputs; fp8train.Fp8SavedActivations), to
# measure what COAT-style activation compression costs in loss. Not run by default.
ACTIVATION_STORAGE_SUFFIX = "+fp8act"
KNOWN_PRECISIONS = (
    PRECISIONS + FP4_RECIPES + tuple(r + ACTIVATION_STORAGE_SUFFIX for r in LAB_RECIPES)
)
# "<precision>+fp8optim" (last): bf16 or any FP8 precision above, with AdamW's moments
# stored in FP8 (fp8train.Fp8AdamW) instead of fp32, to measure what the saved optimizer
# memory costs in loss (issue 31). Not run by default.
FP8_OPTIMIZER_SUFFIX = "+fp8optim"
# "<precision>+guard" (last of all): fp32, bf16 or an fp8train precision run under
# fp8train.Guard with the policy LabConfig.guard gives (issue 32); the same run
# otherwise. Without FP8 layers the guard can only skip batches (a control: what the
# skips alone do). Not run by default.
GUARD_SUFFIX = "+guard"
# The peer: torchao's float8 training recipes (torchao.float8, emulated on the CPU), run
# on the same model, batches and seeds as ours (fp8train.lab.peer). An optional extra,
# pip install 'fp8train[peer]'; not run by default.
PEER_PRECISIONS = ("torchao-tensorwise", "torchao-rowwise")
# "<recipe>~<ablation>[~<ablation>...][+fp8act]": the recipe with options changed, to
# find which one moves the loss (issue 33). Each ablation must change the recipe (a
# no-op, e.g. "~e5m2-grads" on tensorwise, is refused) and they combine in any order.
ABLATION_SEPARATOR = "~"


def _all_specs(recipe: Recipe, **changes: Any) -> Recipe:
    """The recipe with ``changes`` applied to the ScaleSpec of every operand."""
    roles = ("input", "weight", "grad_output")
    return replace(recipe, **{r: replace(getattr(recipe, r), **changes) for r in roles})


def _grads(fmt: Any) -> Callable[[Recipe], Recipe]:
    return lambda r: replace(r, grad_output=replace(r.grad_output, fmt=fmt))


# name -> (what it changes, how). Every option is a field of fp8train.Recipe or ScaleSpec.
ABLATIONS: dict[str, tuple[str, Callable[[Recipe], Recipe]]] = {
    "nopow2": (
        "scales max/amax as computed, not rounded down to a power of two",
        lambda r: _all_specs(r, power_of_two=False),
    ),
    "pow2": ("scales rounded down to a power of two", lambda r: _all_specs(r, power_of_two=True)),
    "hpsave": (
        "the input saved for backward in high precision, not as its FP8 payload",
        lambda r: replace(r, save_fp8_activations=False),
    ),
    "from-bf16": (
        "an fp32 input (LayerNorm output) rounded to bf16 before its FP8 cast",
        lambda r: replace(r, quantize_from="compute_dtype"),
    ),
    "from-input": (
        "the input cast to FP8 from the dtype it arrives in (fp32 LayerNorm outputs)",
        lambda r: replace(r, quantize_from="input"),
    ),
    "hp-fprop": (
        "the output GEMM in bf16 (backward GEMMs as the recipe says)",
        lambda r: replace(r, fp8_fprop=False),
    ),
    "hp-dgrad": ("the grad_input GEMM in bf16", lambda r: replace(r, fp8_dgrad=False)),
    "hp-wgrad": ("the grad_weight GEMM in bf16", lambda r: replace(r, fp8_wgrad=False)),
    "e4m3-grads": ("gradients (dy) in E4M3", _grads(E4M3)),
    "e5m2-grads": ("gradients (dy) in E5M2", _grads(E5M2)),
    # fp8train.accumulator (issue 30): the FP8 GEMMs sum as a Hopper tensor core would.
    "tc-acc": (
        "FP8 GEMMs in the tensor-core accumulator model (14 bits, K step 32), never promoted",
        lambda r: replace(r, accumulation=TensorCoreAccumulator(promote_every=None)),
    ),
    "tc-acc-promote": (
        "FP8 GEMMs in the tensor-core accumulator model, promoted to fp32 every 128 of K",
        lambda r: replace(r, accumulation=TensorCoreAccumulator()),
    ),
    # The FP4 recipes' options (issue 30), each a Recipe or ScaleSpec field.
    "no-hadamard": (
        "no random Hadamard transform on the grad_weight GEMM's inputs",
        lambda r: replace(r, hadamard_wgrad=False),
    ),
    "no-sr": (
        "gradients (dy) rounded to nearest, not stochastically",
        lambda r: replace(r, grad_output=replace(r.grad_output, rounding="nearest")),
    ),
    "all-fp4": (
        "every converted layer in the recipe, none of the last kept in high precision",
        lambda r: replace(r, high_precision_last=0),
    ),
}
TASKS = ("gpt", "digits")
# --dist: None (one process), or a data-parallel mode of fp8train.distributed.
DIST_MODES = (None, "ddp", "fsdp2")
# --grad-comm: the dtype DDP's gradient buckets are averaged in (the DDP comm hook).
GRAD_COMMS = ("fp32", "bf16", "fp8")


class LabError(Exception):
    """A problem with the user's request (bad option, unusable data, nothing to
    resume). The CLI prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class LabConfig:
    """Everything one comparison depends on. Defaults are the ``default`` preset of the
    ``gpt`` task, sized so that all eight precisions finish within ten minutes on an
    otherwise idle 2-core CPU (see ``steps``)."""

    # What to train: "gpt" (byte-level language model on a text corpus) or "digits"
    # (Linear-ReLU-Linear classifier on scikit-learn's 8x8 handwritten digits).
    task: str = "gpt"
    # Precisions to compare, run in this order; all of them by default.
    precisions: tuple[str, ...] = PRECISIONS
    # First seed; seed s sets the initial weights and the batch order, the same for
    # every precision (paired runs).
    seed: int = 0
    # Number of seeds per precision (seed, seed + 1, ...). One seed has no standard
    # error; the fp32-vs-bf16 gap then serves as the noise floor.
    seeds: int = 1
    # Optimiser steps per run. 250 steps of 16 x 128 bytes see ~0.5 M bytes and take the
    # byte loss from 5.5 (uniform) to about 2.0. On an idle 2-core CPU an fp32 or bf16
    # step takes ~0.11 s and an FP8 recipe's 1.5x to 2.9x that (emulated): the eight
    # runs take about 8 minutes together, leaving room for a busier machine.
    steps: int = 250
    # Sequences per batch (gpt) or examples per batch (digits).
    batch: int = 16
    # Context length in bytes (gpt only).
    seq: int = 128
    # Model width (gpt) or hidden width (digits). A multiple of 128 keeps every
    # gemm dimension whole for the 128-element block recipes.
    d_model: int = 128
    # Transformer blocks (gpt only).
    layers: int = 4
    # Attention heads (gpt only); must divide d_model.
    heads: int = 4
    # Peak learning rate of AdamW, reached after warmup_steps.
    lr: float = 3e-3
    # Linear warmup from 0 to lr over this many steps, then cosine decay.
    warmup_steps: int = 25
    # The cosine ends at lr * min_lr_ratio on the last step.
    min_lr_ratio: float = 0.1
    # AdamW decoupled weight decay, applied to matrices only (not norms, not biases).
    weight_decay: float = 0.1
    # AdamW first-moment decay.
    beta1: float = 0.9
    # AdamW second-moment decay: 0.95 rather than 0.999, as in GPT training (nanoGPT).
    beta2: float = 0.95
    # Global gradient-norm clip, applied after the loss scaler unscales the gradients.
    grad_clip: float = 1.0
    # Validate every this many steps (and at the last step).
    eval_every: int = 25
    # Validation windows (gpt) during training: fixed, evenly spaced over the held-out
    # bytes, the same for every seed and precision.
    eval_windows: int = 32
    # Validation windows for final_val_loss at the end: more of them, less noise.
    final_eval_windows: int = 256
    # Text file or folder to train on; None means the built-in corpus, the running
    # interpreter's standard-library .py sources.
    data: str | None = None
    # Cap on the corpus size in MiB (the first bytes of the sorted concatenation);
    # 4 MiB is ~8x what the default run reads and loads in well under a second.
    corpus_mb: float = 4.0
    # Fraction of the corpus (its end) held out for validation; for digits, the
    # fraction of examples held out for the test accuracy.
    val_fraction: float = 0.05
    # Step times of the first steps are excluded from median_step_s (allocator and
    # thread-pool warm-up).
    timing_warmup_steps: int = 5
    # Write a checkpoint every this many steps (and at the last step).
    ckpt_every: int = 50
    # FP8 quantisation kernels: "compiled" runs them through torch.compile (several times
    # faster on a CPU, bitwise the same results as "eager", a few seconds to compile).
    kernels: str = "compiled"
    # fp8train.Monitor on FP8 runs: observe every this many steps (0: off). At 25 the
    # monitor's cost is a small share of a step (benchmarks/monitor.py measures it);
    # observed steps are left out of the step-time median.
    monitor_every: int = 25
    # Gradient accumulation: each batch runs as this many equal micro-batches, their
    # gradients averaged before the step. One process with micro_batches N computes
    # what N ranks of --dist compute (each rank quantises its own rows).
    micro_batches: int = 1
    # Data parallelism under torchrun: None (one process), "ddp" or "fsdp2"
    # (fp8train.distributed). The global batch stays ``batch``; each rank trains on its
    # ``batch / world size`` rows of it.
    dist: str | None = None
    # Convert the output head (the last Linear) too. False keeps it in high precision in
    # every FP8 precision, ours and the peer's (the d_model 256 runs of issue 33 did).
    fp8_head: bool = True
    # FSDP2 only: all-gather FP8 weights instead of fp32 ones. None: for every recipe
    # whose weight scales allow it (tensorwise, delayed, blockwise, int8; the same
    # bits either way); True: required (an error for rowwise and mxfp8); False: never.
    fp8_all_gather: bool | None = None
    # DDP only: the gradient buckets' all-reduce. "fp32": DDP's own (no hook); "bf16":
    # torch's bf16_compress_hook (half the bytes); "fp8": fp8train's fp8_compress_hook
    # (E4M3, one scale per 128 elements, summed in fp32; about a quarter of the bytes).
    # fp32 by default: the other two change the numbers, and are what --grad-comm studies.
    grad_comm: str = "fp32"
    # A fault injected into every precision's training alike (fp8train.lab.stress), e.g.
    # "outlier:blocks.1.mlp.proj:40:1e6"; None: none.
    stress: str | None = None
    # The policy of "+guard" precisions: "<policy>[:<ladder>]" (fp8train.lab.stress):
    # by default the culprit moves to rowwise, then to high precision on a second
    # trigger. Rollback snapshots every ckpt_every steps.
    guard: str = "demote:rowwise,high"

    def validate(self) -> None:
        """Raise ``LabError`` naming the first invalid field and what it accepts."""
        if self.task not in TASKS:
            raise LabError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if not self.precisions:
            raise LabError("no precisions given; known: " + ", ".join(PRECISIONS))
        for p in self.precisions:
            check_precision(p)
        if len(set(self.precisions)) != len(self.precisions):
            raise LabError(f"precision listed twice in {','.join(self.precisions)}")
        for name in ("steps", "seeds", "batch", "seq", "d_model", "layers", "heads"):
            if getattr(self, name) < 1:
                raise LabError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_every", "eval_windows", "final_eval_windows", "ckpt_every"):
            if getattr(self, name) < 1:
                raise LabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernels not in ("eager", "compiled"):
            raise LabError(f"--kernels must be eager or compiled, got {self.kernels!r}")
        if self.monitor_every < 0:
            raise LabError(f"--monitor-every must be >= 0, got {self.monitor_every}")
        if self.warmup_steps < 0 or self.timing_warmup_steps < 0:
            raise LabError("warmup_steps and timing_warmup_steps must be >= 0")
        if not self.lr > 0:
            raise LabError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise LabError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.corpus_mb > 0:
            raise LabError(f"corpus_mb must be > 0, got {self.corpus_mb}")
        if self.micro_batches < 1 or self.batch % self.micro_batches:
            raise LabError(
                f"--micro-batches must be >= 1 and divide --batch ({self.batch}), "
                f"got {self.micro_batches}"
            )
        if not self.grad_clip > 0:
            raise LabError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if self.dist not in DIST_MODES:
            raise LabError(f"--dist must be ddp or fsdp2, got {self.dist!r}")
        if self.fp8_all_gather is not None and self.dist != "fsdp2":
            raise LabError(
                "--fp8-all-gather / --no-fp8-all-gather apply to --dist fsdp2 only "
                "(DDP keeps full replicas and gathers no weights)"
            )
        if self.grad_comm not in GRAD_COMMS:
            raise LabError(
                f"--grad-comm must be one of {', '.join(GRAD_COMMS)}, got {self.grad_comm!r}"
            )
        if self.grad_comm != "fp32" and self.dist != "ddp":
            raise LabError(
                f"--grad-comm {self.grad_comm} applies to --dist ddp only (got --dist "
                f"{self.dist or 'none'}: one process communicates nothing, and FSDP2 "
                "reduce-scatters its gradients itself); drop it or add --dist ddp"
            )
        if not isinstance(self.fp8_head, bool):
            raise LabError(f"fp8_head must be True or False, got {self.fp8_head!r}")
        try:
            if self.stress is not None:
                parse_stress(self.stress)
            parse_guard(self.guard)
        except ValueError as e:
            raise LabError(str(e)) from None
        if self.dist is not None and any(map(guarded, self.precisions)):
            raise LabError(
                f"{GUARD_SUFFIX} precisions run on one process; drop --dist or the suffix"
            )
        if self.task == "gpt" and self.d_model % self.heads:
            raise LabError(f"--d-model ({self.d_model}) must be a multiple of heads ({self.heads})")

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


# Presets per task override the defaults above; the user's options override the preset.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        # The main job: all eight precisions in about ten minutes on 2 CPU cores.
        "default": {},
        # Seconds, for smoke tests and trying the CLI: one block, a few steps.
        "tiny": {
            "steps": 6,
            "batch": 4,
            "seq": 32,
            "d_model": 128,
            "layers": 1,
            "heads": 2,
            "warmup_steps": 2,
            "eval_every": 3,
            "eval_windows": 4,
            "final_eval_windows": 8,
            "timing_warmup_steps": 1,
            "ckpt_every": 3,
            "corpus_mb": 0.25,
        },
    },
    "digits": {
        # 1,797 8x8 images (20% held out), a 64-128-10 classifier, seconds per run.
        "default": {
            "steps": 300,
            "batch": 64,
            "lr": 3e-3,
            "warmup_steps": 20,
            "weight_decay": 0.0,
            "eval_every": 25,
            "val_fraction": 0.2,
            "ckpt_every": 100,
        },
        # A few steps, for tests.
        "tiny": {
            "steps": 6,
            "batch": 32,
            "lr": 3e-3,
            "warmup_steps": 2,
            "weight_decay": 0.0,
            "eval_every": 3,
            "val_fraction": 0.2,
            "ckpt_every": 3,
            "timing_warmup_steps": 1,
        },
    },
}


def resolve(task: str, preset: str, overrides: dict[str, Any]) -> LabConfig:
    """Build and validate a config: defaults, then ``PRESETS[task][preset]``, then the
    non-None ``overrides``."""
    if task not in PRESETS:
        raise LabError(f"unknown task {task!r}; known: {', '.join(PRESETS)}")
    if preset not in PRESETS[task]:
        raise LabError(f"unknown preset {preset!r}; known: {', '.join(PRESETS[task])}")
    fields = {f.name for f in dataclasses.fields(LabConfig)}
    values = dict(PRESETS[task][preset], task=task)
    for key, value in overrides.items():
        if key not in fields:
            raise LabError(f"unknown config field {key!r}")
        if value is not None:
            values[key] = value
    config = LabConfig(**values)
    config.validate()
    return config


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"bf16,tensorwise"`` -> ``("bf16", "tensorwise")``; "all" means every precision.
    Unknown names are left for ``LabConfig.validate`` to report with the known list."""
    names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if names == ("all",):
        return PRECISIONS
    return names


def _split(precision: str) -> tuple[str, list[str]]:
    """``"tensorwise~nopow2~hpsave+fp8act"`` -> ``("tensorwise", ["nopow2", "hpsave"])``."""
    arithmetic = (
        precision.removesuffix(GUARD_SUFFIX)
        .removesuffix(FP8_OPTIMIZER_SUFFIX)
        .removesuffix(ACTIVATION_STORAGE_SUFFIX)
    )
    base, *ablations = arithmetic.split(ABLATION_SEPARATOR)
    return base, ablations


def check_precision(precision: str) -> None:
    """Raise ``LabError`` unless ``precision`` is one the lab runs: fp32, bf16, an FP8
    recipe with ablations and ``+fp8act`` optional, or a peer precision; each but fp32
    and the peer's with ``+fp8optim`` optional; all but the peer's with ``+guard``
    optional (last)."""
    if guarded(precision):
        unguarded = precision.removesuffix(GUARD_SUFFIX)
        if peer_of(unguarded) is not None or guarded(unguarded):
            raise LabError(
                f"precision {precision!r}: {GUARD_SUFFIX} applies once, to fp32, bf16 and "
                "fp8train's precisions (the guard watches and demotes fp8train's layers)"
            )
        check_precision(unguarded)
        return
    if uses_fp8_optimizer(precision):
        arithmetic = precision.removesuffix(FP8_OPTIMIZER_SUFFIX)
        if arithmetic != "bf16" and recipe_of(arithmetic) is None:
            raise LabError(
                f"precision {precision!r}: {FP8_OPTIMIZER_SUFFIX} applies to bf16 and fp8train's "
                "recipes (fp32 is the reference; the peer keeps torch's AdamW)"
            )
        check_precision(arithmetic)
        return
    if precision in KNOWN_PRECISIONS or precision in PEER_PRECISIONS:
        return
    base, ablations = _split(precision)
    if not ablations or base not in LAB_RECIPES:
        raise LabError(
            f"unknown precision {precision!r}; known: {', '.join(KNOWN_PRECISIONS)}; "
            f"<recipe>{ABLATION_SEPARATOR}<ablation> with ablations {', '.join(ABLATIONS)} "
            f"(combinable); the torchao peer: {', '.join(PEER_PRECISIONS)}"
        )
    recipe_for(precision)  # raises for an unknown, repeated or no-op ablation


def recipe_for(precision: str) -> Recipe | None:
    """The ``fp8train.Recipe`` a precision runs, ablations applied (each a
    ``dataclasses.replace`` of the named recipe, keeping its name), or None for fp32,
    bf16 and the peer. ``LabError`` for an ablation that is unknown, repeated, refused
    by the recipe's validation or changes nothing."""
    base, ablations = _split(precision)
    if base not in LAB_RECIPES:
        return None
    recipe = Recipe.from_name(base)
    for i, name in enumerate(ablations):
        if name not in ABLATIONS:
            raise LabError(
                f"precision {precision!r}: unknown ablation {name!r}; known: {', '.join(ABLATIONS)}"
            )
        if name in ablations[:i]:
            raise LabError(f"precision {precision!r}: ablation {name!r} given twice")
        try:
            changed = ABLATIONS[name][1](recipe)
        except (ValueError, TypeError) as e:
            raise LabError(f"precision {precision!r}: {name} does not apply: {e}") from None
        if changed == recipe:
            raise LabError(
                f"precision {precision!r}: {name} changes nothing in recipe {base} "
                f"({ABLATIONS[name][0]} already); drop it"
            )
        recipe = changed
    if ablations:
        described = "; ".join(ABLATIONS[n][0] for n in ablations)
        recipe = replace(recipe, description=f"{recipe.description}; ablation: {described}")
    return recipe


def recipe_of(precision: str) -> str | None:
    """The name of the FP8 recipe a precision runs (``"rowwise+fp8act"`` and
    ``"rowwise~hpsave"`` -> ``"rowwise"``), or None for fp32, bf16 and the peer. The
    recipe itself, ablations applied, is ``recipe_for(precision)``."""
    base, _ = _split(precision)
    return base if base in LAB_RECIPES else None


def peer_of(precision: str) -> str | None:
    """The torchao recipe name of a peer precision (``"torchao-rowwise"`` ->
    ``"rowwise"``), else None."""
    return precision.removeprefix("torchao-") if precision in PEER_PRECISIONS else None


def runs_fp8(precision: str) -> bool:
    """Whether the precision trains with FP8 GEMMs (ours or the peer's): such runs go
    through the same dynamic loss scaler."""
    return recipe_of(precision) is not None or peer_of(precision) is not None


def stores_fp8_activations(precision: str) -> bool:
    arithmetic = precision.removesuffix(GUARD_SUFFIX).removesuffix(FP8_OPTIMIZER_SUFFIX)
    return arithmetic.endswith(ACTIVATION_STORAGE_SUFFIX) and recipe_of(precision) is not None


def uses_fp8_optimizer(precision: str) -> bool:
    """Whether the precision keeps AdamW's moments in FP8 (``fp8train.Fp8AdamW``)."""
    return precision.removesuffix(GUARD_SUFFIX).endswith(FP8_OPTIMIZER_SUFFIX)


def guarded(precision: str) -> bool:
    """Whether the precision trains under ``fp8train.Guard`` (``LabConfig.guard``)."""
    return precision.endswith(GUARD_SUFFIX)


# Fields that choose which runs a comparison holds, not how any one of them trains: a
# resumed comparison may add precisions or seeds (each run's checkpoint ignores them).
RUN_SET_FIELDS = ("precisions", "seeds")


def trains_alike(a: LabConfig, b: LabConfig) -> bool:
    """Whether a run of ``a`` and the same precision and seed of ``b`` train identically."""
    return dataclasses.replace(a, precisions=b.precisions, seeds=b.seeds) == b


def from_dict(values: dict[str, Any]) -> LabConfig:
    """Rebuild a saved config (JSON turns tuples into lists)."""
    fields = {f.name for f in dataclasses.fields(LabConfig)}
    unknown = set(values) - fields
    if unknown:
        raise LabError(f"saved config has unknown fields {sorted(unknown)}")
    values = dict(values)
    values["precisions"] = tuple(values.get("precisions", PRECISIONS))
    config = LabConfig(**values)
    config.validate()
    return config
