"""What each rank runs in the distributed tests, and the single-process references.

The model is two pre-LayerNorm MLP blocks in an ``nn.ModuleList`` (so FSDP2 shards each
block as its own unit) plus a head, every Linear converted to FP8. Shapes are chosen so
the blockwise recipe exercises both shard layouts of its 128x128 weight blocks: fc1
(256 x 128) puts whole blocks on each of 2 ranks, fc2 and the head (128 x ...) split
one 128-row block between the ranks.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train import distributed as fd
from fp8train.distributed.wrap import unwrap
from fp8train.nn import fp8_layers
from fp8train.optim import Fp8AdamW
from fp8train.tensor import ScaledTensor

D, H = 128, 256
GLOBAL_BATCH = 24  # splits over 1, 2 and 3 ranks
LR = 0.05


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        out: torch.Tensor = self.head(x)
        return out


def make_model(recipe: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Eager kernels: with compiled ones every rank process compiles its own kernels, on
    # CPUs shared by the ranks, past the ranks' deadline. The compiled kernels are
    # checked bitwise against the eager ones by their own tests.
    return fp8train.convert(Net(), recipe, kernels="eager")


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, D, generator=g)
    y = torch.randn(GLOBAL_BATCH, D, generator=g)
    return x, y


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    b = GLOBAL_BATCH // world
    return x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]


def histories(model: nn.Module) -> dict[str, Any]:
    """Every delayed-scaling window (a copy), keyed by layer and role."""
    return {
        name: {
            r: None if h.window is None else h.window.clone()
            for r, h in layer.fp8_state.histories.items()
        }
        for name, layer in fp8_layers(unwrap(model))
    }


def _finish() -> None:
    # A DDP reducer freed after destroy_process_group can hang in its destructor (at the
    # worker's return, on some runs only); fd.shutdown warns when a DDP model is still
    # referenced, and here that fails every run instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "fp8train.distributed.shutdown", RuntimeWarning)
        fd.shutdown()


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    info: fd.DistInfo,
    scaler: fp8train.LossScaler | None = None,
) -> list[float]:
    losses = []
    for step in steps:
        x, y = (fd.batch_shard(t) for t in global_batch(step))
        loss = F.mse_loss(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(fd.mean_over_ranks(loss))
    return losses


# --------------------------------------------------------------------------- references


def reference_losses(recipe: str, steps: int, micro_batches: int) -> tuple[list[float], Any]:
    """One process on the global batch: ``micro_batches`` slices, gradients averaged.

    With ``micro_batches = world`` the arithmetic is that of ``world`` data-parallel ranks
    with per-rank activation scales: each slice is its own forward (the same shapes, so
    the same GEMM bits), the gradient is ``(g_0 + g_1) / 2`` exactly as the all-reduce /
    reduce-scatter computes it, and the loss is the mean of the slices' losses.
    """
    model = make_model(recipe)
    opt = make_optimizer(model)
    losses = []
    for step in range(steps):
        parts = []
        for r in range(micro_batches):
            x, y = local_batch(step, r, micro_batches)
            loss = F.mse_loss(model(x).float(), y)
            loss.backward()
            parts.append(loss.detach())
        if micro_batches > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(micro_batches)
        opt.step()
        opt.zero_grad()
        losses.append(float(sum(parts[1:], parts[0]) / micro_batches))
    return losses, histories(model)


def reference_resume(
    recipe: str,
    ckpt: str,
    steps_after: int,
    micro_batches: int,
    rescale_grad_histories: bool = False,
) -> dict[str, Any]:
    """Resume a checkpoint in this process (no process group, no wrapper) and continue
    like :func:`reference_losses`, with a loss scaler."""
    model = make_model(recipe, seed=123)
    opt = make_optimizer(model)
    scaler = fp8train.LossScaler()
    extra = fd.load_checkpoint(
        ckpt, model, opt, loss_scaler=scaler, rescale_grad_histories=rescale_grad_histories
    )
    loaded = {"histories": histories(model), "scaler": scaler.state_dict()}
    losses = []
    for step in range(extra["step"], extra["step"] + steps_after):
        parts = []
        for r in range(micro_batches):
            x, y = local_batch(step, r, micro_batches)
            loss = F.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            parts.append(loss.detach())
        if micro_batches > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(micro_batches)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(sum(parts[1:], parts[0]) / micro_batches))
    return {"loaded": loaded, "after": losses}


# --------------------------------------------------------------------------- workers


def train_compare(cases: list[tuple[str, str, bool]], steps: int) -> dict[str, Any]:
    """Train every (mode, recipe, fp8_all_gather) case from the same initial model.

    Returns, per ``"mode/recipe/fp8_all_gather"``: the global loss per step, the
    delayed-scaling histories at the end, and per layer the first forward's weight
    operand (payload, scale, and whether it *is* the all-gathered FP8 weight).
    """
    info = fd.init_from_env(timeout_s=30)
    out: dict[str, Any] = {}
    for mode, recipe, ag in cases:
        model = make_model(recipe)
        gathered: dict[str, Any] = {}

        def observe(
            state: Any,
            role: str,
            t: torch.Tensor,
            qt: ScaledTensor | None,
            gathered: dict[str, Any] = gathered,
        ) -> None:
            if role == "weight" and state.name not in gathered and qt is not None:
                # Identity, not equality: the GEMM got the gathered payload itself.
                gathered[state.name] = (
                    qt.data.clone(),
                    qt.scale.clone(),
                    isinstance(t, fd.Fp8GatheredWeight) and qt is t.fp8_gathered,
                )

        for _, layer in fp8_layers(model):
            layer.fp8_state.observer = observe
        model = fd.setup(model, mode, fp8_all_gather=ag)
        losses = _train(model, make_optimizer(model), range(steps), info)
        out[f"{mode}/{recipe}/{ag}"] = {
            "losses": losses,
            "histories": histories(model),
            "gathered": gathered,
        }
        del model
    _finish()
    return out


def all_gather_bytes(recipes: list[str]) -> dict[str, dict[bool, dict[str, int]]]:
    """Bytes this rank put into FSDP2 all-gathers over one training step, per recipe,
    with a bf16 ``MixedPrecisionPolicy`` (``fp8_all_gather`` False) and with FP8 (True).

    Measured by wrapping ``torch.distributed.all_gather_single``, the collective FSDP2's
    default all-gather calls, and summing its input tensors' bytes; all-reduces are
    counted too (the FP8 path's amax reductions).
    """
    info = fd.init_from_env(timeout_s=30)
    orig_ag, orig_ar = dist.all_gather_single, dist.all_reduce
    out: dict[str, dict[bool, dict[str, int]]] = {}
    for recipe in recipes:
        out[recipe] = {}
        for fp8 in (False, True):
            counts = {"all_gather": 0, "all_gather_calls": 0, "all_reduce": 0}

            def counting_all_gather(
                output: torch.Tensor,
                input: torch.Tensor,
                *a: Any,
                counts: dict[str, int] = counts,
                **k: Any,
            ) -> Any:
                counts["all_gather"] += input.numel() * input.element_size()
                counts["all_gather_calls"] += 1
                return orig_ag(output, input, *a, **k)

            def counting_all_reduce(
                tensor: torch.Tensor, *a: Any, counts: dict[str, int] = counts, **k: Any
            ) -> Any:
                counts["all_reduce"] += tensor.numel() * tensor.element_size()
                return orig_ar(tensor, *a, **k)

            model = fd.setup(
                make_model(recipe), "fsdp2", fp8_all_gather=fp8, param_dtype=torch.bfloat16
            )
            x, y = local_batch(0, info.rank, info.world_size)
            dist.all_gather_single, dist.all_reduce = counting_all_gather, counting_all_reduce
            try:
                F.mse_loss(model(x).float(), y).backward()
            finally:
                dist.all_gather_single, dist.all_reduce = orig_ag, orig_ar
            out[recipe][fp8] = counts
            del model
    _finish()
    return out


def loss_scaler_agreement() -> dict[str, Any]:
    """An inf in rank 1's gradients only (after DDP's all-reduce, as a parameter outside
    the data-parallel wrapper would have): which ranks skip, with and without the
    distributed scaler?"""
    info = fd.init_from_env(timeout_s=30)
    out = {}
    for name, cls in (
        ("LossScaler", fp8train.LossScaler),
        ("DistributedLossScaler", fd.DistributedLossScaler),
    ):
        model = fd.setup(make_model("tensorwise"), "ddp")
        opt = make_optimizer(model)
        scaler = cls(init_scale=2.0**10)
        x, y = local_batch(0, info.rank, info.world_size)
        scaler.scale(F.mse_loss(model(x).float(), y)).backward()
        if info.rank == 1:
            model.module.head.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        out[name] = {
            "skipped": scaler.last_step_skipped,
            "scale": scaler.get_scale(),
            "params_changed": any(
                not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=False)
            ),
        }
        del model, opt
    # Delayed scaling, and rank 1's batch holds a NaN: every rank must skip the same
    # amax records (histories stay identical) and the same optimizer step.
    model = fd.setup(make_model("delayed"), "ddp")
    opt = make_optimizer(model)
    scaler = fd.DistributedLossScaler(init_scale=2.0**10)
    skipped = []
    for step in range(3):
        x, y = local_batch(step, info.rank, info.world_size)
        if step == 1 and info.rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        scaler.scale(F.mse_loss(model(x).float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        skipped.append(scaler.last_step_skipped)
    out["nan_on_one_rank"] = {
        "skipped": skipped,
        "histories": histories(model),
        "counts": {
            n: {r: h.count for r, h in layer.fp8_state.histories.items()}
            for n, layer in fp8_layers(model.module)
        },
    }
    del model, opt
    _finish()
    return out


def checkpoint_save(
    recipe: str, fp8_all_gather: bool, ckpt: str, steps_before: int, steps_after: int
) -> dict[str, Any]:
    """Train, save (with a loss scaler and recipe state), then keep training."""
    info = fd.init_from_env(timeout_s=30)
    model = fd.setup(make_model(recipe), "fsdp2", fp8_all_gather=fp8_all_gather)
    opt = make_optimizer(model)
    scaler = fd.DistributedLossScaler(init_scale=2.0**8, growth_interval=2)
    _train(model, opt, range(steps_before), info, scaler)
    fd.save_checkpoint(ckpt, model, opt, loss_scaler=scaler, extra={"step": steps_before})
    saved = {"histories": histories(model), "scaler": scaler.state_dict()}
    after = _train(model, opt, range(steps_before, steps_before + steps_after), info, scaler)
    del model, opt
    _finish()
    return {"saved": saved, "after": after}


def checkpoint_resume(
    recipe: str, fp8_all_gather: bool, ckpt: str, steps_after: int
) -> dict[str, Any]:
    """Build a fresh model on this number of ranks, load, continue."""
    info = fd.init_from_env(timeout_s=30)
    model = fd.setup(make_model(recipe, seed=123), "fsdp2", fp8_all_gather=fp8_all_gather)
    opt = make_optimizer(model)
    scaler = fd.DistributedLossScaler()
    extra = fd.load_checkpoint(ckpt, model, opt, loss_scaler=scaler)
    loaded = {"histories": histories(model), "scaler": scaler.state_dict()}
    step = extra["step"]
    after = _train(model, opt, range(step, step + steps_after), info, scaler)
    del model, opt
    _finish()
    return {"loaded": loaded, "after": after}


def rank_dies(how: str, pg_timeout_s: float, marker: str) -> dict[str, Any]:
    """Rank 1 dies (``"exit"``) or stalls (``"stall"``) after one step; rank 0 trains on.

    Rank 0 reports the error it got and how long the failing step took.
    """
    info = fd.init_from_env(timeout_s=pg_timeout_s)
    model = fd.setup(make_model("tensorwise"), "fsdp2", fp8_all_gather=True)
    opt = make_optimizer(model)
    _train(model, opt, range(1), info)
    done = Path(marker)
    if info.rank == 1:
        if how == "exit":
            os._exit(17)
        # Stalled: alive but silent until rank 0 has given up (or a minute has passed).
        t0 = time.monotonic()
        while not done.exists() and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        os._exit(18)
    t0 = time.monotonic()
    try:
        with fd.collective_errors():
            _train(model, opt, range(1, 5), info)
        result: dict[str, Any] = {"error": None}
    except fd.RankFailureError as e:
        result = {"error": str(e), "type": type(e).__name__, "cause": type(e.__cause__).__name__}
    result["elapsed"] = time.monotonic() - t0
    done.write_text("rank 0 is done")
    return result


def comm_hook_bytes(steps: int) -> dict[str, Any]:
    """DDP on an unconverted ``Net`` with the fp32, bf16 and FP8 communication hooks: per
    hook, the inputs of every collective of ``steps`` steps (bytes per collective kind),
    the averaged gradients of the first step, and the parameters after ``steps`` SGD
    steps. Counted by wrapping the ``torch.distributed`` functions the hooks call."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from fp8train.distributed.comm_hooks import Fp8CommState, fp8_compress_hook

    fd.init_from_env(timeout_s=30)
    names = ("all_reduce", "all_to_all_single", "all_gather_single")
    originals = {n: getattr(dist, n) for n in names}

    def bf16_hook(state, bucket):  # type: ignore[no-untyped-def]
        # DDP refuses the built-in bf16 hook by name without CUDA/NCCL, and checks the
        # annotations (strings under this file's future import): none given.
        return default_hooks.bf16_compress_hook(state, bucket)

    hooks: dict[str, tuple[Any, Any]] = {
        "fp32": (None, default_hooks.allreduce_hook),
        "bf16": (None, bf16_hook),
        "fp8": (Fp8CommState(), fp8_compress_hook),
    }
    out: dict[str, Any] = {}
    for label, (state, hook) in hooks.items():
        counts = {n: 0 for n in names}

        def counting(name: str, counts: dict[str, int] = counts) -> Any:
            def call(*a: Any, **kw: Any) -> Any:
                src = a[1] if name != "all_reduce" else a[0]  # (output, input) or (tensor)
                counts[name] += src.numel() * src.element_size()
                return originals[name](*a, **kw)

            return call

        torch.manual_seed(0)
        model = fd.setup(Net(), "ddp")
        model.register_comm_hook(state, hook)  # type: ignore[operator]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        grads: dict[str, torch.Tensor] = {}
        for n in names:
            setattr(dist, n, counting(n))
        try:
            for step in range(steps):
                x, y = (fd.batch_shard(t) for t in global_batch(step))
                F.mse_loss(model(x), y).backward()
                if step == 0:
                    grads = {k: p.grad.clone() for k, p in model.named_parameters()}  # type: ignore[union-attr]
                opt.step()
                opt.zero_grad()
        finally:
            for n in names:
                setattr(dist, n, originals[n])
        out[label] = {
            "counts": counts,
            "grads": grads,
            "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "hook_state": None
            if state is None
            else {"payload": state.payload_bytes, "scales": state.scale_bytes},
        }
        del model
    out["parameters"] = sum(p.numel() for p in Net().parameters())
    _finish()
    return out


