"""FP8 gradients on the wire: a DDP communication hook.

``fp8_compress_hook`` replaces DDP's fp32 all-reduce of each gradient bucket by two FP8
collectives, the way a ring all-reduce is a reduce-scatter followed by an all-gather::

    model = fd.setup(model, "ddp")
    model.register_comm_hook(fd.Fp8CommState(), fd.fp8_compress_hook)

1. The bucket (fp32, ``n`` elements) is padded to ``W`` equal chunks of whole blocks
   (``W`` ranks, blocks of ``block`` elements) and quantised to E4M3, one fp32 scale per
   block (``fp8train.quantize``, round to nearest even). **All-to-all**: chunk ``j`` of
   every rank goes to rank ``j``, payload and scales together.
2. Rank ``j`` decodes the ``W`` copies of its chunk to fp32 and sums them in rank order,
   in fp32, then divides by ``W``: the reduction never happens in FP8.
3. The averaged chunk is quantised again (its own block scales) and **all-gathered**;
   every rank decodes the ``W`` chunks into the bucket. All ranks hold the same bits,
   so the replicas stay identical.

Why not an FP8 all-reduce: a sum of FP8 codes only means something when every rank uses
the same scale (an extra all-reduce of the amaxes first), the partial sums round to 3
mantissa bits at every hop of the ring, and the sum of ``W`` maxima overflows the
format unless the scale leaves ``log2 W`` binades of headroom, which every rank's small
values then lose. Why not only an all-gather of every rank's whole FP8 bucket (one
rounding instead of two): each rank would receive ``(W - 1) n`` bytes, more than an
fp32 ring all-reduce's ``8 (W - 1) / W n`` from 9 ranks on. The two phases move
``2 (W - 1) / W n`` payload bytes per rank, a quarter of fp32's at every ``W``, plus 4
bytes of scale per block (``8 / block`` per element in all), and each phase's scales
travel with their payload, so no collective is spent agreeing on a scale.

The price is two roundings: the rank's own gradient, then the averaged one, each to
E4M3's 3 mantissa bits (relative error at most 2^-4 for an element in the normal range
of its block, whose maximum maps to 448; elements below 2^-6 of that maximum lose bits
as subnormals, and below 2^-10 of it become zero).

Contract: gradients are float32 (DDP buckets of fp32 parameters); the hook runs its two
collectives synchronously and returns a completed future, so it does not overlap
communication with the rest of backward as DDP's built-in hooks do (which matters on a
GPU, not for the CPU studies this library runs). ``Fp8CommState`` counts what the hook
sends, for the bytes-on-the-wire comparison.

FSDP2 reduce-scatters gradients; its ``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``
(``fd.setup(model, "fsdp2", reduce_dtype=torch.bfloat16)``) halves those bytes. An FP8
reduce-scatter is not offered: FSDP2's reduce-scatter sums in the wire dtype, and a sum
in FP8 is what this module avoids.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fp8train.formats import E4M3, Format, by_name
from fp8train.scaling import Granularity, ScaleSpec
from fp8train.tensor import ScaledTensor, quantize

__all__ = ["Fp8CommState", "bf16_allreduce_hook", "fp8_compress_hook"]


@dataclass
class Fp8CommState:
    """Settings and counters of :func:`fp8_compress_hook`.

    ``fmt``: the wire format (E4M3 by default; E5M2 has 4x the range and half the
    resolution). ``block``: elements per scale (>= 1). ``process_group``: the group
    (default: the world). ``payload_bytes`` / ``scale_bytes``: what this rank has put
    into the hook's collectives so far (inputs, not counting its own chunk twice).
    """

    fmt: Format | str = E4M3
    block: int = 128
    process_group: dist.ProcessGroup | None = None
    payload_bytes: int = field(default=0, init=False)
    scale_bytes: int = field(default=0, init=False)
    buckets: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.fmt = by_name(self.fmt)
        if self.fmt.torch_dtype is None or self.fmt.torch_dtype.itemsize != 1:
            raise ValueError(f"the wire format must be a 1-byte float8 format, got {self.fmt.name}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")

    @property
    def spec(self) -> ScaleSpec:
        return ScaleSpec(by_name(self.fmt), Granularity.BLOCK, block=(1, self.block))


def _encode(x: torch.Tensor, spec: ScaleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (rows, block) -> (uint8 payload (rows, block), fp32 scales (rows, 1)).
    gloo has no float8 dtypes: the payload travels as its bytes."""
    qt = quantize(x, spec, name="gradient bucket")
    return qt.data.view(torch.uint8), qt.scale


