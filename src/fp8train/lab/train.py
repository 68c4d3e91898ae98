"""One training run: a task, a precision, a seed. ``train_run`` is the whole loop.

Precisions: "fp32" trains in float32; "bf16" runs forward under CPU bf16 autocast;
every FP8 recipe (and "int8") runs under the same autocast with each ``nn.Linear``
swapped by ``fp8train.convert(model, recipe)`` (the output head too unless
``config.fp8_head`` is False); "<recipe>~<ablation>" runs the recipe with an option
changed (``fp8train.lab.config.ABLATIONS``); "<recipe>+fp8act" also stores the other
activations saved for backward in FP8 (``fp8train.Fp8SavedActivations``); the peer
precisions ("torchao-tensorwise", "torchao-rowwise") swap the same layers for torchao's
emulated float8 layers (``fp8train.lab.peer``) under the same autocast. Master weights
stay float32 and the optimiser is AdamW in every case, so the precisions differ only in the
arithmetic; "<precision>+fp8optim" keeps AdamW's moments in FP8 (``fp8train.Fp8AdamW``).
Step 2 measures the memory ledger (``fp8train.lab.memory``): parameters, gradients,
optimizer states and the step's peak of live tensor bytes.
FP8 runs go through ``fp8train.LossScaler`` (dynamic), which skips steps whose
gradients are not finite; the count is reported. With ``micro_batches`` N each batch
runs as N equal micro-batches whose gradients and losses are averaged before the step
(gradient accumulation): what N data-parallel ranks compute.
``config.stress`` injects the same fault into every precision's training
(``fp8train.lab.stress``); "<precision>+guard" trains under ``fp8train.Guard`` with the
policy ``config.guard``, which then runs the optimizer step, and its actions join the
run's record (``guard_events``).

A run checkpoints every ``ckpt_every`` steps and at its end; a checkpoint holds the
model, the optimiser, the loss scaler, every random state, the data position and the
history, so a resumed run continues bit for bit where the uninterrupted one would be.

One process or data-parallel under torchrun (``config.dist``): the loop is the same,
and what differs (wrapping the model, the loss scaler, this process's rows of the
batch, the mean loss over ranks, the checkpoint format, which process writes) lives in
``fp8train.lab.world``. Distributed, every rank runs this loop; validation runs on
every rank (FSDP2's all-gathers and delayed scaling's amax all-reduces are collectives)
over the whole validation set, so each rank gets the same numbers; the numerics monitor
runs on the main rank only, and its activation and gradient statistics describe that
rank's part of the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train.lab import memory, peer
from fp8train.lab.config import (
    LabConfig,
    LabError,
    from_dict,
    guarded,
    peer_of,
    recipe_for,
    recipe_of,
    stores_fp8_activations,
    trains_alike,
    uses_fp8_optimizer,
)
from fp8train.lab.data import Corpus, Digits, eval_windows, sample_windows
from fp8train.lab.gpt import GPT
from fp8train.lab.stress import parse_guard, parse_stress
from fp8train.lab.world import CHECKPOINT_FORMAT, World, fp8_all_gather_for, world_for
from fp8train.optim import Fp8AdamW

__all__ = [
    "SavedTensorBytes",
    "Task",
    "digits_task",
    "fp8_all_gather_for",
    "gpt_task",
    "loadavg_1m",
    "lr_at",
    "require_fp8_layers",
    "train_run",
]

# Validation forward passes run in chunks of this many windows to bound memory.
_EVAL_CHUNK = 64


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """What the loop trains: how to build the model, draw a batch, score outputs and
    evaluate. ``evaluate(model, final)`` runs under the caller's precision context and
    returns at least ``val_loss``."""

    name: str
    build_model: Callable[[], nn.Module]
    sample_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, bool], dict[str, float]]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Upcast: the head's output is bf16 under autocast, the loss is taken in fp32.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # (b*t, vocab)


def gpt_task(config: LabConfig, corpus: Corpus) -> Task:
    val_x, val_y = eval_windows(corpus.val, config.eval_windows, config.seq)
    final_x, final_y = eval_windows(corpus.val, config.final_eval_windows, config.seq)

    def build_model() -> nn.Module:
        return GPT(seq=config.seq, d_model=config.d_model, layers=config.layers, heads=config.heads)

    def sample_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_windows(corpus.train, config.batch, config.seq, g)

    def evaluate(model: nn.Module, final: bool) -> dict[str, float]:
        x, y = (final_x, final_y) if final else (val_x, val_y)
        total = 0.0
        for i in range(0, len(x), _EVAL_CHUNK):
            logits = model(x[i : i + _EVAL_CHUNK])
            total += _lm_loss(logits, y[i : i + _EVAL_CHUNK]).item() * len(logits)
        return {"val_loss": total / len(x)}

    return Task("gpt", build_model, sample_batch, _lm_loss, evaluate)


def digits_task(config: LabConfig, digits: Digits) -> Task:
    def build_model() -> nn.Module:
        # The classifier of the seed experiment: Linear-ReLU-Linear, 64 pixels -> 10 classes.
        return nn.Sequential(
            nn.Linear(64, config.d_model), nn.ReLU(), nn.Linear(config.d_model, 10)
        )

    def sample_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(digits.y_train), (config.batch,), generator=g)
        return digits.x_train[idx], digits.y_train[idx]

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    def evaluate(model: nn.Module, final: bool) -> dict[str, float]:
        logits = model(digits.x_test).float()
        return {
            "val_loss": F.cross_entropy(logits, digits.y_test).item(),
            "test_accuracy": (logits.argmax(1) == digits.y_test).double().mean().item(),
        }

    return Task("digits", build_model, sample_batch, loss, evaluate)


# ------------------------------------------------------------------------ precision


def precision_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    """fp32: nothing; bf16 and every recipe: CPU bf16 autocast (FP8 layers handle
    autocast themselves)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def require_fp8_layers(model: nn.Module, precision: str) -> None:
    """Raise ``LabError`` before training when ``precision`` cannot run here: a peer
    precision needs torchao (the message gives the install line). fp8train's recipes
    take every layer shape (``Recipe.min_multiple`` is 1), so they always can."""
    if peer_of(precision) is not None:
        peer.require_torchao(precision)


