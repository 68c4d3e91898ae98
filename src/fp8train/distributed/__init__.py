"""Data-parallel training of converted models: DDP, FSDP2, FP8 all-gather, checkpoints.

Launch with ``torchrun --nproc-per-node N`` (gloo on CPU); every rank runs::

    info = init_from_env()                         # process group from torchrun's env
    model = convert(build_model(), "tensorwise")   # convert first, then distribute
    model = setup(model, "fsdp2", fp8_all_gather=True)   # or "ddp"
    opt = torch.optim.AdamW(model.parameters())    # after setup: FSDP2 swaps Parameters
    scaler = DistributedLossScaler()               # same skip decision on every rank
    with collective_errors():                      # a lost peer -> RankFailureError
        for step in ...:
            x, y = (batch_shard(t) for t in global_batch(step))   # this rank's rows
            loss = loss_fn(model(x), y)
            ...
            log(mean_over_ranks(loss))             # the global-batch loss, on is_main()
    save_checkpoint(path, model, opt, loss_scaler=scaler)   # torch.distributed.checkpoint
    load_checkpoint(path, model, opt, loss_scaler=scaler)   # on any number of ranks
    shutdown()

A run on N ranks computes what one process computes on the global batch split into N
micro-batches with averaged gradients, bit for bit for current-scaling recipes (the tests
check it); with delayed scaling, what one process computes on the whole global batch at
once, up to fp32 summation order.

One module per job:

* :mod:`~fp8train.distributed.process_group` -- joining the group, this rank's place
  and batch rows, scalar collectives, and naming a failed collective.
* :mod:`~fp8train.distributed.wrap` -- :func:`setup`: DDP or FSDP2 around a converted
  model, with the layer hooks below installed.
* :mod:`~fp8train.distributed.layer_hooks` -- :class:`Fp8LayerHooks`, what an FP8 layer
  asks of the group (``fp8train.autograd.DistributedHooks``).
* :mod:`~fp8train.distributed.fp8_all_gather` -- FSDP2's FP8 weight all-gather, and
  which recipes support it (that module's docstring says why).
* :mod:`~fp8train.distributed.loss_scaler` -- :class:`DistributedLossScaler`.
* :mod:`~fp8train.distributed.checkpoint` -- :func:`save_checkpoint` and
  :func:`load_checkpoint`.
* :mod:`~fp8train.distributed.comm_hooks` -- :func:`fp8_compress_hook`, a DDP
  communication hook that averages gradient buckets through FP8 collectives, and
  :func:`bf16_allreduce_hook`, torch's bf16 hook under a name DDP accepts on gloo.

What stays identical on every rank, and why:

* **Delayed-scaling histories.** :func:`setup` gives every FP8 layer's
  :class:`~fp8train.autograd.LayerState` an :class:`Fp8LayerHooks`: the amax of each
  operand that has a history is all-reduced (max) before it is used and recorded, so all
  ranks record the same value and derive the same scales. A non-finite amax on one rank
  becomes inf on all of them, so every rank skips the same record. The max over ranks is
  also the amax a single process would see on the global batch. Current-scaling recipes
  keep per-rank activation and gradient scales (each rank quantises its own batch), as
  torchao and Transformer Engine do; only weights need one scale everywhere.
* **The loss scaler's skip decision.** :class:`DistributedLossScaler` all-reduces its
  found-inf flag (max), so one rank's overflow skips the step on every rank. Averaged
  gradients usually carry an inf to every rank anyway, but not always (a parameter
  outside the data-parallel wrapper, a gradient touched after the reduction); a rank that
  steps while another skips makes the replicas diverge silently, so one all-reduced flag
  per step rules it out instead of relying on it.
* **FP8 weights under FSDP2** (``fp8_all_gather=True``): each rank casts its shard with
  the scales of the full weight, so the gathered payload and scales are bitwise
  ``quantize(full_weight, recipe.weight)`` on one process.

Every rank must run every forward (evaluation included): FSDP and the amax all-reduces
are collectives.
"""

from fp8train.distributed.checkpoint import load_checkpoint, save_checkpoint
from fp8train.distributed.comm_hooks import Fp8CommState, bf16_allreduce_hook, fp8_compress_hook
from fp8train.distributed.fp8_all_gather import (
    Fp8AllGatherWeight,
    Fp8GatheredWeight,
    fp8_all_gather_unsupported_reason,
)
from fp8train.distributed.layer_hooks import Fp8LayerHooks
from fp8train.distributed.loss_scaler import DistributedLossScaler
from fp8train.distributed.process_group import (
    DistInfo,
    RankFailureError,
    batch_shard,
    collective_errors,
    init_from_env,
    is_main,
    mean_over_ranks,
    rank,
    shutdown,
    world_size,
)
from fp8train.distributed.wrap import setup

__all__ = [
    "DistInfo",
    "DistributedLossScaler",
    "Fp8AllGatherWeight",
    "Fp8CommState",
    "Fp8GatheredWeight",
    "Fp8LayerHooks",
    "RankFailureError",
    "batch_shard",
    "bf16_allreduce_hook",
    "collective_errors",
    "fp8_all_gather_unsupported_reason",
    "fp8_compress_hook",
    "init_from_env",
    "is_main",
    "load_checkpoint",
    "mean_over_ranks",
    "rank",
    "save_checkpoint",
    "setup",
    "shutdown",
    "world_size",
]
