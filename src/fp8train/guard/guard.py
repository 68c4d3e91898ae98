"""The :class:`Guard`: runs each training step, looks closer when a trigger fires, acts.

One step (:meth:`Guard.step`): keep what a re-run of the step needs (the layers' amax
histories and the RNG state), run the caller's closure (forward and backward), test the
triggers (:mod:`fp8train.guard.triggers`). On a trigger, if the monitor did not observe
the step, run the closure again on the same batch, observed: same weights, same
histories, same RNG, so the same numbers, now with every operand and GEMM error in hand.
Then :func:`~fp8train.guard.diagnosis.localise` names the culprit, the ranks agree on one
action (:mod:`fp8train.guard.decision`) and the policy acts. Without a trigger the
optimizer steps (through the loss scaler, with clipping, when given) and the step's GEMM
errors join their baselines.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from fp8train.guard.decision import ReduceMax, agree, all_reduce_max
from fp8train.guard.diagnosis import Diagnosis, localise
from fp8train.guard.triggers import GemmBaselines, GuardThresholds, ScalarTriggers
from fp8train.loss_scaler import LossScaler
from fp8train.monitor import Monitor
from fp8train.monitor.sinks import Sink
from fp8train.nn import Fp8Linear, fp8_layers
from fp8train.recipes import Recipe

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_GUARD_EVERY", "HIGH_PRECISION", "POLICIES", "Guard", "Policy", "Stateful"]

log = logging.getLogger("fp8train")

Policy = Literal["warn", "skip", "demote", "rollback"]
POLICIES: tuple[Policy, ...] = ("warn", "skip", "demote", "rollback")

# Observe (GEMM check and operand statistics) one step in this many by default. An
# observed step costs about a plain step again on the lab GPT, so 1 in 100 keeps the
# amortised cost near 1% of a step, inside the 3% aim with room for noisier machines
# (benchmarks/guard.py). The triggers run on every step whatever the interval, and a
# triggered step is looked at again, observed; the interval only paces the baselines.
DEFAULT_GUARD_EVERY = 100

# The last rung a demotion ladder may name: the layer's compute dtype (bf16 under
# autocast), nothing quantised (LayerState.high_precision).
HIGH_PRECISION = "high"

# Bumped when Guard.state_dict() changes shape.
_STATE_FORMAT = 1

# Observed steps of amax evidence kept per (layer, role) for a diagnosis.
_EVIDENCE_LEN = 16

# Actions by severity: agree() takes the max over ranks, so every rank takes the most
# severe action any rank chose.
_ACTIONS = ("step", "warn", "skip", "demote", "rollback")


class Stateful(Protocol):
    """The data position (or anything else a rollback must rewind): ``state_dict()``
    and ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class _Snapshot:
    """Everything a rollback restores, taken before step ``step`` runs."""

    def __init__(self, guard: Guard, step: int) -> None:
        self.step = step
        with torch.no_grad():
            self.model = {k: v.detach().clone() for k, v in guard.model.state_dict().items()}
        self.optimizer = copy.deepcopy(guard.optimizer.state_dict())
        self.scaler = None if guard.scaler is None else copy.deepcopy(guard.scaler.state_dict())
        self.recipe = _recipe_state(guard.model)
        self.data = None if guard.data is None else copy.deepcopy(guard.data.state_dict())
        self.rng = _rng_state()

    def restore(self, guard: Guard) -> None:
        with torch.no_grad():
            for k, v in guard.model.state_dict().items():
                v.copy_(self.model[k])
        guard.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        if guard.scaler is not None and self.scaler is not None:
            guard.scaler.load_state_dict(copy.deepcopy(self.scaler))
        _load_recipe_state(guard.model, self.recipe)
        if guard.data is not None:
            guard.data.load_state_dict(copy.deepcopy(self.data))
        _set_rng_state(self.rng)


def _recipe_state(model: nn.Module) -> dict[str, Any]:
    """Each FP8 layer's LayerState.state_dict() (histories cloned), by name."""
    return {name: layer.fp8_state.state_dict() for name, layer in fp8_layers(model)}


def _load_recipe_state(model: nn.Module, state: dict[str, Any]) -> None:
    for name, layer in fp8_layers(model):
        # A copy: a later record() must not write into the saved window.
        layer.fp8_state.load_state_dict(copy.deepcopy(state[name]))