def apply_precision(
    model: nn.Module, precision: str, kernels: str = "eager", *, fp8_head: bool = True
) -> nn.Module:
    """Swap the Linear layers for the recipe's FP8 layers (ablations applied), or for
    the peer's; fp32 and bf16 leave the model as it is. ``fp8_head=False`` leaves the
    last Linear (the output head) in high precision. The run records how many Linear
    layers were converted."""
    layers = peer.fp8_layer_names(model, head=fp8_head)
    torchao_recipe = peer_of(precision)
    if torchao_recipe is not None:
        return peer.convert_peer(model, torchao_recipe, precision, layers)
    recipe = recipe_for(precision)
    if recipe is None:
        return model
    require_fp8_layers(model, precision)
    wanted = set(layers)
    try:
        return fp8train.convert(
            model,
            recipe,
            filter=lambda _module, name: name in wanted,
            kernels=kernels,  # type: ignore[arg-type]
        )
    except (ValueError, TypeError) as e:  # the library's API errors say what to fix
        raise LabError(f"fp8train.convert(model, {precision!r}) refused the model: {e}") from e


def _fp8train_version() -> str:
    # The package's own attribute: an editable install's metadata keeps the version it
    # was installed with.
    return fp8train.__version__


# -------------------------------------------------------------- measurement helpers


class SavedTensorBytes:
    """Counts the bytes autograd saves for backward while active, each storage once.

    Used as ``with torch.autograd.graph.saved_tensors_hooks(m.pack, m.unpack)``. Storages
    are deduplicated by ``untyped_storage().data_ptr()`` and counted at their full
    ``nbytes()``, so an FP8 payload counts one byte per element and a view saved twice
    counts once. The model's own parameters are left out: they are held whether or
    not anything is saved. Wrapper tensor subclasses are opened through
    ``__tensor_flatten__`` and their inner tensors counted. Only what goes through
    ``ctx.save_for_backward`` (or built-in ops) is seen; tensors stashed as plain ``ctx``
    attributes are not.
    """

    def __init__(self, exclude: Iterator[torch.Tensor]) -> None:
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._sizes: dict[int, int] = {}

    def _storages(self, t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                yield from self._storages(getattr(t, name))
            return
        try:
            yield t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. meta): nothing held
            return

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        for s in self._storages(t):
            ptr = s.data_ptr()
            if ptr and ptr not in self._exclude:
                self._sizes[ptr] = max(self._sizes.get(ptr, 0), s.nbytes())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self._sizes.values())