def fp8_adamw_train(steps: int, world: int | None = None) -> dict[str, Any]:
    """``fp8train.Fp8AdamW`` on the unconverted ``Net``: under FSDP2 on this rank's group
    (``world`` None), or in one process on the global batch as ``world`` micro-batches
    with averaged gradients (the reference). Returns the global losses, the full
    parameters and the decoded moments of every parameter (full tensors)."""
    distributed = world is None
    if distributed:
        fd.init_from_env(timeout_s=30)
    torch.manual_seed(0)
    model: nn.Module = Net()
    if distributed:
        model = fd.setup(model, "fsdp2")
    opt = Fp8AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        if distributed:
            x, y = (fd.batch_shard(t) for t in global_batch(step))
            loss = F.mse_loss(model(x), y)
            loss.backward()
            losses.append(fd.mean_over_ranks(loss))
        else:
            assert world is not None
            parts = []
            for r in range(world):
                x, y = local_batch(step, r, world)
                part = F.mse_loss(model(x), y)
                part.backward()
                parts.append(part.detach())
            for p in model.parameters():
                assert p.grad is not None
                p.grad.div_(world)
            losses.append(float(sum(parts[1:], parts[0]) / world))
        opt.step()
        opt.zero_grad()

    def full(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not distributed:
            return t.detach().clone()
        # A local moment of a sharded parameter: gathered like the parameter itself.
        from torch.distributed.tensor import DTensor

        spec = like
        assert isinstance(spec, DTensor)
        return DTensor.from_local(
            t.reshape(spec.to_local().shape).contiguous(),
            spec.device_mesh,
            spec.placements,
            shape=spec.shape,
            stride=spec.stride(),
        ).full_tensor()

    out: dict[str, Any] = {"losses": losses, "params": {}, "moments": {}}
    for name, p in model.named_parameters():
        moments = opt.moments(p)
        assert moments is not None
        out["moments"][name] = tuple(full(m, p) for m in moments)
        value = p.full_tensor() if distributed else p  # type: ignore[operator]
        out["params"][name] = value.detach().clone()
    if distributed:
        out["state_bytes"] = opt.state_bytes()
        _finish()
    return out


def guard_agreement(
    steps: int, fault_step: int, mode: str = "ddp", demote_to: list[str] | None = None
) -> dict[str, Any]:
    """fp8train.Guard (policy "demote") under ``mode`` (DDP or FSDP2) with a fault on rank
    1 only: an outlier
    in one layer's grad_output at one step, while that layer runs in FP8. Rank 0's own
    operands are clean (it would skip), rank 1 names the layer: every rank must look
    again, demote the same layer and keep identical replicas."""
    info = fd.init_from_env(timeout_s=30)
    net = make_model("tensorwise")
    target = [n for n, _ in fp8_layers(net)][-2]
    layer = net.get_submodule(target)
    now = {"step": -1}

    def fault(module: nn.Module, grad_output: Any) -> Any:
        state = layer.fp8_state
        demoted = state.high_precision or state.recipe != state.base_recipe
        if info.rank != 1 or now["step"] != fault_step or demoted:  # the old recipe's fault
            return None
        g = grad_output[0].clone()
        g.view(-1, g.shape[-1])[0, 0] = g.abs().max() * 1e12
        return (g,)

    layer.register_full_backward_pre_hook(fault)
    model = fd.setup(net, mode)
    opt = make_optimizer(model)
    from fp8train.guard import Guard, GuardThresholds

    thresholds = GuardThresholds(min_history=4)
    guard = Guard(
        model,
        opt,
        policy="demote",
        every=10**6,
        start=1,
        thresholds=thresholds,
        demote_to=demote_to,
    )
    while guard.step_count < steps:
        now["step"] = guard.step_count
        x, y = (fd.batch_shard(t) for t in global_batch(guard.step_count))

        def closure(x: torch.Tensor = x, y: torch.Tensor = y, m: nn.Module = model) -> torch.Tensor:
            loss = F.mse_loss(m(x).float(), y)
            loss.backward()
            return loss

        guard.step(closure)
    out = {
        "target": target,
        "events": [(e["step"], e["action"], e["layer"]) for e in guard.events],
        "to": [e.get("to") for e in guard.events],
        "recipes": {n: m.fp8_state.recipe.name for n, m in fp8_layers(unwrap(model))},
        "diagnosed": [d.layer for d in guard.diagnoses],
        "demoted": guard.demoted,
        # FSDP2 holds shards: each rank gathers the whole tensor (the same order on all).
        "params": {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in unwrap(model).state_dict().items()
        },
    }
    guard.close()
    del model, opt, guard, closure  # the closure's default holds the DDP model
    _finish()
    return out


def fsdp2_reduce_scatter_bytes() -> dict[str, Any]:
    """FSDP2 on the unconverted ``Net`` with ``reduce_dtype`` None (fp32) and bf16: the
    input bytes of every gradient reduce-scatter of one backward (counted by wrapping
    ``dist.reduce_scatter_single``, the collective FSDP2's default reduce-scatter calls)
    and the full gradients."""
    fd.init_from_env(timeout_s=30)
    original = dist.reduce_scatter_single
    out: dict[str, Any] = {}
    for label, reduce_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        counts = {"reduce_scatter": 0, "calls": 0}

        def counting(*a: Any, counts: dict[str, int] = counts, **kw: Any) -> Any:
            src = kw["input"] if "input" in kw else a[1]
            counts["reduce_scatter"] += src.numel() * src.element_size()
            counts["calls"] += 1
            return original(*a, **kw)

        torch.manual_seed(0)
        model = fd.setup(Net(), "fsdp2", reduce_dtype=reduce_dtype)
        x, y = (fd.batch_shard(t) for t in global_batch(0))
        dist.reduce_scatter_single = counting
        try:
            F.mse_loss(model(x), y).backward()
        finally:
            dist.reduce_scatter_single = original
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # type: ignore[union-attr]
        out[label] = {"counts": counts, "grads": grads}
        del model
    _finish()
    return out


# --------------------------------------------------------------- guard: FP8 all-gather


def _demote(model: nn.Module, demotions: dict[str, str]) -> None:
    """``layer name -> recipe name or "high"``, as fp8train.Guard's ladder demotes."""
    layers = dict(fp8_layers(unwrap(model)))
    for name, to in demotions.items():
        layers[name].fp8_state.demote(None if to == "high" else fp8train.Recipe.from_name(to))


def fsdp2_demoted_fp8_all_gather(
    recipe: str,
    steps_before: int,
    steps_after: int,
    demotions: dict[str, str],
    demoted_weight_factor: float = 1.0,
) -> dict[str, Any]:
    """FSDP2 with the FP8 all-gather; after ``steps_before`` steps every rank demotes the
    same layers (``demotions``) and multiplies their weights by ``demoted_weight_factor``,
    then trains ``steps_after`` more. Returns the global losses, the full parameters,
    per layer whether each forward GEMM after the demotion multiplied the gathered FP8
    payload, and for each demoted layer its full weight at the demotion and the payload
    and scale its first forward after it multiplied."""
    info = fd.init_from_env(timeout_s=30)
    net = make_model(recipe)
    used: dict[str, list[bool]] = {}
    first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    demoted_now = {"yes": False}

    def observe(state: Any, role: str, t: torch.Tensor, qt: ScaledTensor | None) -> None:
        if role == "weight" and not _in_backward_pass():
            fp8 = isinstance(t, fd.Fp8GatheredWeight) and t.fp8_gathered is not None
            used.setdefault(state.name, []).append(fp8 and qt is t.fp8_gathered)
            after = demoted_now["yes"] and state.name in demotions
            if after and state.name not in first and qt is not None:
                first[state.name] = (qt.data.clone(), qt.scale.clone())

    for _, layer in fp8_layers(net):
        layer.fp8_state.observer = observe
    model = fd.setup(net, "fsdp2", fp8_all_gather=True)
    opt = make_optimizer(model)
    losses = _train(model, opt, range(steps_before), info)
    _demote(model, demotions)
    at_demotion = {}
    for name in demotions:
        weight = unwrap(model).get_submodule(name).weight
        with torch.no_grad():
            weight.mul_(demoted_weight_factor)  # each rank its shard
        at_demotion[name] = weight.full_tensor().detach().clone()
    used.clear()
    demoted_now["yes"] = True
    losses += _train(model, opt, range(steps_before, steps_before + steps_after), info)
    out = {
        "losses": losses,
        "used_gathered": used,
        "weights_at_demotion": at_demotion,
        "first_after_demotion": first,
        "params": {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()},
    }
    del model, opt
    _finish()
    return out


def _in_backward_pass() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)


def demoted_reference(
    recipe: str,
    steps_before: int,
    steps_after: int,
    demotions: dict[str, str],
    micro_batches: int,
) -> dict[str, Any]:
    """:func:`fsdp2_demoted_fp8_all_gather` in one process without a wrapper, the ranks'
    halves as micro-batches (as :func:`reference_losses`)."""
    model = make_model(recipe)
    opt = make_optimizer(model)
    losses = []
    for step in range(steps_before + steps_after):
        if step == steps_before:
            _demote(model, demotions)
        parts = []
        for r in range(micro_batches):
            x, y = local_batch(step, r, micro_batches)
            loss = F.mse_loss(model(x).float(), y)
            loss.backward()
            parts.append(loss.detach())
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(micro_batches)
        opt.step()
        opt.zero_grad()
        losses.append(float(sum(parts[1:], parts[0]) / micro_batches))
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "params": params}