# A rung of a demotion ladder: a named recipe, or None for high precision.
Rung = Recipe | None


def _ladder(demote_to: Sequence[str | Recipe], layers: dict[str, Fp8Linear]) -> list[Rung]:
    """``demote_to`` checked against the model: a non-empty sequence of distinct named
    recipes (names or :class:`Recipe` objects equal to fp8train's recipe of that name)
    and ``"high"`` (last only); no rung is a layer's own recipe, and every FP8 rung can
    take every layer's shape."""
    if isinstance(demote_to, (str, Recipe)) or not isinstance(demote_to, Sequence):
        raise TypeError(
            f"demote_to must be a sequence of recipes (names or Recipe) ending, if you "
            f"want, with {HIGH_PRECISION!r}, e.g. ('rowwise', {HIGH_PRECISION!r}); got "
            f"{demote_to!r}"
        )
    if not demote_to:
        raise ValueError(f"demote_to is empty; e.g. ('rowwise', {HIGH_PRECISION!r})")
    rungs: list[Rung] = []
    for i, rung in enumerate(demote_to):
        if rung == HIGH_PRECISION:
            if i != len(demote_to) - 1:
                raise ValueError(
                    f"demote_to {list(map(str, demote_to))}: {HIGH_PRECISION!r} (the compute "
                    "dtype) must be the last rung: nothing is finer to demote to after it"
                )
            rungs.append(None)
            continue
        if rung in ("bf16", "fp32", "fp16"):
            raise ValueError(
                f"demote_to rung {rung!r}: the high-precision rung is spelled "
                f"{HIGH_PRECISION!r} (the layer's compute dtype: bf16 under autocast)"
            )
        try:
            recipe = Recipe.from_name(rung)
        except (TypeError, ValueError) as e:
            raise ValueError(f"demote_to rung {rung!r}: {e}") from None
        if recipe != Recipe.from_name(recipe.name):
            raise ValueError(
                f"demote_to rung {recipe.name!r} is a variant of fp8train's recipe of that "
                "name (dataclasses.replace); a layer is demoted to named recipes only (the "
                "recipe state saves the name)"
            )
        if recipe in rungs:
            raise ValueError(f"demote_to names recipe {recipe.name!r} twice")
        for name, layer in layers.items():
            if layer.fp8_state.base_recipe == recipe:
                raise ValueError(
                    f"demote_to rung {recipe.name!r} is the recipe layer {name!r} was "
                    "converted with: a demotion must change the layer's arithmetic; start "
                    "the ladder at a finer recipe"
                )
            reason = recipe.unsupported_reason(layer.in_features, layer.out_features)
            if reason is not None:
                raise ValueError(
                    f"demote_to rung {recipe.name!r} cannot run layer {name!r} of weight "
                    f"shape {tuple(layer.weight.shape)}: it needs {reason}"
                )
        rungs.append(recipe)
    return rungs