def lr_at(step: int, config: LabConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to
    ``lr * min_lr_ratio`` at the last step. ``step`` counts from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, config: LabConfig, *, fp8_states: bool = False
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT): norms, biases and nothing
    1-D is decayed. ``fp8_states``: ``fp8train.Fp8AdamW`` (moments in FP8, the same
    arithmetic otherwise) instead of ``torch.optim.AdamW``."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fp8_states:
        return Fp8AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ----------------------------------------------------------------------------- loop


def _new_history() -> dict[str, Any]:
    return {
        "train_step": [],  # step number (1-based) of each train loss
        "train_loss": [],  # loss of the batch at that step, before the update
        "val_step": [],  # step number of each validation (0 = before training)
        "val_loss": [],
        "val_metrics": [],  # every metric evaluate() returned, per validation
        "step_s": [],  # wall time of each warm step (see timing_warmup_steps)
        "cold_step_s": [],  # the others, used only when a run has no warm step
        "saved_activation_bytes": None,  # measured on step 1
        "memory": None,  # the memory ledger (fp8train.lab.memory), measured on step 2
        "final": None,  # evaluate(final=True) at the last step
        "guard_events": [],  # a "+guard" run's actions (_event_record), in order
    }


def train_run(
    config: LabConfig,
    task: Task,
    precision: str,
    seed: int,
    checkpoint: Path,
    *,
    stop_at: int | None = None,
    on_step: Callable[[int, float, float | None], None] | None = None,
) -> dict[str, Any]:
    """Train ``task`` in ``precision`` from ``seed`` for ``config.steps`` steps, resuming
    from ``checkpoint`` if it exists, and return the run's record (see ``_record``).

    ``stop_at`` ends the run after that step with a checkpoint, as an interruption
    would; ``on_step(step, train_loss, val_loss_or_None)`` reports progress.
    With ``config.dist`` every rank calls this (see ``fp8train.lab.world``) and
    ``checkpoint`` is a folder of distributed checkpoints.
    """
    world = world_for(config)
    # Model, optimiser and scaler are built the same way for a fresh and a resumed run;
    # a resumed run then overwrites all their state from the checkpoint.
    random.seed(seed)
    torch.manual_seed(seed)  # initial weights: the same for every precision (and rank)
    net = apply_precision(task.build_model(), precision, config.kernels, fp8_head=config.fp8_head)
    net.train()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    is_peer = peer_of(precision) is not None
    fp8_linears = sum(
        isinstance(m, fp8train.Fp8Linear) or (is_peer and peer.is_peer_linear(m)) for m in linears
    )
    # ``model`` runs the steps: ``net`` itself, sharded in place by FSDP2, or its DDP
    # wrapper. The optimiser comes after: FSDP2 replaces the Parameters.
    # The stress hooks the unwrapped model, so its layer names are the model's own.
    stress_hook = None
    if config.stress is not None:
        try:
            stress_hook = parse_stress(config.stress).attach(net)
        except ValueError as e:
            raise LabError(str(e)) from None
    model, fp8_all_gather = world.wrap(net, precision)
    optimizer = make_optimizer(model, config, fp8_states=uses_fp8_optimizer(precision))
    scaler = world.loss_scaler(precision)
    data_gen = torch.Generator().manual_seed(seed)  # batch order: the same for every precision
    history = _new_history()
    step = 0  # optimiser steps done

    def same_run(state: dict[str, Any]) -> None:
        if (state["precision"], state["seed"]) != (precision, seed):
            raise LabError(f"checkpoint {checkpoint} is for another run; remove it to restart")
        if not trains_alike(from_dict(state["config"]), config):
            raise LabError(f"checkpoint {checkpoint} was made with another config")

    state = world.load(checkpoint, model, optimizer, scaler, same_run)
    if state is not None:  # resume: every random state, the history, the step count
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        data_gen.set_state(state["rng"]["data"])
        history, step = state["history"], state["step"]

    def validate(final: bool) -> dict[str, float]:
        model.eval()
        with torch.no_grad(), precision_context(precision):
            metrics = task.evaluate(model, final)
        model.train()
        return metrics

    if step == 0:  # the untrained model's loss anchors the curves
        _log_validation(history, 0, validate(final=False))

    monitor = _start_monitor(net, precision, seed, config, checkpoint, step, world)
    guard = _start_guard(net, precision, config, optimizer, scaler, monitor, data_gen, step)
    if guard is not None and state is not None and "guard" in state:
        try:  # what its triggers had learnt (checkpoints from before it start afresh)
            guard.load_state_dict(state["guard"])
        except ValueError as e:
            raise LabError(f"checkpoint {checkpoint}: {e}") from None
    events_seen = 0  # guard.events already in the history
    # "<recipe>+fp8act": the model's saved activations go to FP8 (the loss stays outside).
    storage = None
    if stores_fp8_activations(precision):
        storage = fp8train.Fp8SavedActivations(
            recipe_of(precision),  # type: ignore[arg-type]
            kernels=config.kernels,  # type: ignore[arg-type]
        )

    session_steps = 0  # steps in this process: the first few are excluded from timing
    # Where this process's training starts and ends, and the machine's load then: the
    # report reads step times against it (a resumed run has several sessions).
    load = loadavg_1m()
    session = {"first_step": step, "last_step": step, "load_1m_start": load, "load_1m_end": load}
    if step < config.steps and (stop_at is None or step < stop_at):
        history.setdefault("sessions", []).append(session)
    while step < config.steps and (stop_at is None or step < stop_at):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        if stress_hook is not None:
            stress_hook.step = step
        t0 = time.perf_counter()
        x, y = task.sample_batch(data_gen)  # the global batch, the same on every rank
        x, y = world.shard(x), world.shard(y)  # this process's rows of it

        # Step 1 also counts the bytes saved for backward (of one micro-batch); the hooks
        # return every tensor unchanged, so the step's numerics are untouched.
        meter = None
        if step == 0 and world.measures_saved_bytes:
            meter = SavedTensorBytes(model.parameters())
        # Step 2 (the optimizer states exist by then) measures the memory ledger's peak:
        # forward, backward and the optimizer step watched by LiveTensorBytes, which
        # only observes (every operator's result is returned unchanged); it also hooks
        # what autograd saves, in the place of step 1's meter.
        # Not under a guard: it drops the gradients inside its step, before a ledger
        # could count them.
        live = None
        if step == 1 and world.measures_saved_bytes and guard is None:
            live = memory.LiveTensorBytes()
            live.track([*model.parameters(), *memory.optimizer_tensors(optimizer), x, y])
        forward_backward = functools.partial(
            _forward_backward,
            model,
            task,
            precision,
            x,
            y,
            config.micro_batches,
            scaler,
            storage,
            meter or live,
        )
        if guard is not None:
            # The guard runs forward and backward (twice for a closer look at a triggered
            # step), the scaler, clipping, the optimizer step and the monitor's step.
            observed = guard.monitor.observing
            with warnings.catch_warnings():  # as the monitor's below: report.md has them
                warnings.simplefilter("ignore", fp8train.HealthWarning)
                train_loss = guard.step(forward_backward)
            history.setdefault("guard_events", []).extend(
                _event_record(e) for e in guard.events[events_seen:]
            )
            events_seen = len(guard.events)
            if guard.step_count != step + 1:  # a rollback: the replay overwrites the curve
                step = guard.step_count
                _truncate_history(history, step)
                continue
        else:
            with live if live is not None else contextlib.nullcontext():
                loss = forward_backward()
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = world.grad_norm(model, config.grad_clip)
            with live if live is not None else contextlib.nullcontext():
                if scaler is not None:
                    scaler.step(optimizer)  # skipped when the gradients are not finite
                    scaler.update()
                else:
                    optimizer.step()
            train_loss = world.mean(loss)  # the global batch's loss
            observed = monitor is not None and monitor.observing
            if monitor is not None:
                # The lab reports health warnings in report.md (and the JSONL), not as
                # hundreds of stderr lines under the progress bars.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", fp8train.HealthWarning)
                    monitor.step(
                        train_loss,
                        grad_norm=float(grad_norm),
                        loss_scale=scaler.get_scale() if scaler is not None else None,
                        skipped=scaler.last_step_skipped if scaler is not None else False,
                    )
            if meter is not None:
                history["saved_activation_bytes"] = meter.total
            if live is not None:
                params = list(model.parameters())
                saved = history["saved_activation_bytes"]
                history["memory"] = memory.ledger(params, optimizer, saved, live.peak)
            optimizer.zero_grad(set_to_none=True)
        if meter is not None:
            history["saved_activation_bytes"] = meter.total
        step += 1
        session_steps += 1
        session.update(last_step=step, load_1m_end=loadavg_1m())
        elapsed = time.perf_counter() - t0
        # Observed (monitored) steps cost more; they are left out of the step-time median.
        warm = session_steps > config.timing_warmup_steps and not observed
        history["step_s" if warm else "cold_step_s"].append(elapsed)

        history["train_step"].append(step)
        history["train_loss"].append(train_loss)
        _end_of_step(history, step, config, validate, on_step, train_loss)
        if step % config.ckpt_every == 0 or step == config.steps or step == stop_at:
            world.save(
                checkpoint,
                _run_state(precision, seed, config, step, data_gen, history, guard),
                model,
                optimizer,
                scaler,
            )

    if guard is not None:
        guard.close()
    if monitor is not None:
        monitor.close()
    if stress_hook is not None:
        stress_hook.remove()
    record = _record(precision, seed, step, config, history, scaler)
    record["steps_this_process"] = session_steps
    record["sessions"] = history.get("sessions", [])  # none in checkpoints from before
    record["converted_linears"] = f"{fp8_linears}/{len(linears)}"
    record["fp8_all_gather"] = fp8_all_gather
    if guard is not None:
        record["guard"] = {
            "policy": config.guard,
            "events": list(history.get("guard_events", [])),
            "demoted": guard.demotions,
        }
    return record


