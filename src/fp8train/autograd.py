"""The FP8 linear: one forward GEMM and two backward GEMMs in one autograd function.

Shapes: ``x (..., K)`` is viewed as ``x2d (M, K)``; ``W (N, K)``; ``dy (M, N)``.

* output      ``y  = x2d . W^T``  -- a: input (M, K),         b: weight^T (K, N)
* grad_input  ``dx = dy . W``     -- a: grad_output (M, N),   b: weight (N, K), contracts N
* grad_weight ``dW = dy^T . x2d`` -- a: grad_output^T (N, M), b: input (M, K), contracts M

Why three GEMMs, each written out: every GEMM contracts its own axis, and a scale
(per row, per 1x128 tile, per MX block) belongs to the axis it was taken along. Each
operand is therefore quantised for the GEMM that reads it, by one helper
(:meth:`_Step.quantize`: tensor, spec, role), right before that GEMM. Where a backward
GEMM contracts the other axis of a tensor than the forward did, that tensor is
quantised again along the new axis (role ``"weight.t"``, ``"input.t"``,
``"grad_output.t"``), unless its scales do not depend on the axis (one per tensor, or
square tiles) and the forward's quantisation is reused as is:

* the weight is re-quantised from the high-precision master weight (exact: no double
  rounding);
* the input from what was saved for backward. With ``save_fp8_activations`` that is the
  forward's FP8 payload, dequantised and re-quantised: with power-of-two scales an FP8
  value re-scaled by a power of two is again an FP8 value unless it drops into the
  subnormal range of the new scale (it then loses low mantissa bits) or, for MX's floor
  rule, saturates. So the weight gradient sees the input rounded twice in those corners;
  ``save_fp8_activations=False`` saves the input in high precision (what
  ``Recipe.quantize_from`` names) and avoids it.

A non-finite operand (NaN/inf: a bad input, or a loss-scale overflow in ``dy``) never
produces a scale and never enters an amax history: the GEMM that reads it runs in high
precision, so the NaN/inf propagates to the output or gradient where the loss scaler
sees it, and the layer reports it by name. A step (the forward, or the backward) records
its delayed-scaling amaxes only once every amax it took is known to be finite, so a bad
tensor leaves no half-updated state behind.

Activation checkpointing (``torch.utils.checkpoint``, reentrant or not) runs a forward a
second time inside backward. That recompute quantises with exactly the scales of the
forward it recomputes and records nothing (no history, no observer), so delayed scaling
is bitwise equal with and without checkpointing, as current scaling is by construction
(:class:`LayerState` says how the two forwards are matched).

Data-parallel wrappers meet the layer through :class:`DistributedHooks`
(``LayerState.distributed``), implemented by :mod:`fp8train.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from fp8train._kernels import Kernels, shared_kernels
from fp8train.cast import unpack_e2m1
from fp8train.formats import E2M1, Format
from fp8train.history import AmaxHistory
from fp8train.matmul import autocast_off, gemm_dtype, scaled_mm
from fp8train.recipes import Recipe
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    apply_scale_and_cast,
    scale_from_amax,
)
from fp8train.tensor import ScaledTensor

__all__ = [
    "AmaxJump",
    "AmaxJumpWarning",
    "DistributedHooks",
    "LayerState",
    "NonFiniteWarning",
    "amax_jump_limit",
    "fp8_linear",
]

log = logging.getLogger("fp8train")

# Observer signature: (layer_state, role, high-precision tensor, scaled tensor or None).
Observer = Callable[["LayerState", str, torch.Tensor, "ScaledTensor | None"], None]


class NonFiniteWarning(RuntimeWarning):
    """A layer met NaN/inf in an operand; no scale or history was updated."""


class AmaxJumpWarning(RuntimeWarning):
    """A delayed-scaling operand's amax jumped so far above its history window that the
    scales of the next steps flush values of the earlier size to zero
    (:func:`amax_jump_limit`)."""


def amax_jump_limit(fmt: Format) -> float:
    """The largest ``new amax / window amax`` a delayed history of ``fmt`` absorbs:
    ``fmt.max / fmt.min_subnormal`` (E4M3 ``2**17.8``, about 2.3e5; E5M2 about 3.8e9;
    INT8 127), the format's dynamic range.

    Why: once an amax ``a`` enters the window, the scale is at most ``fmt.max / a``
    (a margin or rounding down to a power of two only lower it), so a value ``v``
    lands at most at ``v * fmt.max / a``. For ``a / p`` beyond this ratio, ``p`` (the
    window's amax before ``a``, the size the operand had) lands below
    ``fmt.min_subnormal``: a tensor like the earlier ones quantises to zeros (or at
    most one code) for as long as ``a`` stays in the window (``history_len`` steps for
    ``"max"``). A smaller jump keeps at least the earlier tensors' largest values.
    """
    return fmt.max / fmt.min_subnormal


class AmaxJump(NamedTuple):
    """One :class:`AmaxJumpWarning` event, kept on :attr:`LayerState.amax_jumps`."""

    role: str
    history_step: int  # the index of the record that holds the new amax (0-based)
    amax: float  # the new amax
    window_amax: float  # the window's amax before it (what the scale came from)
    limit: float  # amax_jump_limit of the operand's format

    @property
    def ratio(self) -> float:
        """``amax / window_amax``; inf when the window held only zeros (an operand that
        was all zero for a whole window: its scale came from the amax floor)."""
        return self.amax / self.window_amax if self.window_amax > 0 else float("inf")


# How many amax jump events each layer keeps for a monitor to read (a count is kept too).
_JUMP_EVENTS_KEPT = 64


class DistributedHooks(Protocol):
    """How a data-parallel wrapper meets an FP8 layer (fp8train.distributed implements it)."""

    def reduce_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The max of ``amax`` over the ranks, so that every rank records the same delayed
        history (and a NaN/inf on one rank is seen by all). Called for every operand that
        has an amax history, before its amax is checked and recorded."""
        ...

    @property
    def stream_rank(self) -> int:
        """This rank's index in the group, folded into the layer's random streams so that
        the ranks' stochastic rounding and Hadamard signs are independent draws."""
        ...

    def gathered(self, weight: torch.Tensor) -> tuple[ScaledTensor, torch.Tensor] | None:
        """``(quantised weight, the amax its scales came from)`` if FSDP2 already
        all-gathered ``weight`` in FP8 (cast with ``recipe.weight``, its delayed history
        recorded before the gather), else None."""
        ...


# How many forwards per layer keep their scales for a recompute (see LayerState). A
# checkpointed forward's entry is taken by its recompute in the same backward, so a few
# suffice; the bound only caps what forwards never recomputed (no checkpointing,
# evaluation) leave behind until the next optimizer step prunes them.
_REPLAY_LIMIT = 64


class _Replay(NamedTuple):
    """What a recompute of one forward needs: the key that finds it, and its scales."""

    weight_version: int  # weight._version at the forward (an optimizer step bumps it)
    input_amax: torch.Tensor  # the input's amax (this rank's, before any reduction)
    scales: dict[str, torch.Tensor]  # role -> the scale the forward used


def _in_backward() -> bool:
    """Whether this thread runs inside an autograd backward pass, as a checkpoint's
    recompute does (non-reentrant: in a saved-tensor unpack hook; reentrant: in
    ``CheckpointFunction.backward``). torch.utils.checkpoint asks the same question."""
    return bool(torch._C._current_graph_task_id() != -1)


class LayerState:
    """Per-layer recipe state: the layer's name, delayed-scaling histories, counters.

    Owned by the module; updated during forward and backward, no extra call needed.
    ``distributed``: set by a data-parallel wrapper (:class:`DistributedHooks`); None on
    one process.

    History step: each forward of the layer records one amax per forward operand
    (``input``, ``weight``) and each backward one per backward operand
    (``grad_output``). So a layer called twice per optimizer step (gradient
    accumulation over micro-batches, or a layer shared by two places in the model)
    records twice per optimizer step, in call order, and its window of ``history_len``
    amaxes spans ``history_len`` calls, not optimizer steps.

    Activation checkpointing is not a second forward: its recompute (a forward run
    inside backward) takes the scales the original forward used and records nothing.
    Every forward of a layer with delayed histories keeps its scales, keyed by the
    weight's version counter and the input's amax; a forward inside backward looks its
    input's amax up among the entries of the current weight version (a recompute sees
    bitwise the inputs and weight of its forward) and replays the first match. Entries
    of an older weight version (an optimizer step ran since) are dropped, and at most
    ``_REPLAY_LIMIT`` are kept. A forward inside backward that matches no entry is not
    a recompute and runs as any forward.
    """

    ROLES = ("input", "weight", "grad_output")

    def __init__(self, name: str, recipe: Recipe, kernels: Kernels | None = None) -> None:
        self.name = name
        # ``recipe`` runs the GEMMs; ``base_recipe`` is the one the layer was converted
        # with. They differ after a demotion to a finer recipe (:meth:`demote`), which is
        # part of the recipe state.
        self.base_recipe = recipe
        self.recipe = recipe
        self.kernels = kernels or Kernels("eager")
        self.histories: dict[str, AmaxHistory] = self._new_histories(recipe)
        self.nonfinite: dict[str, int] = {r: 0 for r in self.ROLES}
        # A per-layer override (fp8train.Guard's "demote"): True runs all three GEMMs in
        # the compute dtype, quantising and recording nothing. Part of the recipe state.
        self.high_precision = False
        self.observer: Observer | None = None
        self.distributed: DistributedHooks | None = None
        self._replays: deque[_Replay] = deque(maxlen=_REPLAY_LIMIT)
        # AmaxJumpWarning events: how many so far, and the latest ones (for a monitor).
        self.amax_jump_count = 0
        self.amax_jumps: deque[AmaxJump] = deque(maxlen=_JUMP_EVENTS_KEPT)
        # Backward passes run so far, for recipes that draw random numbers (stochastic
        # rounding, Hadamard signs): each backward's streams are seeded from the layer's
        # name, the role and this count, so they depend on nothing outside the layer's
        # state, and a run resumed from a checkpoint (which saves it) draws the numbers
        # the uninterrupted run would have.
        self.random_steps = 0

    @property
    def draws_random(self) -> bool:
        """Whether the recipe draws random numbers (stochastic rounding or the Hadamard
        transform's signs), so that ``random_steps`` is counted and saved."""
        r = self.recipe
        specs = (r.input, r.weight, r.grad_output)
        return r.hadamard_wgrad or any(s.rounding == "stochastic" for s in specs)

    def generator(self, role: str, step: int, device: torch.device) -> torch.Generator:
        """The random stream of ``role`` in backward number ``step``: a generator on
        ``device`` seeded from (layer name, role, step), independent of torch's global
        random state and of every other layer, role and step. Under a data-parallel
        wrapper the rank joins the seed (rank 0 keeps the single process's streams), so
        that ranks quantising different rows do not repeat each other's draws."""
        rank = self.distributed.stream_rank if self.distributed is not None else 0
        key = f"{self.name}\0{role}\0{step}" + (f"\0rank {rank}" if rank else "")
        seed = zlib.crc32(key.encode())
        return torch.Generator(device=device).manual_seed(seed)

    @classmethod
    def _new_histories(cls, recipe: Recipe) -> dict[str, AmaxHistory]:
        if recipe.scaling != "delayed":
            return {}
        return {r: AmaxHistory(recipe.history_len, recipe.history_algo) for r in cls.ROLES}

    def demote(self, to: Recipe | None) -> None:
        """Run this layer under ``to`` from the next forward on, or in high precision
        (``to=None``: :attr:`high_precision`). A new recipe starts with empty amax
        histories (the old recipe's describe other scales); the non-finite counters stay.
        Between steps only: a backward pending from a forward under the old recipe would
        mix the two."""
        if to is None:
            self.high_precision = True
            return
        self.recipe = to
        self.histories = self._new_histories(to)
        self._replays.clear()

    def gemm_label(self, gemm: str) -> str:
        """How log lines name one of this layer's GEMMs ("output", "grad_input",
        "grad_weight")."""
        return f"layer {self.name!r} {gemm} GEMM"

    def remember_scales(
        self, weight: torch.Tensor, input_amax: torch.Tensor, scales: dict[str, torch.Tensor]
    ) -> None:
        """Keep a forward's scales for its recompute (see the class docstring)."""
        version = weight._version
        while self._replays and self._replays[0].weight_version != version:
            self._replays.popleft()
        self._replays.append(_Replay(version, input_amax, scales))

    def replayed_scales(
        self, weight: torch.Tensor, input_amax: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The scales of the forward that this recompute repeats, taken out of the
        store; None if no kept forward matches."""
        for entry in self._replays:
            if entry.weight_version == weight._version and torch.equal(
                entry.input_amax, input_amax
            ):
                self._replays.remove(entry)
                return entry.scales
        return None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "histories": {r: h.state_dict() for r, h in self.histories.items()},
            "nonfinite": dict(self.nonfinite),
        }
        if self.high_precision:  # only when set: other checkpoints keep their keys
            state["high_precision"] = True
        if self.recipe != self.base_recipe:  # a demotion to a finer recipe (by name)
            state["demoted_to"] = {
                "recipe": self.recipe.name,
                "recipe_config": self.recipe.canonical(),
            }
        if self.draws_random:  # only for such recipes: other checkpoints keep their keys
            state["random_steps"] = self.random_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recipe = demoted_recipe(state.get("demoted_to"), f"layer {self.name!r}")
        recipe = self.base_recipe if recipe is None else recipe
        if recipe != self.recipe:
            self.recipe = recipe
            self.histories = self._new_histories(recipe)
            self._replays.clear()
        if set(state["histories"]) != set(self.histories):
            raise ValueError(
                f"layer {self.name}: checkpoint has amax histories for "
                f"{sorted(state['histories'])}, recipe {self.recipe.name!r} keeps "
                f"{sorted(self.histories)}"
            )
        for role, h in state["histories"].items():
            self.histories[role].load_state_dict(h)
        self.nonfinite.update(state.get("nonfinite", {}))
        self.high_precision = bool(state.get("high_precision", False))
        self.random_steps = int(state.get("random_steps", 0))

    def report_nonfinite(self, role: str, shape: torch.Size) -> None:
        self.nonfinite[role] += 1
        msg = (
            f"fp8train: layer {self.name!r}: {role} of shape {tuple(shape)} holds NaN/inf; "
            "no scale or amax history was updated and this GEMM ran in high precision"
        )
        if role == "grad_output":
            # The usual cause is a loss-scale overflow, which the loss scaler handles.
            log.info(msg)
        else:
            warnings.warn(msg, NonFiniteWarning, stacklevel=4)

    def report_amax_jump(self, jump: AmaxJump) -> None:
        self.amax_jump_count += 1
        self.amax_jumps.append(jump)
        h = self.histories[jump.role]
        warnings.warn(
            f"fp8train: layer {self.name!r}: {jump.role} amax {jump.amax:.4g} at history "
            f"step {jump.history_step} is {jump.ratio:.3g} times the "
            f"window's amax {jump.window_amax:.4g}, beyond what the format's range holds "
            f"alongside it ({jump.limit:.3g}): while it stays in the amax history "
            f"({h.length} steps, {h.algo!r}), values of the earlier size quantise to zero. "
            "Usually one outlier in the data; check the batch of that step.",
            AmaxJumpWarning,
            stacklevel=5,
        )


def demoted_recipe(entry: object, where: str) -> Recipe | None:
    """The recipe a saved ``"demoted_to"`` entry names (None for no entry).

    A demotion is saved as the recipe's name and :meth:`Recipe.canonical`; it is
    rebuilt with :meth:`Recipe.from_name`, so only named recipes (not
    ``dataclasses.replace`` variants) can be demoted to. Raises ``ValueError`` naming
    ``where`` for anything else."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) != {"recipe", "recipe_config"}:
        raise ValueError(
            f"{where}: 'demoted_to' must be a dict with keys ['recipe', 'recipe_config'] "
            f"(the recipe the layer was demoted to), got {entry!r}"
        )
    try:
        recipe = Recipe.from_name(entry["recipe"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: 'demoted_to': {e}") from None
    if entry["recipe_config"] != recipe.canonical():
        raise ValueError(
            f"{where}: 'demoted_to' names recipe {recipe.name!r} with other parameters "
            f"than fp8train's {recipe.name!r} ({entry['recipe_config']!r}); a layer is "
            "demoted to named recipes only"
        )
    return recipe


def _reusable_transposed(spec: ScaleSpec) -> bool:
    """Whether contracting the other axis can reuse this quantisation unchanged."""
    g = spec.granularity
    return g is Granularity.TENSOR or (g is Granularity.BLOCK and spec.block[0] == spec.block[1])


def _scale(amax: torch.Tensor, spec: ScaleSpec, history: AmaxHistory | None) -> torch.Tensor:
    """The scale of an operand whose amax (finite) is ``amax``: from ``amax`` itself for
    current scaling and on delayed scaling's first step, else from the history's window of
    *earlier* amaxes. Records nothing."""
    return scale_from_amax(amax if history is None or history.empty else history.reduced(), spec)


def operand_scale(
    amax: torch.Tensor, spec: ScaleSpec, role: str, state: LayerState
) -> torch.Tensor:
    """The scale of an operand whose amax (finite) is ``amax``.

    Current scaling: from ``amax`` itself. Delayed: from the window of *earlier* amaxes
    (``amax`` itself on the very first step), then ``amax`` is recorded.
    """
    history = state.histories.get(role)
    scale = _scale(amax, spec, history)
    if history is not None:
        history.record(amax)
    return scale


def _work_dtype(out_dtype: torch.dtype, device: torch.device, *specs: ScaleSpec) -> torch.dtype:
    """The dtype the emulated GEMM runs in (fp8train.matmul.gemm_dtype): bf16 when the
    output is bf16, every scale a power of two and bf16 GEMMs native on ``device``."""
    return gemm_dtype(out_dtype, all(s.scales_are_power_of_two for s in specs), device.type)


class _Quantized(NamedTuple):
    """One operand quantised by :meth:`_Step.quantize`, waiting for :meth:`_Step.commit`."""

    role: str
    tensor: torch.Tensor
    scaled: ScaledTensor
    record: torch.Tensor | None  # the amax its delayed history records, if it has one


class _Step:
    """The operands of one layer step (the forward, or the backward), quantised one by
    one right before their GEMM by :meth:`quantize`, and what the step changes in the
    layer's state, done by :meth:`commit` once every amax of the step was finite.

    Why deferred: a delayed history must not record one operand's amax when another of
    the same step turns out NaN/inf (the step is bad, and a later step must see the
    histories as they were); the observer likewise sees a step's operands only when all
    are finite, and otherwise only the bad ones (with ``None``).
    """

    def __init__(
        self,
        state: LayerState,
        kernels: Kernels,
        replay: dict[str, torch.Tensor] | None = None,
        random_step: int = 0,
    ) -> None:
        self.state = state
        self.kernels = kernels
        # Which backward this is, for the seeded streams of stochastic rounding.
        self.random_step = random_step
        # A checkpoint's recompute: the scales of the forward it repeats, by role. Such a
        # step quantises with them and changes no state (no record, no observer).
        self.replay = replay
        self.finite = True
        self.done: list[_Quantized] = []
        self.local_amax: dict[str, torch.Tensor] = {}  # by role, before any reduction
        self.jumps: list[AmaxJump] = []  # reported by commit()

    def quantize(
        self,
        t: torch.Tensor,
        spec: ScaleSpec,
        role: str,
        work: torch.dtype,
        keep_payload: bool,
    ) -> ScaledTensor | None:
        """``t`` (2-D, high precision) quantised with ``spec`` for a GEMM that reads it
        in ``work``; None (reported by role) if ``t`` holds NaN/inf.

        amax -> scale -> cast. Current scaling takes amax, scale and cast in one fused
        kernel call, and so does delayed scaling once its history holds an amax (the
        scale comes from the window, so the cast needs no amax first); delayed scaling's
        first step and stochastic rounding take the amax, check it, then scale and cast
        (stochastic rounding stays eager: its random stream must be the eager one). The
        fused call's outputs are discarded unseen if the amax is not finite.

        ``keep_payload``: whether backward keeps the FP8 payload. Payloads are made for
        that, for an observer, and off the CPU (where ``torch._scaled_mm`` reads them);
        the CPU's emulated GEMM reads only the operand, and any other
        ``ScaledTensor.data`` is derived from it when first read (the same bits).
        """
        state, kernels = self.state, self.kernels
        keep = keep_payload or state.observer is not None or not t.is_cpu
        history = state.histories.get(role)
        hooks = state.distributed
        gathered = hooks.gathered(t) if hooks is not None and role == "weight" else None
        given = None if self.replay is None else self.replay.get(role)
        window_amax: torch.Tensor | None = None  # the history's amax, for the jump check
        q: ScaledTensor | None = None
        # (scale, payload, operand) of a fused call, wrapped only once the amax is known
        # finite: an E2M1 payload is packed on wrapping, and NaN has no E2M1 code.
        made: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        if gathered is not None:
            # FSDP2 all-gathered the weight in FP8: cast, and its amax reduced over the
            # ranks and recorded, before the gather. Only the check is left.
            q, amax = gathered
            history = None
        elif given is not None:
            # A recompute: its forward's scale, and nothing to record.
            history = None
            if spec.rounding == "nearest":
                amax, scale, payload, operand = kernels.quantize_given(t, given, spec, work, keep)
                made = (scale, payload, operand)
            else:
                amax = kernels.amax(t, spec)
        elif spec.rounding == "nearest" and (history is None or not history.empty):
            # A delayed history's scale is known before the cast: the kernel takes the
            # amax alongside it (for the check and the record).
            if history is None:
                amax, scale, payload, operand = kernels.quantize_current(t, spec, work, keep)
            else:
                # The window's reduction and the scale join the cast's kernel call.
                amax, scale, payload, operand, window_amax = kernels.quantize_from_window(
                    t, history.to_reduce(), spec, work, keep
                )
            made = (scale, payload, operand)
        else:
            amax = kernels.amax(t, spec)
        self.local_amax[role] = amax
        if hooks is not None and history is not None:
            # The max over ranks, before the check, so that all ranks record (or skip on
            # NaN/inf) the same values.
            amax = hooks.reduce_amax(amax)

        finite_t = torch.isfinite(amax).all()
        if history is not None and not history.empty and window_amax is None:
            window_amax = history.reduced()  # stochastic rounding: not taken by a kernel
        if history is not None and window_amax is not None:
            # The amax jump check (amax_jump_limit), fetched with the finite check in
            # one device sync.
            limit = amax_jump_limit(spec.fmt)
            window = window_amax.amax()
            flags = torch.stack([finite_t, amax.amax() > window * limit]).tolist()
            finite, jumped = bool(flags[0]), bool(flags[1])
            if finite and jumped:
                self.jumps.append(
                    AmaxJump(role, history.count, float(amax.amax()), float(window), limit)
                )
        else:
            finite = bool(finite_t)
        if not finite:
            self.finite = False
            state.report_nonfinite(role.split(".")[0], t.shape)
            if state.observer is not None:
                state.observer(state, role, t, None)
            return None

        if made is not None:
            q = ScaledTensor(made[1], made[0], spec, t.dtype, made[2])
        if q is None:  # scaled only now that the amax is known finite
            scale = given if given is not None else _scale(amax, spec, history)
            if spec.rounding == "nearest":
                payload, operand = kernels.cast_with_operand(t, scale, spec, work, keep)
            else:
                rng = state.generator(role, self.random_step, t.device)
                payload, operand = apply_scale_and_cast(t, scale, spec, rng), None
                if spec.fmt is E2M1 and not keep:
                    # As the fused kernels do: the operand, and no packing of bytes that
                    # nothing keeps (ScaledTensor derives them from it if asked).
                    operand = kernels.payload_to_operand(payload, scale, spec, work)
                    payload = None
            q = ScaledTensor(payload, scale, spec, t.dtype, operand)
        self.done.append(_Quantized(role, t, q, amax if history is not None else None))
        return q

    def commit(self) -> None:
        """If every amax of the step was finite: record the delayed histories and show
        each operand to the observer, in the order they were quantised."""
        if not self.finite or self.replay is not None:
            return
        state = self.state
        for role, t, q, amax in self.done:
            if amax is not None:
                state.histories[role].record(amax)
            if state.observer is not None:
                state.observer(state, role, t, q)
        for jump in self.jumps:
            state.report_amax_jump(jump)


# Scale grids whose format is one byte per block are kept for backward as bytes, so that
# what is saved costs what such a format costs, not 4 bytes per block; the backward reads
# the same fp32 bits back. MX (E8M0): the scales are powers of two from 2^-125 to 2^127,
# all normal in fp32, so a scale's exponent byte is its E8M0 code. NVFP4 (E4M3 block
# scales under one fp32 tensor scale): at most 256 distinct fp32 values per tensor, kept
# as a byte per block indexing a table of them (a sort per saved grid).
_MAX_TABLE = 256
_FP32_FRACTION_BITS = 23


def _compact_scale(
    scale: torch.Tensor | None, spec: ScaleSpec
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(saved, table)`` for ``scale``: E8M0 codes for MX, codes into an fp32 table for
    two-level scales, else ``(scale, None)``."""
    if scale is None:
        return None, None
    if spec.granularity is Granularity.MX:
        exponent = scale.view(torch.int32) >> _FP32_FRACTION_BITS  # sign 0, fraction 0
        return exponent.to(torch.uint8), None
    if spec.scale_fmt is not None:
        table, codes = torch.unique(scale, return_inverse=True)
        if table.numel() <= _MAX_TABLE:  # always, for E4M3 block scales
            return codes.to(torch.uint8), table
    return scale, None


def _expand_scale(
    saved: torch.Tensor | None, table: torch.Tensor | None, spec: ScaleSpec
) -> torch.Tensor | None:
    """The scale grid :func:`_compact_scale` saved, bit for bit."""
    if saved is None or saved.dtype != torch.uint8:
        return saved
    if table is not None:
        return table[saved.long()]
    assert spec.granularity is Granularity.MX  # the only other byte form
    return (saved.to(torch.int32) << _FP32_FRACTION_BITS).view(torch.float32)


def _saved_input(
    ctx: Any, x_saved: torch.Tensor, x_scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The input ``(M, K)`` in ``dtype`` from what the forward saved: its FP8 payload
    dequantised, or its compute-dtype copy."""
    if ctx.fp8_saved:
        spec = ctx.state.recipe.input
        values = _payload_values(x_saved, spec, ctx.in_shape[-1])
        x: torch.Tensor = ctx.kernels.payload_to_operand(values, x_scale, spec, dtype)
        return x
    return x_saved.to(dtype)


def _payload_values(stored: torch.Tensor, spec: ScaleSpec, cols: int) -> torch.Tensor:
    """A payload kept for backward as the kernels read it: E2M1's packed bytes
    (``ScaledTensor.stored``) unpacked to fp32 values, any other payload as it is."""
    return unpack_e2m1(stored, cols) if spec.fmt is E2M1 else stored


# The 16x16 Sylvester Hadamard matrix (entries +-1); divided by 4 it is orthogonal, and
# the division is exact.
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_HADAMARD_SIZE = 16
_HADAMARD = _sylvester(_HADAMARD_SIZE)


def hadamard_matrix(signs: torch.Tensor) -> torch.Tensor:
    """The random Hadamard transform ``H diag(signs) / 4`` (16x16, fp32): ``H`` the
    Sylvester Hadamard matrix, ``signs`` a vector of +-1. Orthogonal: its transpose is
    its inverse, exactly up to fp32 rounding of the products (every entry is +-1/4)."""
    return (_HADAMARD.to(signs.device) * signs.float()[None, :]) / 4


def random_signs(state: LayerState, step: int, device: torch.device) -> torch.Tensor:
    """The Hadamard transform's sign vector of backward number ``step`` (16 values of
    +-1, fp32) from the layer's seeded stream."""
    g = state.generator("hadamard", step, device)
    bits = torch.randint(0, 2, (_HADAMARD_SIZE,), generator=g, device=device)
    return (bits * 2 - 1).float()


def hadamard_tokens(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``t (M, C)`` transformed along its rows (the tokens) in groups of 16 by ``h``:
    row group ``g`` becomes ``h @ t[g]``, in fp32. M is padded with zero rows to a
    multiple of 16 first (the result has ``ceil(M / 16) * 16`` rows): ``a^T b`` of two
    tensors transformed with the same ``h`` equals ``a^T b`` of the padded originals,
    whose extra rows add nothing."""
    m, c = t.shape
    pad = (-m) % _HADAMARD_SIZE
    t32 = t.float()
    if pad:
        t32 = torch.nn.functional.pad(t32, (0, 0, 0, pad))
    groups = t32.reshape(-1, _HADAMARD_SIZE, c)  # (M/16, 16, C)
    return torch.matmul(h, groups).reshape(-1, c)  # (Mp, C)


def _has_fp4(recipe: Recipe) -> bool:
    return any(s.fmt is E2M1 for s in (recipe.input, recipe.weight, recipe.grad_output))


@functools.cache
def _announce_fp4_eager(mode: str) -> None:
    log.info(
        "fp8train: FP4 (E2M1) layers run the eager reference kernels, not kernels=%r: the "
        "fused kernels are not checked bitwise for packed E2M1 payloads and two-level "
        "scales",
        mode,
    )


def _kernels_for(recipe: Recipe, kernels: Kernels) -> Kernels:
    """The kernel set a layer step runs: FP4 recipes take the eager one (logged once)."""
    if kernels.mode == "eager" or not _has_fp4(recipe):
        return kernels
    _announce_fp4_eager(kernels.mode)
    return shared_kernels("eager")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: LayerState,
        kernels: Kernels,
    ) -> torch.Tensor:
        recipe = state.recipe
        out_dtype = _compute_dtype(x)
        in_shape = x.shape
        # What backward keeps in FP8 (so only these payloads are made): x, if the recipe
        # saves activations in FP8; W, if the grad_input GEMM reuses it as is.
        keep_x = recipe.save_fp8_activations and recipe.fp8_wgrad
        keep_w = _reusable_transposed(recipe.weight) and recipe.fp8_dgrad
        with autocast_off(x.device.type):
            x2d = x.reshape(-1, in_shape[-1])  # (M, K)
            # What x is quantised from (Recipe.quantize_from): as it arrives, or rounded
            # to the compute dtype first.
            x_q = x2d if recipe.quantize_from == "input" else x2d.to(out_dtype)
            replay = None
            if state.histories and _in_backward():
                # Perhaps a checkpoint's recompute (LayerState: how it is recognised).
                replay = state.replayed_scales(weight, kernels.amax(x_q, recipe.input))
            step = _Step(state, kernels, replay)
            work = _work_dtype(out_dtype, x.device, recipe.input, recipe.weight)

            # output = x . W^T : (M, K) @ (K, N) -> (M, N); both contract K, the bias is
            # added before the output's rounding
            # fp8_fprop=False (an ablation): the output GEMM runs in the compute dtype; x
            # and W are still quantised here when backward keeps their FP8 copies.
            fprop = recipe.fp8_fprop
            qx = qw = None
            if fprop or keep_x:
                qx = step.quantize(x_q, recipe.input, "input", work, keep_payload=keep_x)
            if fprop or keep_w:
                qw = step.quantize(weight, recipe.weight, "weight", work, keep_payload=keep_w)
            if fprop and qx is not None and qw is not None:
                y = scaled_mm(
                    qx,
                    qw.t(),
                    bias=bias,
                    out_dtype=out_dtype,
                    label=state.gemm_label("output"),
                    accumulation=recipe.accumulation,
                )
            else:
                y = torch.nn.functional.linear(
                    x2d.to(out_dtype),
                    weight.to(out_dtype),
                    None if bias is None else bias.to(out_dtype),
                )
            step.commit()
            if state.histories and replay is None and qx is not None and qw is not None:
                # Kept for a recompute of this forward (activation checkpointing).
                state.remember_scales(
                    weight, step.local_amax["input"], {"input": qx.scale, "weight": qw.scale}
                )

        # After a NaN/inf in x or W (reported above) backward runs both GEMMs in high
        # precision: no FP8 copy is saved, and x and W are not checked a second time.
        fp8_forward = step.finite
        # What backward needs of x: its FP8 payload (1 byte/element), else the tensor it
        # quantises again (x_q) for an FP8 grad_weight, or the compute-dtype copy.
        fp8_saved = keep_x and fp8_forward
        if qx is not None and fp8_saved:
            x_saved, x_scale = qx.stored, qx.scale  # E2M1: packed, half a byte each
        else:
            x_saved, x_scale = (x_q if recipe.fp8_wgrad else x2d.to(out_dtype)), None
        # The weight: reuse its FP8 copy when the grad_input GEMM can, else keep only the
        # master weight (a Parameter: saving it costs no memory) and re-quantise.
        w_fp8 = w_scale = None
        if qw is not None and keep_w and fp8_forward:
            w_fp8, w_scale = qw.stored, qw.scale
        x_codes, x_table = _compact_scale(x_scale, recipe.input)
        w_codes, w_table = _compact_scale(w_scale, recipe.weight)
        ctx.save_for_backward(x_saved, x_codes, x_table, weight, w_fp8, w_codes, w_table)
        ctx.fp8_saved = fp8_saved
        ctx.fp8_forward = fp8_forward
        ctx.state = state
        ctx.kernels = kernels
        ctx.in_shape = in_shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*in_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_saved, x_codes, x_table, weight, w_fp8, w_codes, w_table = ctx.saved_tensors
        state: LayerState = ctx.state
        # None exactly where the forward saved none, as the saved tensors themselves.
        x_scale: Any = _expand_scale(x_codes, x_table, state.recipe.input)
        w_scale: Any = _expand_scale(w_codes, w_table, state.recipe.weight)
        kernels: Kernels = ctx.kernels
        recipe = state.recipe
        gdtype = dy.dtype
        work_d = _work_dtype(gdtype, dy.device, recipe.grad_output, recipe.weight)
        work_w = _work_dtype(gdtype, dy.device, recipe.grad_output, recipe.input)
        fp8_dgrad = ctx.needs_input_grad[0] and recipe.fp8_dgrad
        fp8_wgrad = ctx.needs_input_grad[1] and recipe.fp8_wgrad
        random_step = state.random_steps
        if state.draws_random:
            state.random_steps += 1
        step = _Step(state, kernels, random_step=random_step)
        with autocast_off(dy.device.type):
            dy2d = dy.reshape(-1, dy.shape[-1])  # (M, N)
            # dy is an operand of both GEMMs: quantised once along N, the axis grad_input
            # contracts (grad_weight reuses it where its scales do not depend on the axis).
            qdy = None
            if fp8_dgrad or fp8_wgrad:
                qdy = step.quantize(
                    dy2d, recipe.grad_output, "grad_output", work_d, keep_payload=False
                )
            # A GEMM whose dy is NaN/inf runs in high precision, and so does each GEMM
            # reading x or W after the forward found either one NaN/inf.

            # grad_input = dy . W : (M, N) @ (N, K) -> (M, K)
            dx = None
            if ctx.needs_input_grad[0]:
                qw = None
                if fp8_dgrad and qdy is not None and w_fp8 is not None:
                    # The forward's FP8 weight, reused as is (its scales span both axes).
                    w_values = _payload_values(w_fp8, recipe.weight, weight.shape[1])
                    operand = kernels.payload_to_operand(w_values, w_scale, recipe.weight, work_d)
                    qw = ScaledTensor(w_fp8, w_scale, recipe.weight, weight.dtype, operand)
                elif fp8_dgrad and qdy is not None and ctx.fp8_forward:
                    # Re-quantised from the master weight along N, the axis this GEMM
                    # contracts.
                    qw = step.quantize(
                        weight, recipe.weight.transposed(), "weight.t", work_d, keep_payload=False
                    )
                if qdy is not None and qw is not None:
                    dx = scaled_mm(
                        qdy,
                        qw,
                        out_dtype=gdtype,
                        label=state.gemm_label("grad_input"),
                        accumulation=recipe.accumulation,
                    )
                else:
                    dx = dy2d @ weight.to(gdtype)
                dx = dx.reshape(ctx.in_shape).to(ctx.x_dtype)

            # grad_weight = dy^T . x : (N, M) @ (M, K) -> (N, K)
            dw = None
            if ctx.needs_input_grad[1]:
                x_hp: torch.Tensor | None = None  # x as saved, in the gradient dtype
                qdy_t = qx = None
                if fp8_wgrad and qdy is not None and recipe.hadamard_wgrad and ctx.fp8_forward:
                    # Both operands through the same random Hadamard transform along M
                    # (the tokens, which this GEMM contracts): dy_h^T x_h = dy^T x.
                    h = hadamard_matrix(random_signs(state, random_step, dy.device))
                    x_q = x_saved
                    if ctx.fp8_saved:
                        x_q = _saved_input(ctx, x_saved, x_scale, torch.float32)
                    qdy_t = step.quantize(
                        hadamard_tokens(dy2d, h),  # (Mp, N)
                        recipe.grad_output.transposed(),
                        "grad_output.t",
                        work_w,
                        keep_payload=False,
                    )
                    qx = step.quantize(
                        hadamard_tokens(x_q, h),  # (Mp, K)
                        recipe.input.transposed(),
                        "input.t",
                        work_w,
                        keep_payload=False,
                    )
                elif fp8_wgrad and qdy is not None:
                    # dy along M, the axis this GEMM contracts. dy^T and dy are one tensor:
                    # NaN/inf in it was found (and reported once) above.
                    if _reusable_transposed(recipe.grad_output):
                        qdy_t = qdy
                    else:
                        qdy_t = step.quantize(
                            dy2d,
                            recipe.grad_output.transposed(),
                            "grad_output.t",
                            work_w,
                            keep_payload=False,
                        )
                    if ctx.fp8_saved and _reusable_transposed(recipe.input):
                        # The forward's FP8 input, reused as is.
                        x_values = _payload_values(x_saved, recipe.input, ctx.in_shape[-1])
                        operand = kernels.payload_to_operand(
                            x_values, x_scale, recipe.input, work_w
                        )
                        qx = ScaledTensor(x_saved, x_scale, recipe.input, gdtype, operand)
                    elif ctx.fp8_forward:
                        # Re-quantised along M from what the forward saved: its FP8 copy
                        # dequantised to the gradient dtype, or x_q itself.
                        x_q = x_saved
                        if ctx.fp8_saved:
                            x_q = _saved_input(ctx, x_saved, x_scale, gdtype)
                        qx = step.quantize(
                            x_q, recipe.input.transposed(), "input.t", work_w, keep_payload=False
                        )
                if qdy_t is not None and qx is not None:
                    dw = scaled_mm(
                        qdy_t.t(),
                        qx,
                        out_dtype=gdtype,
                        label=state.gemm_label("grad_weight"),
                        accumulation=recipe.accumulation,
                    )
                else:
                    if x_hp is None:
                        x_hp = _saved_input(ctx, x_saved, x_scale, gdtype)
                    dw = dy2d.t() @ x_hp
                dw = dw.to(weight.dtype)
            # Every amax of the backward is known finite (or the step is bad): record.
            step.commit()

            db = None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = kernels.bias_grad(dy2d, ctx.bias_dtype)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LayerState,
    kernels: Kernels | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the three GEMMs of ``state.recipe``.

    Output dtype: the autocast dtype when autocast is on for ``x``'s device, else
    ``x.dtype``; the bias is added in that dtype. Gradients: ``dx`` in ``x.dtype``,
    ``dW`` and ``db`` in the parameters' dtypes (fp32 master weights get fp32 grads).
    ``x`` must be float32, bfloat16 or float16 (else ``TypeError``, before any state
    changes). An empty ``x`` (0 tokens) or weight, the meta device and a layer whose
    ``state.high_precision`` is set run in high precision and record nothing
    (:func:`_high_precision_linear`).
    ``kernels``: the kernel set of this call (default ``state.kernels``; the compiled
    one under ``torch.compile``, see below). Called directly in compiled code, this
    function is a graph break whose frame dynamo recompiles per weight shape, as for any
    function taking the weight; :class:`fp8train.Fp8Linear` passes the module instead.
    """
    # Every check before anything is quantised or recorded: a bad input leaves the
    # layer's state (delayed histories, counters) as it was.
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"layer {state.name!r}: input of shape {tuple(x.shape)} does not match weight of "
            f"shape {tuple(weight.shape)} (last dim must be in_features={weight.shape[1]})"
        )
    if x.dtype not in _INPUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _INPUT_DTYPES)
        raise TypeError(
            f"layer {state.name!r}: input of shape {tuple(x.shape)} has dtype "
            f"{str(x.dtype).removeprefix('torch.')}; FP8 layers take {names}: convert it "
            "first, e.g. x.float()"
        )
    if torch.compiler.is_compiling():
        out: torch.Tensor = _fp8_linear_in_compiled_model(x, weight, bias, state)
        return out
    if state.high_precision or x.device.type == "meta" or x.numel() == 0 or weight.numel() == 0:
        return _high_precision_linear(x, weight, bias)
    y: torch.Tensor = _Fp8Linear.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, state, _kernels_for(state.recipe, kernels or state.kernels)
    )
    return y


# The input dtypes the FP8 GEMMs take (the output and gradient dtypes scaled_mm writes).
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _high_precision_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias`` in the layer's compute dtype, quantising and recording
    nothing, for the inputs FP8 has nothing to do with:

    * an empty operand (0 tokens): there is no amax to take (a per-row scale's reduction
      over 0 rows fails) and a delayed history must not record one; the output is
      ``(..., N)`` with no elements, ``dx`` empty, ``dW`` and ``db`` zeros;
    * the meta device (shape propagation, e.g. building a model before materialising
      it): no data to quantise. Autocast does not apply to meta tensors (``nn.Linear``
      on meta returns ``x.dtype`` under CPU autocast too), so neither does it here;
    * a layer demoted to high precision (``LayerState.high_precision``), e.g. by
      :class:`fp8train.Guard`: the same arithmetic as ``nn.Linear`` under autocast.
    """
    device = x.device.type
    out_dtype = x.dtype if device == "meta" else _compute_dtype(x)
    # autocast_off asks autocast about the device, which has no autocast state for meta.
    ctx = autocast_off(device) if device != "meta" else contextlib.nullcontext()
    with ctx:
        return torch.nn.functional.linear(
            x.to(out_dtype),
            weight.to(out_dtype),
            None if bias is None else bias.to(out_dtype),
        )


# Under torch.compile each FP8 layer is a graph break of its own: dynamo cannot trace
# the layer whole, as it decides on the host whether every amax is finite before a scale
# or an amax history is used. The layer then runs outside the graph with the compiled
# kernels whatever its own setting (the same bits). Left to dynamo, with the eager
# kernels, the break fell at that check inside the autograd function, which dynamo
# then recompiled per layer shape and dtype: slower than not compiling at all
# (benchmarks/train_step.py measures it). Fp8Linear crosses the break as a module
# (fp8train/nn.py), so that the frame dynamo compiles around it guards no weight shape.
def _fp8_linear_with_compiled_kernels(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: LayerState
) -> torch.Tensor:
    return fp8_linear(x, weight, bias, state, shared_kernels("compiled"))


_fp8_linear_in_compiled_model: Callable[..., torch.Tensor] = torch.compiler.disable(  # type: ignore[no-untyped-call]
    _fp8_linear_with_compiled_kernels
)