def _rung_label(rung: Rung) -> str:
    return HIGH_PRECISION if rung is None else rung.name


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Guard:
    """Watch FP8 training, name where it goes wrong, and act on it.

    ``Guard(model, optimizer, policy=...)`` then, per step, ``guard.step(closure)``
    where ``closure()`` runs forward and backward on the step's batch (through
    ``scaler.scale(loss)`` when a scaler is given) and returns the (unscaled) loss. The guard runs
    the optimizer step itself (``scaler.step``/``update`` when given, clipping to
    ``max_grad_norm`` when given) and zeroes the gradients. Fetch the batch *outside*
    the closure: the guard may call the closure twice for one step (to look closer at a
    triggered step), and must see the same batch both times. Loop on
    ``while guard.step_count < steps`` (a rollback moves it back).

    Policies (what happens when a trigger fires; every action lands in :attr:`events`
    and in the health log with its :class:`Diagnosis`):

    * ``"warn"``: log the diagnosis; the step goes on as usual;
    * ``"skip"``: drop the batch: no optimizer step, and the amax histories lose what
      the batch recorded (a batch that poisons the scales leaves no trace);
    * ``"demote"``: the culprit layer moves one rung down ``demote_to`` (default
      ``("high",)``: high precision; e.g. ``("rowwise", "high")``: a finer FP8 recipe
      first, high precision on its next trigger) from now on (``LayerState.demote``,
      part of the recipe state, so checkpoints keep it) and the step is run again that
      way before the optimizer steps;
    * ``"rollback"``: restore the latest snapshot (taken between steps, before every
      step number divisible by ``snapshot_every``: weights, optimizer, loss scaler,
      recipe state, ``data.state_dict()``, RNG), demote the culprit and replay from
      there. Needs ``data``, an object with ``state_dict()`` and ``load_state_dict()``
      that gives the position of the next batch (fetch each batch right before
      :meth:`step`).

    A trigger that names no culprit (no FP8 GEMM to blame) skips the batch under
    ``"demote"`` and ``"rollback"``; so does a culprit already on the ladder's last rung
    (no loop of rollbacks).

    ``demote_to`` (``"demote"`` and ``"rollback"`` only): the ladder, distinct named
    recipes then optionally ``"high"`` (the compute dtype), last. A layer on its
    converted recipe moves to the first rung, one on a rung to the next. Refused
    (``ValueError``) when a rung is a layer's own recipe or cannot take its shape.

    ``monitor``: an attached :class:`~fp8train.monitor.Monitor` to use (its GEMM check is
    switched on); the guard then calls its ``step()``, so the caller must not. Without
    one the guard makes its own: ``every`` (observed steps), ``jsonl``, ``sinks``.
    ``thresholds``: :class:`GuardThresholds`. ``process_group``: the group whose ranks
    must take one decision (default: the default group when torch.distributed is
    initialised); ``reduce_max`` replaces the collective (tests). ``start``: the step
    number to count from (resuming).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        policy: Policy = "warn",
        snapshot_every: int | None = None,
        data: Stateful | None = None,
        scaler: LossScaler | None = None,
        max_grad_norm: float | None = None,
        monitor: Monitor | None = None,
        every: int = DEFAULT_GUARD_EVERY,
        jsonl: str | Path | None = None,
        sinks: Sequence[Sink] = (),
        thresholds: GuardThresholds | None = None,
        process_group: Any = None,
        reduce_max: ReduceMax | None = None,
        start: int = 0,
        demote_to: Sequence[str | Recipe] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        if demote_to is not None and policy not in ("demote", "rollback"):
            raise ValueError(
                f"demote_to is the ladder of policies 'demote' and 'rollback', not "
                f"{policy!r}; leave it out"
            )
        if policy == "rollback":
            if not isinstance(snapshot_every, int) or snapshot_every < 1:
                raise ValueError(
                    f"policy 'rollback' needs snapshot_every, an int >= 1 (steps between "
                    f"snapshots), got {snapshot_every!r}"
                )
            if data is None:
                raise ValueError(
                    "policy 'rollback' needs data=, an object with state_dict() and "
                    "load_state_dict() giving the data position, so the replay sees the "
                    "same batches"
                )
        elif snapshot_every is not None:
            raise ValueError(
                f"snapshot_every is for policy 'rollback', not {policy!r}; leave it out"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if monitor is not None and (jsonl is not None or sinks):
            raise ValueError(
                "jsonl and sinks are for the guard's own monitor; with monitor= the "
                "guard writes to that monitor's sinks"
            )
        self.model = model
        self.optimizer = optimizer
        self.policy: Policy = policy
        self.snapshot_every = snapshot_every
        self.data = data
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.thresholds = thresholds if thresholds is not None else GuardThresholds()
        if monitor is None:
            monitor = Monitor(model, every, jsonl=jsonl, sinks=sinks, start=start, gemm_check=True)
            monitor.attach()
            self._own_monitor = True
        else:
            monitor.enable_gemm_check()
            self._own_monitor = False
        self.monitor = monitor
        self.step_count = monitor.step_count
        self._layer_names = [name for name, _ in fp8_layers(model)]
        self._layers = dict(fp8_layers(model))
        self.demote_to = _ladder(
            demote_to if demote_to is not None else (HIGH_PRECISION,), self._layers
        )
        self._scalars = ScalarTriggers(self.thresholds)
        self._baselines = GemmBaselines(self.thresholds)
        # (step, amax, scale_min) of each (layer, role) over the observed steps: evidence.
        self._history: dict[tuple[str, str], deque[tuple[int, float, float]]] = {}
        if reduce_max is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            reduce_max = all_reduce_max(process_group, device if device.type == "cuda" else None)
        self._reduce_max = reduce_max
        self._snapshot: _Snapshot | None = None
        if snapshot_every is not None and self.step_count % snapshot_every == 0:
            self._snapshot = _Snapshot(self, self.step_count)
        self.events: list[dict[str, Any]] = []  # every action, in order
        self.diagnoses: list[Diagnosis] = []
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the guard's own monitor (a monitor passed in stays open)."""
        if not self._closed and self._own_monitor:
            self.monitor.close()
        self._closed = True

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What the triggers have learnt, for a checkpoint: the loss and gradient-norm
        windows, each GEMM's error baseline and the amax evidence, at :attr:`step_count`
        (plain Python values). Demotions are not here: they are recipe state
        (``fp8train.recipe_state_dict``). Not kept: :attr:`events`, :attr:`diagnoses`
        (they are in the health log) and a rollback snapshot (a resumed guard takes one
        when its first step is due one)."""
        return {
            "format": _STATE_FORMAT,
            "step_count": self.step_count,
            "scalars": self._scalars.state_dict(),
            "baselines": self._baselines.state_dict(),
            "evidence": [
                [layer, role, [list(h) for h in hist]]
                for (layer, role), hist in self._history.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a guard at the same step (``start=``).
        ``ValueError`` before any change when it is of another step or malformed."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"guard state: expected a dict of format {_STATE_FORMAT}, got "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}"
            )
        if state.get("step_count") != self.step_count:
            raise ValueError(
                f"guard state is of step {state.get('step_count')!r}, this guard is at step "
                f"{self.step_count} (pass start= the step the run resumes at)"
            )
        scalars = ScalarTriggers(self.thresholds)
        baselines = GemmBaselines(self.thresholds)
        scalars.load_state_dict(state.get("scalars"))  # type: ignore[arg-type]
        baselines.load_state_dict(state.get("baselines", []))
        evidence: dict[tuple[str, str], deque[tuple[int, float, float]]] = {}
        entries = state.get("evidence", [])
        if not isinstance(entries, list):
            raise ValueError(f"guard state: amax evidence is malformed: {entries!r}")
        for entry in entries:
            try:
                layer, role, hist = entry
                rows = [(int(st), float(amax), float(scale)) for st, amax, scale in hist]
            except (TypeError, ValueError):
                raise ValueError(f"guard state: amax evidence is malformed: {entry!r}") from None
            evidence[(str(layer), str(role))] = deque(rows, maxlen=_EVIDENCE_LEN)
        self._scalars, self._baselines, self._history = scalars, baselines, evidence

    @property
    def demoted(self) -> list[str]:
        """The demoted FP8 layers, in model order (:attr:`demotions` says to what)."""
        return list(self.demotions)

    @property
    def demotions(self) -> dict[str, str]:
        """The demoted FP8 layers, in model order: name -> what each runs now (a recipe
        name, or ``"high"``)."""
        out = {}
        for name, m in self._layers.items():
            state = m.fp8_state
            if state.high_precision:
                out[name] = HIGH_PRECISION
            elif state.recipe != state.base_recipe:
                out[name] = state.recipe.name
        return out

    def next_rung(self, layer: str) -> tuple[bool, Rung]:
        """``(any left, rung)``: where a demotion moves ``layer`` from where it is now;
        ``(False, None)`` when it is on the ladder's last rung (or in high precision). A
        layer on a recipe that is not a rung (loaded from a checkpoint saved under
        another ladder) moves to ``"high"`` if the ladder has it."""
        state = self._layers[layer].fp8_state
        if state.high_precision:
            return False, None
        if state.recipe == state.base_recipe:
            return True, self.demote_to[0]
        if state.recipe in self.demote_to:
            i = self.demote_to.index(state.recipe) + 1
            return (True, self.demote_to[i]) if i < len(self.demote_to) else (False, None)
        return (True, None) if None in self.demote_to else (False, None)

    # ---------------------------------------------------------------------- step
    def step(self, closure: Callable[[], torch.Tensor | float]) -> float:
        """Run one training step (class docstring); returns its loss (a float)."""
        s = self.step_count
        pre_recipe, pre_rng = _recipe_state(self.model), _rng_state()
        counters = self._counters()
        loss, norm = self._run(closure)
        triggers = self._scalars.check(loss, norm)
        nonfinite, jumps = self._counter_events(counters)
        if nonfinite and (self.scaler is None or not self.scaler.enabled or math.isnan(loss)):
            # With a loss scaler, NaN/inf in a gradient alone is its business (overflow).
            triggers.append(
                ("nonfinite", "NaN/inf in " + ", ".join(f"{n}:{r}" for n, r in nonfinite))
            )
        if jumps:
            triggers.append(
                ("amax_jump", "amax jump in " + ", ".join(f"{n}:{r}" for n, r, _ in jumps))
            )
        errors = self.monitor.gemm_errors()
        out = [k for k, e in errors.items() if self._baselines.out(k, e)]
        if out:
            triggers.append(
                (
                    "gemm_error",
                    "GEMM error out of baseline in " + ", ".join(f"{n}:{g}" for n, g in out),
                )
            )
        (look,) = agree([int(bool(triggers))], self._reduce_max)
        if not look:
            self._optimizer_step()
            self._end_step(s, loss, norm, errors)
            return loss

        if not self.monitor.observing:
            # Look closer: the same step again, observed (same histories, same RNG).
            _load_recipe_state(self.model, pre_recipe)
            _set_rng_state(pre_rng)
            self.optimizer.zero_grad(set_to_none=True)
            self.monitor.observe_now()
            loss, norm = self._run(closure)
            nonfinite, jumps = self._counter_events(counters)
            errors = self.monitor.gemm_errors()
        if not triggers:
            triggers = [("other_rank", "another rank triggered")]
        diagnosis = localise(
            s,
            triggers,
            self._layer_names,
            errors,
            self._baselines,
            self.monitor.step_stats,
            nonfinite,
            jumps,
            self._history,
        )
        self.diagnoses.append(diagnosis)
        self.monitor.emit(diagnosis.as_record())
        action, culprit = self._decide(diagnosis)
        return self._act(s, action, culprit, diagnosis, pre_recipe, pre_rng, closure, loss, norm)

    # ----------------------------------------------------------------- internals
    def _advance(self, s: int) -> None:
        """Step ``s`` is done: count it, and snapshot when the next step is due one.
        Between steps, so that ``data.state_dict()`` is the position of the next batch
        (the caller fetches it before calling :meth:`step`)."""
        self.step_count = s + 1
        if self.snapshot_every is not None and self.step_count % self.snapshot_every == 0:
            self._snapshot = _Snapshot(self, self.step_count)

    def _counters(self) -> dict[str, Any]:
        return {
            name: (dict(m.fp8_state.nonfinite), m.fp8_state.amax_jump_count)
            for name, m in self._layers.items()
        }

    def _counter_events(
        self, before: dict[str, Any]
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str, float]]]:
        """``(layer, role)`` whose non-finite counter rose, and ``(layer, role, ratio)``
        of the amax jumps since ``before``."""
        nonfinite, jumps = [], []
        for name, m in self._layers.items():
            counts, njumps = before[name]
            state = m.fp8_state
            nonfinite += [(name, r) for r, n in state.nonfinite.items() if n > counts.get(r, 0)]
            new = min(state.amax_jump_count - njumps, len(state.amax_jumps))
            if new > 0:
                for j in list(state.amax_jumps)[-new:]:
                    jumps.append((name, j.role, j.ratio))
        return nonfinite, jumps

    def _run(self, closure: Callable[[], torch.Tensor | float]) -> tuple[float, float]:
        """The closure's loss and the gradient norm (unscaled, before clipping)."""
        loss = closure()
        loss_f = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if self.scaler is not None and self.scaler.enabled:
            norm /= self.scaler.get_scale()  # the closure's backward ran on the scaled loss
        return loss_f, norm

    def _optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            if self.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_step(
        self, s: int, loss: float, norm: float, errors: dict[tuple[str, str], float]
    ) -> None:
        """A healthy step: values join the windows and baselines; the monitor records."""
        self._scalars.end_step(loss, norm)
        if errors:
            self._baselines.update(s, errors)
        self._note_history(s)
        self._monitor_step(loss, norm)
        self._advance(s)

    def _note_history(self, s: int) -> None:
        for key, st in self.monitor.step_stats.items():
            if st.calls > st.nonfinite_calls:
                hist = self._history.setdefault(key, deque(maxlen=_EVIDENCE_LEN))
                hist.append((s, st.amax, st.scale_min))

    def _monitor_step(self, loss: float, norm: float, skipped: bool = False) -> None:
        scale = self.scaler.get_scale() if self.scaler is not None else None
        if self.scaler is not None and self.scaler.enabled and not skipped:
            skipped = self.scaler.last_step_skipped
        self.monitor.step(loss, grad_norm=norm, loss_scale=scale, skipped=skipped)

    def _decide(self, diagnosis: Diagnosis) -> tuple[str, str | None]:
        """The action every rank takes, and the culprit layer it takes it on."""
        culprit = diagnosis.layer
        action: str = self.policy
        if self.policy in ("demote", "rollback"):
            if culprit is None or not self.next_rung(culprit)[0]:
                action = "skip"  # nothing to demote it to: drop the batch
            elif self.policy == "rollback" and self._snapshot is None:
                action = "demote"
        n = len(self._layer_names)
        index = self._layer_names.index(culprit) if culprit is not None else n
        # Max over ranks: the most severe action; the earliest culprit (n - index largest).
        code, rank_culprit = agree([_ACTIONS.index(action), n - index], self._reduce_max)
        agreed = None if rank_culprit == 0 else self._layer_names[n - rank_culprit]
        return _ACTIONS[code], agreed

    def _act(
        self,
        s: int,
        action: str,
        culprit: str | None,
        diagnosis: Diagnosis,
        pre_recipe: dict[str, Any],
        pre_rng: dict[str, Any],
        closure: Callable[[], torch.Tensor | float],
        loss: float,
        norm: float,
    ) -> float:
        event: dict[str, Any] = {
            "step": s,
            "kind": "guard",
            "action": action,
            "layer": culprit,
            "reason": diagnosis.message,
            "triggers": list(diagnosis.triggers),
        }
        if action in ("demote", "rollback") and culprit is None:
            action = event["action"] = "skip"
        if action == "warn":
            log.warning("fp8train guard: %s", diagnosis.message)
            self._optimizer_step()
            self._record(event)
            self._end_step(s, loss, norm, {})
            return loss
        if action == "skip":
            _load_recipe_state(self.model, pre_recipe)  # what the batch recorded, undone
            self.optimizer.zero_grad(set_to_none=True)
            self._record(event)
            self._monitor_step(loss, norm, skipped=True)
            self._advance(s)
            return loss
        assert culprit is not None  # narrowed above
        # Where the culprit goes, from where it is now (a rollback's snapshot may hold it
        # on an earlier rung: the ladder only moves down).
        more, rung = self.next_rung(culprit)
        if not more:  # another rank named a layer this rank has nowhere to move
            raise RuntimeError(
                f"guard: layer {culprit!r} has no rung left on demote_to "
                f"{[_rung_label(r) for r in self.demote_to]} but the ranks agreed to demote "
                "it: the ranks' recipe states differ"
            )
        event["to"] = _rung_label(rung)
        if action == "demote":
            _load_recipe_state(self.model, pre_recipe)
            self._layers[culprit].fp8_state.demote(rung)
            _set_rng_state(pre_rng)
            self.optimizer.zero_grad(set_to_none=True)
            loss, norm = self._run(closure)
            self._optimizer_step()
            self._record(event)
            self._end_step(s, loss, norm, {})
            return loss
        # rollback
        snap = self._snapshot
        assert snap is not None  # _decide demotes instead when there is none
        self.optimizer.zero_grad(set_to_none=True)
        snap.restore(self)
        self._layers[culprit].fp8_state.demote(rung)
        event["to_step"] = snap.step
        self._record(event)
        self.monitor.restart_at(snap.step)
        self.step_count = snap.step
        # Snapshot again with the culprit demoted: a later rollback keeps the demotion.
        self._snapshot = _Snapshot(self, snap.step)
        return loss

    def _record(self, event: dict[str, Any]) -> None:
        where = f" layer {event['layer']!r}" if event["layer"] else ""
        if "to" in event:
            where += f" to {event['to']}"
        to = f" to step {event['to_step']}" if "to_step" in event else ""
        event["message"] = f"step {event['step']}: {event['action']}{where}{to}: {event['reason']}"
        log.info("fp8train guard: %s", event["message"])
        self.events.append(event)
        self.monitor.emit(event)