def _end_of_step(
    history: dict[str, Any],
    step: int,
    config: LabConfig,
    validate: Callable[[bool], dict[str, float]],
    on_step: Callable[[int, float, float | None], None] | None,
    train_loss: float,
) -> float | None:
    """Validation (every ``eval_every`` steps and at the last), the final evaluation and
    the progress report of step ``step`` (1-based); returns the validation loss or None."""
    val_loss = None
    if step % config.eval_every == 0 or step == config.steps:
        val_loss = _log_validation(history, step, validate(False))
    if step == config.steps:
        history["final"] = validate(True)
    if on_step is not None:
        on_step(step, train_loss, val_loss)
    return val_loss


def _run_state(
    precision: str,
    seed: int,
    config: LabConfig,
    step: int,
    data_gen: torch.Generator,
    history: dict[str, Any],
    guard: fp8train.Guard | None,
) -> dict[str, Any]:
    """A checkpoint's run state: everything but the model, optimiser and scaler."""
    guard_state = {} if guard is None else {"guard": guard.state_dict()}
    return {
        **guard_state,
        "format": CHECKPOINT_FORMAT,
        "precision": precision,
        "seed": seed,
        "config": asdict(config),
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "data": data_gen.get_state(),
        },
        "history": history,
    }


class _DataPosition:
    """The batch order's generator as a guard's ``data`` (what a rollback rewinds)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def state_dict(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


def _start_guard(
    net: nn.Module,
    precision: str,
    config: LabConfig,
    optimizer: torch.optim.Optimizer,
    scaler: fp8train.LossScaler | None,
    monitor: fp8train.Monitor | None,
    data_gen: torch.Generator,
    step: int,
) -> fp8train.Guard | None:
    """The ``fp8train.Guard`` of a "+guard" precision (None otherwise), on the run's
    monitor (its observed steps feed the GEMM baselines); fp32 and bf16, which have no
    monitor, get the guard's own (nothing to observe: their guard can only skip). A
    resumed run's guard loads what its triggers had learnt from the checkpoint; its
    demotions come back with the recipe state."""
    if not guarded(precision):
        return None
    if monitor is None and recipe_of(precision) is not None:
        raise LabError(
            f"precision {precision!r}: the guard needs the monitor; set --monitor-every >= 1"
        )
    spec = parse_guard(config.guard)
    try:
        return fp8train.Guard(
            net,
            optimizer,
            policy=spec.policy,  # type: ignore[arg-type]
            demote_to=spec.demote_to,
            snapshot_every=config.ckpt_every if spec.policy == "rollback" else None,
            data=_DataPosition(data_gen) if spec.policy == "rollback" else None,
            scaler=scaler,
            max_grad_norm=config.grad_clip,
            monitor=monitor,
            every=max(config.monitor_every, 1),
            start=step,
        )
    except (ValueError, TypeError) as e:
        raise LabError(f"precision {precision!r}, guard {config.guard!r}: {e}") from None


def _event_record(event: dict[str, Any]) -> dict[str, Any]:
    """A guard event as the run's record keeps it (JSON-ready)."""
    keys = ("step", "action", "layer", "to", "to_step", "triggers", "message")
    out = {k: event[k] for k in keys if k in event}
    out["triggers"] = [str(t) for t in out.get("triggers", [])]  # trigger names
    return out