def _decode(payload: torch.Tensor, scale: torch.Tensor, spec: ScaleSpec) -> torch.Tensor:
    assert spec.fmt.torch_dtype is not None
    data = payload.view(spec.fmt.torch_dtype)
    return ScaledTensor(data, scale, spec, torch.float32).dequantize()


def fp8_reduce(bucket: torch.Tensor, state: Fp8CommState) -> torch.Tensor:
    """The mean over ranks of ``bucket`` (1-D fp32) through FP8 collectives; a new
    tensor of the bucket's shape and dtype, the same bits on every rank."""
    if bucket.dtype != torch.float32:
        raise TypeError(
            f"fp8_compress_hook reduces float32 gradient buckets, got {bucket.dtype}; keep "
            "fp32 parameters (autocast computes in low precision, gradients stay fp32)"
        )
    group = state.process_group
    world = dist.get_world_size(group)
    spec, block = state.spec, state.block
    n = bucket.numel()
    rows = -(-n // (world * block))  # blocks per chunk
    padded = torch.zeros(world * rows * block, dtype=torch.float32, device=bucket.device)
    padded[:n] = bucket
    # Phase 1: reduce-scatter as an all-to-all of FP8 chunks, summed in fp32.
    payload, scale = _encode(padded.view(world * rows, block), spec)  # (W*rows, block), (W*rows, 1)
    recv_payload, recv_scale = torch.empty_like(payload), torch.empty_like(scale)
    dist.all_to_all_single(recv_payload, payload, group=group)
    dist.all_to_all_single(recv_scale, scale, group=group)
    parts = _decode(recv_payload, recv_scale, spec).view(world, rows, block)
    total = parts[0].clone()
    for r in range(1, world):  # rank order: the same sum wherever it is computed
        total += parts[r]
    mean = total / world
    # Phase 2: all-gather the averaged chunk, re-quantised with its own scales.
    payload, scale = _encode(mean, spec)  # (rows, block), (rows, 1)
    all_payload = torch.empty(world * rows, block, dtype=torch.uint8, device=bucket.device)
    all_scale = torch.empty(world * rows, 1, dtype=torch.float32, device=bucket.device)
    dist.all_gather_single(all_payload, payload, group=group)
    dist.all_gather_single(all_scale, scale, group=group)
    state.payload_bytes += 2 * (world - 1) * rows * block  # two phases, W - 1 chunks each
    state.scale_bytes += 2 * (world - 1) * rows * 4
    state.buckets += 1
    return _decode(all_payload, all_scale, spec).view(-1)[:n].view_as(bucket)


def fp8_compress_hook(
    state: Fp8CommState,
    bucket: dist.GradBucket,  # type: ignore[name-defined]
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's mean over ranks through FP8 (module
    docstring); register with ``ddp_model.register_comm_hook(Fp8CommState(), hook)``."""
    buffer = bucket.buffer()
    buffer.copy_(fp8_reduce(buffer, state))
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def bf16_allreduce_hook(
    state: dist.ProcessGroup | None,
    bucket: dist.GradBucket,  # type: ignore[name-defined]
) -> torch.futures.Future[torch.Tensor]:
    """torch's ``bf16_compress_hook`` (the bucket cast to bf16, all-reduced, divided by
    the world size, cast back), under another name: DDP refuses a hook *named*
    ``bf16_compress_hook`` unless CUDA with NCCL or XPU with XCCL is present, although
    the hook itself runs on gloo. ``state``: the process group (None: the world)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    # Annotated ProcessGroup, but its body reads None as the world group (its docstring).
    return default_hooks.bf16_compress_hook(state, bucket)  # type: ignore[arg-type]