def _truncate_history(history: dict[str, Any], step: int) -> None:
    """Drop what the history holds after ``step`` (a rollback to ``step`` replays it)."""
    keep = sum(s <= step for s in history["train_step"])
    for key in ("train_step", "train_loss"):
        history[key] = history[key][:keep]
    keep = sum(s <= step for s in history["val_step"])
    for key in ("val_step", "val_loss", "val_metrics"):
        history[key] = history[key][:keep]


def _log_validation(history: dict[str, Any], step: int, metrics: dict[str, float]) -> float:
    """Append a validation's metrics at ``step`` to the history; return its loss."""
    history["val_step"].append(step)
    history["val_loss"].append(metrics["val_loss"])
    history["val_metrics"].append(metrics)
    return metrics["val_loss"]


def _forward_backward(
    model: nn.Module,
    task: Task,
    precision: str,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int,
    scaler: fp8train.LossScaler | None,
    storage: fp8train.Fp8SavedActivations | None,
    meter: SavedTensorBytes | memory.LiveTensorBytes | None,
) -> torch.Tensor:
    """Forward and backward of one batch as ``micro_batches`` equal parts whose gradients
    add up in ``.grad`` and are then averaged; return the batch's loss (detached). With
    ``meter``, the first part's saved-for-backward bytes are counted."""
    if storage is not None:
        storage.observer = meter.pack if meter is not None else None
    parts = []  # each micro-batch's loss
    for i, (x_part, y_part) in enumerate(
        zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=False)
    ):
        counting = meter is not None and i == 0
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
            if counting and meter is not None
            else contextlib.nullcontext()
        )
        if storage is not None and not counting:
            storage.observer = None
        with hooks:
            with precision_context(precision):
                with storage if storage is not None else contextlib.nullcontext():
                    out = model(x_part)
                part = task.loss(out, y_part)
            if scaler is not None:
                scaler.scale(part).backward()  # type: ignore[no-untyped-call]
            else:
                part.backward()  # type: ignore[no-untyped-call]
        parts.append(part.detach())
    loss = parts[0]
    if len(parts) > 1:
        # The mean over micro-batches of gradients and losses, as a data-parallel
        # all-reduce takes it over ranks (dividing by a power of two is exact).
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(len(parts))
        loss = sum(parts[1:], parts[0]) / len(parts)
    return loss


def _start_monitor(
    net: nn.Module,
    precision: str,
    seed: int,
    config: LabConfig,
    checkpoint: Path,
    step: int,
    world: World,
) -> fp8train.Monitor | None:
    """The numerics health monitor of an FP8 run: per-layer records and culprit-naming
    warnings in <out>/monitor/<precision>-seed<N>.jsonl, appended across resumes.
    Distributed: the main rank only (the monitor runs no collective, so the other ranks
    need not take part), on its rows of the batch."""
    if recipe_of(precision) is None or config.monitor_every <= 0 or not world.is_main:
        return None
    log = checkpoint.parent.parent / "monitor" / f"{precision}-seed{seed}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    monitor = fp8train.Monitor(net, every=config.monitor_every, jsonl=log, start=step)
    monitor.attach()
    return monitor


def loadavg_1m() -> float | None:
    """The machine's 1-minute load average (runnable processes), or None where the
    platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _record(
    precision: str,
    seed: int,
    step: int,
    config: LabConfig,
    history: dict[str, Any],
    scaler: Any | None,
) -> dict[str, Any]:
    """The run as plain data (JSON-ready, floats may be NaN)."""
    final = history["final"] or {}
    return {
        "precision": precision,
        "seed": seed,
        "steps_done": step,
        "complete": step >= config.steps,
        "final_val_loss": final.get("val_loss", math.nan),
        "final_metrics": final,
        "median_step_s": statistics.median(history["step_s"] or history["cold_step_s"]),
        "saved_activation_bytes": history["saved_activation_bytes"],
        "memory": history.get("memory"),  # None: not measured (distributed, or 1 step)
        "loss_scaler": None if scaler is None else type(scaler).__name__,
        "skipped_steps": int(getattr(scaler, "skipped_steps", 0)) if scaler is not None else 0,
        "curves": {
            "train_step": list(history["train_step"]),
            "train_loss": list(history["train_loss"]),
            "val_step": list(history["val_step"]),
            "val_loss": list(history["val_loss"]),
        },
        "val_metrics": list(history["val_metrics"]),
    }
