"""Throughput of amax + scale + cast (``fp8train.quantize``) next to memcpy.

For a 64 MiB fp32 tensor (4096 x 4096) and a 64 MiB bf16 tensor (4096 x 8192), times
``quantize(x, ScaleSpec(E4M3, ...))`` at each granularity -- tensorwise, rowwise,
blockwise 1x128, blockwise 128x128, MX 1x32 -- and ``dst.copy_(src)`` of 64 MiB in the
same run, through both kernel sets: ``eager`` (``fp8train.quantize``, the reference
pipeline) and ``compiled`` (``Kernels("compiled").quantize_current`` from
``fp8train._kernels``, amax + scale + cast fused by inductor, row count dynamic, last
dimension static). Reports GB/s counting bytes read plus bytes written (see
``_common.BANDWIDTH_CONVENTION``): memcpy moves 2 x 64 MiB; a cast is credited with one
read of its input plus one write of its FP8 payload and fp32 scales. The fraction of
memcpy says how far the cast is from a single streaming pass; each row's memcpy is timed
alternately with it (its GB/s is in the row), so that both see the same machine load.

Where the time goes (compiled kernels, recorded per row under ``parts``): the amax pass
alone, the cast pass alone with the scale given (current scaling's cast pass, without
the clamp a delayed scale would need), a streaming read of the input (eager
``x.max()``, what one pass over it costs at the machine's read bandwidth), for rowwise
the same kernel with amax and cast in one loop per row (``rowwise_in_one_loop``: does
the second read cost what it seems to?), delayed scaling's kernel (the scale given, so
amax and cast need not wait for each other; inductor still writes them as two loops
over the input; not MX, whose scales are always the block's own), and, once per phase,
the price of writing a
payload-sized buffer into a new allocation against rewriting memory already touched (a
compiled kernel allocates its outputs on every call; on this VM the first touch of
fresh pages is a large part of the cast).

Allocator: everything is timed twice, first with the default allocator, then (compiled
kernels only) with glibc's malloc keeping freed memory (``_common.keep_freed_memory``).
By default a block of 32 MiB or more -- the bf16 input's payload -- is a fresh mmap on
every call, and its page faults are timed as the kernel's; memcpy writes into a buffer
already touched. The second run compares like with like; both are recorded.

Byte routes (``--routes``, also part of a full run): the compiled kernels can make FP8
bytes by torch's conversion (the default) or from fp32 bit fields, their int32 codes
turned into bytes directly or through fp32, and restore a saved payload by conversion or
from int32 words (``fp8train._kernels.ByteRoutes``). Every route gives the same bits;
which is faster depends on the CPU (inductor has no vector code for a bit view, and
vectorises some conversions only on some instruction sets), so this measures them here,
interleaved, and says which wins: the value to pass as ``Kernels("compiled",
payload_bytes=..., code_bytes=..., restore_from_words=...)`` on this machine.

Run: ``python benchmarks/cast.py`` (writes ``benchmarks/results/cast.json``);
``python benchmarks/cast.py --routes`` times only the byte routes (a minute or less).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The scripts' shared helper sits beside them (on sys.path when run as a script; the
# insert above also covers runpy and other launchers).
from _common import (
    BANDWIDTH_CONVENTION,
    KEEP_FREED_MEMORY,
    format_table,
    gb_per_s,
    keep_freed_memory,
    memcpy_bandwidth,
    time_interleaved,
    time_median,
    write_results,
)

from fp8train import E4M3, E5M2, Granularity, ScaleSpec, quantize
from fp8train._kernels import ByteRoutes, Kernels
from fp8train._kernels.encoders import fp8_payload
from fp8train.scaling import compute_amax, multiply_by_scale, scale_from_amax

MIB = 2**20
TARGET = 0.7  # amax + scale + cast as a fraction of memcpy bandwidth (issue 6)
NBYTES = 64 * MIB
# Both inputs are 64 MiB: 4096 * 4096 * 4 bytes and 4096 * 8192 * 2 bytes.
INPUTS = {
    "fp32": ((4096, 4096), torch.float32),
    "bf16": ((4096, 8192), torch.bfloat16),
}
G = Granularity
SPECS = {
    "tensorwise": ScaleSpec(fmt=E4M3, granularity=G.TENSOR),
    "rowwise": ScaleSpec(fmt=E4M3, granularity=G.ROW, axis=-1),
    "block 1x128": ScaleSpec(fmt=E4M3, granularity=G.BLOCK, block=(1, 128)),
    "block 128x128": ScaleSpec(fmt=E4M3, granularity=G.BLOCK, block=(128, 128)),
    "mx 1x32": ScaleSpec(fmt=E4M3, granularity=G.MX, block=(1, 32)),
}


def rowwise_in_one_loop(x: torch.Tensor, spec: ScaleSpec) -> tuple[torch.Tensor, ...]:
    """Row-wise current scaling as ``Kernels.quantize_current`` computes it (the same
    bits), written so that inductor puts each row's amax and cast in one loop: the cast
    computes the scale inline from the amax, and the scale output is a 16-wide buffer
    whose loop is not vectorised across rows (a loop over rows in steps of 16, as inductor
    makes for a plain (M, 1) scale, stops it fusing the amax and cast loops; torch 2.13)."""
    amax = compute_amax(x, spec)
    scaled = multiply_by_scale(x, scale_from_amax(amax, spec), spec)
    payload = fp8_payload(scaled, spec.fmt, clamp=False)
    scale = scale_from_amax(amax, spec).expand(-1, 16).contiguous()[:, :1]
    return amax, scale, payload


def bench_input(
    name: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    kernel_sets: tuple[str, ...],
    allocator: str,
) -> list[dict[str, Any]]:
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    src = torch.empty(NBYTES, dtype=torch.uint8).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)
    in_bytes = x.numel() * x.element_size()
    assert in_bytes == NBYTES, (name, in_bytes)
    rows = []
    compiled = Kernels("compiled")
    for (label, spec), kernels in itertools.product(SPECS.items(), kernel_sets):
        q = quantize(x, spec)  # also checks the spec works before timing it
        out_bytes = q.data.numel() * q.data.element_size() + q.scale.numel() * 4
        if kernels == "eager":
            fn = functools.partial(quantize, x, spec)
        else:
            fn = functools.partial(compiled.quantize_current, x, spec, None)
            _, scale, payload, _ = fn()  # compiles; the same bits as the reference
            assert torch.equal(payload.view(torch.uint8), q.data.view(torch.uint8)), label
            assert torch.equal(scale, q.scale), label
        # The cast and memcpy alternate (A B A B ...): the machine's load drifts over a
        # run, and each row's fraction compares the two under the same load.
        timing, copy = time_interleaved(
            [fn, functools.partial(dst.copy_, src)], warmup=warmup, repeats=repeats
        )
        memcpy_gbs = gb_per_s(2 * NBYTES, copy["median_s"])
        parts = None
        if kernels == "compiled":
            parts = {
                "amax_pass_s": time_median(
                    functools.partial(compiled.amax, x, spec), warmup=warmup, repeats=repeats
                )["median_s"],
                "cast_pass_given_scale_s": time_median(
                    # The scale is x's own (as quantize_current's), so the same arithmetic
                    # (no saturating clamp where that is exact; kernels.cast_with_operand).
                    # Positional (compiled kernels take no keywords): keep_payload=True,
                    # own_amax_scale=True.
                    functools.partial(
                        compiled.cast_with_operand, x, q.scale, spec, None, True, True
                    ),
                    warmup=warmup,
                    repeats=repeats,
                )["median_s"],
                "streaming_read_s": time_median(x.max, warmup=warmup, repeats=repeats)["median_s"],
                "delayed_kernel_s": None,
            }
            if spec.granularity is not G.MX:  # MX scales are always the block's own
                # Delayed scaling's kernel: the scale given (here x's own, so the same
                # bytes) and the amax taken in the same call; it clamps, as a scale from
                # earlier steps may saturate.
                delayed = functools.partial(compiled.quantize_given, x, q.scale, spec, None)
                _, _, payload, _ = delayed()
                assert torch.equal(payload.view(torch.uint8), q.data.view(torch.uint8)), label
                parts["delayed_kernel_s"] = time_interleaved(
                    [delayed, functools.partial(dst.copy_, src)], warmup=warmup, repeats=repeats
                )[0]["median_s"]
            if spec.granularity is G.ROW:
                one_loop = torch.compile(rowwise_in_one_loop, dynamic=False)
                _, scale, payload = one_loop(x, spec)
                assert torch.equal(payload.view(torch.uint8), q.data.view(torch.uint8))
                assert torch.equal(scale, q.scale)
                parts["rowwise_in_one_loop_s"] = time_median(
                    functools.partial(one_loop, x, spec), warmup=warmup, repeats=repeats
                )["median_s"]
        gbs = gb_per_s(in_bytes + out_bytes, timing["median_s"])
        rows.append(
            {
                "input": name,
                "kernels": kernels,
                "allocator": allocator,
                "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."),
                "granularity": label,
                "spec": spec.describe(),
                "bytes_read": in_bytes,
                "bytes_written": out_bytes,
                "median_s": timing["median_s"],
                "min_s": timing["min_s"],
                "times_s": timing["times_s"],
                "gb_per_s": gbs,
                "memcpy_gb_per_s": memcpy_gbs,
                "fraction_of_memcpy": gbs / memcpy_gbs,
                "parts": parts,
            }
        )
    return rows


# The byte routes timed: how payloads are made (restores are timed separately).
PAYLOAD_ROUTES = {
    "convert": ByteRoutes(),
    "bit_fields": ByteRoutes(payload_bytes="bit_fields"),
    "bit_fields via_fp32": ByteRoutes(payload_bytes="bit_fields", code_bytes="via_fp32"),
}
# The lab GPT's MLP input at its default size (each route and case compiles a graph of
# its own, so the list is short).
ROUTE_SHAPES = ((2048, 512),)


def _kernels_with(routes: ByteRoutes) -> Kernels:
    return Kernels(
        "compiled",
        payload_bytes=routes.payload_bytes,
        code_bytes=routes.code_bytes,
        restore_from_words=routes.restore_from_words,
    )


def bench_byte_routes(warmup: int, repeats: int) -> dict[str, Any]:
    """Each byte route's compiled kernel, the routes' runs interleaved, checked bitwise
    equal before timing: a tensorwise E4M3 and a rowwise E5M2 cast of a bf16 tensor,
    payload alone and payload with an fp32 operand; and the restore of an E4M3 payload
    to bf16, by conversion and from int32 words. Returns the rows and, per case, the
    fastest route."""
    rows: list[dict[str, Any]] = []
    faster: dict[str, str] = {}
    specs = {
        "e4m3 tensorwise": ScaleSpec(fmt=E4M3, granularity=G.TENSOR),
        "e5m2 rowwise": ScaleSpec(fmt=E5M2, granularity=G.ROW),
    }
    kernel_sets = {name: _kernels_with(r) for name, r in PAYLOAD_ROUTES.items()}
    for shape in ROUTE_SHAPES:
        x = torch.randn(shape).to(torch.bfloat16)
        for (label, spec), work in itertools.product(specs.items(), (None, torch.float32)):
            fns = {
                name: functools.partial(k.quantize_current, x, spec, work)
                for name, k in kernel_sets.items()
            }
            outs = {name: fn()[2] for name, fn in fns.items()}  # compiles each
            first = next(iter(outs.values()))
            assert first is not None
            for name, out in outs.items():  # the same bytes by every route
                assert out is not None and torch.equal(
                    out.view(torch.uint8), first.view(torch.uint8)
                ), name
            timings = time_interleaved(list(fns.values()), warmup=warmup, repeats=repeats)
            case = f"{shape[0]}x{shape[1]} bf16 {label}, payload" + (
                "" if work is None else " + fp32 operand"
            )
            for name, t in zip(fns, timings, strict=True):
                rows.append({"case": case, "route": name, **t})
            faster[case] = min(zip(fns, timings, strict=True), key=lambda p: p[1]["median_s"])[0]
        spec = specs["e4m3 tensorwise"]
        q = quantize(x, spec)
        restores = {
            name: functools.partial(
                _kernels_with(ByteRoutes(restore_from_words=words)).payload_to_operand,
                q.data,
                q.scale,
                spec,
                torch.bfloat16,
            )
            for name, words in (("convert", False), ("from_words", True))
        }
        outs = {name: fn() for name, fn in restores.items()}
        assert torch.equal(outs["convert"], outs["from_words"])
        timings = time_interleaved(list(restores.values()), warmup=warmup, repeats=repeats)
        case = f"{shape[0]}x{shape[1]} e4m3 payload restored to bf16"
        for name, t in zip(restores, timings, strict=True):
            rows.append({"case": case, "route": name, **t})
        faster[case] = min(zip(restores, timings, strict=True), key=lambda p: p[1]["median_s"])[0]
    return {"rows": rows, "faster": faster}


def report_byte_routes(routes: dict[str, Any]) -> None:
    print("\nbyte routes of the compiled kernels (the same bits by each; fastest per case)")
    print(
        format_table(
            ["case", "route", "median ms", "min ms", "fastest"],
            [
                [
                    r["case"],
                    r["route"],
                    r["median_s"] * 1e3,
                    r["min_s"] * 1e3,
                    "*" if routes["faster"][r["case"]] == r["route"] else "",
                ]
                for r in routes["rows"]
            ],
        )
    )


def first_touch_cost(nbytes: int, warmup: int, repeats: int) -> dict[str, float]:
    """Seconds to write ``nbytes`` into a new allocation against into a reused one (a new
    allocation is fresh pages with the default allocator, reused heap with freed memory
    kept)."""
    reused = torch.empty(nbytes, dtype=torch.uint8)
    reused.fill_(1)
    new = time_median(
        lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(1), warmup=warmup, repeats=repeats
    )["median_s"]
    again = time_median(lambda: reused.fill_(1), warmup=warmup, repeats=repeats)["median_s"]
    return {"bytes": nbytes, "new_allocation_s": new, "reused_s": again}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs; median reported")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument(
        "--routes", action="store_true", help="time only the compiled kernels' byte routes"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    byte_routes = bench_byte_routes(args.warmup, args.repeats)
    report_byte_routes(byte_routes)
    if args.routes:
        if not args.no_write:
            path = write_results(
                "cast-routes",
                {
                    "benchmark": "cast --routes",
                    "what": "the compiled kernels' byte routes (fp8train._kernels.ByteRoutes), "
                    "interleaved; the same bits by each",
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "byte_routes": byte_routes,
                },
            )
            print(f"wrote {path}")
        return 0
    phases: list[dict[str, Any]] = []
    for allocator in ("default", "freed memory kept"):
        if allocator != "default" and not keep_freed_memory():
            print("not glibc: the run with freed memory kept is skipped")
            break
        memcpy = memcpy_bandwidth(NBYTES, warmup=args.warmup, repeats=args.repeats)
        rows: list[dict[str, Any]] = []
        # The eager reference is timed once, with the default allocator.
        kernel_sets = ("eager", "compiled") if allocator == "default" else ("compiled",)
        for name, (shape, dtype) in INPUTS.items():
            rows += bench_input(
                name, shape, dtype, args.warmup, args.repeats, kernel_sets, allocator
            )
        # The payload of a 4096 x 4096 (fp32 input) or 4096 x 8192 (bf16) E4M3 cast.
        touch = {
            f"{n >> 20} MiB": first_touch_cost(n, args.warmup, args.repeats)
            for n in (16 * MIB, 32 * MIB)
        }
        # memcpy again at the end: if the machine got busier meanwhile, the two differ.
        memcpy_after = memcpy_bandwidth(NBYTES, warmup=1, repeats=args.repeats)
        phases.append(
            {
                "allocator": allocator
                if allocator == "default"
                else f"{allocator} ({KEEP_FREED_MEMORY})",
                "memcpy": memcpy,
                "memcpy_at_end": memcpy_after,
                "first_touch": touch,
                "results": rows,
            }
        )
        report(phases[-1])
    print("\n" + "\n".join(target_verdict(phases)["lines"]))
    if not args.no_write:
        path = write_results(
            "cast",
            {
                "benchmark": "cast",
                "what": "amax + scale + cast to E4M3, eager (fp8train.quantize) and compiled "
                "(Kernels('compiled').quantize_current), vs dst.copy_(src); once with the "
                "default allocator, once with glibc keeping freed memory",
                "target_fraction_of_memcpy": TARGET,
                "verdict": target_verdict(phases),
                "bandwidth_convention": BANDWIDTH_CONVENTION,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "phases": phases,
                "byte_routes": byte_routes,
            },
        )
        print(f"wrote {path}")
    return 0


def target_verdict(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Each compiled row against the target, by how much it falls short, and why, from
    its parts: the amax pass against one streaming read of the input (bandwidth-bound
    if about 1) and the cast pass against memcpy moving the cast's bytes (above 1: the
    arithmetic, not memory, sets its pace)."""
    rows, lines = [], []
    for phase in phases:
        for r in phase["results"]:
            if r["kernels"] != "compiled":
                continue
            parts, fraction = r["parts"], r["fraction_of_memcpy"]
            memcpy_of_its_bytes = (r["bytes_read"] + r["bytes_written"]) / (
                r["memcpy_gb_per_s"] * 1e9
            )
            row = {
                "allocator": phase["allocator"],
                "input": r["input"],
                "granularity": r["granularity"],
                "fraction_of_memcpy": fraction,
                "met": fraction >= TARGET,
                "short_by": max(0.0, TARGET - fraction),
                "amax_pass_vs_streaming_read": parts["amax_pass_s"] / parts["streaming_read_s"],
                "cast_pass_vs_memcpy_of_its_bytes": parts["cast_pass_given_scale_s"]
                / memcpy_of_its_bytes,
                # The same bytes moved by delayed scaling's kernel (amax + cast).
                "delayed_kernel_fraction_of_memcpy": None
                if parts.get("delayed_kernel_s") is None
                else memcpy_of_its_bytes / parts["delayed_kernel_s"],
            }
            rows.append(row)
            delayed = row["delayed_kernel_fraction_of_memcpy"]
            lines.append(
                f"{r['input']} {r['granularity']} ({phase['allocator'].split(' (')[0]}): "
                f"{fraction:.2f} of memcpy (target {TARGET}): "
                + ("met" if row["met"] else f"short by {row['short_by']:.2f}")
                + f"; amax pass {row['amax_pass_vs_streaming_read']:.1f}x one streaming "
                f"read, cast pass {row['cast_pass_vs_memcpy_of_its_bytes']:.1f}x memcpy of "
                "its bytes"
                + ("" if delayed is None else f"; delayed scaling's kernel {delayed:.2f} of memcpy")
            )
    return {"rows": rows, "lines": lines}


def report(phase: dict[str, Any]) -> None:
    memcpy, memcpy_after, rows = phase["memcpy"], phase["memcpy_at_end"], phase["results"]
    print(f"\n== allocator: {phase['allocator']}")
    print(
        f"memcpy 64 MiB: {memcpy['gb_per_s']:.2f} GB/s (read+write; "
        f"{memcpy_after['gb_per_s']:.2f} GB/s at the end), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        format_table(
            ["input", "granularity", "kernels", "median ms", "GB/s", "memcpy GB/s", "x memcpy"],
            [
                [
                    r["input"],
                    r["granularity"],
                    r["kernels"],
                    r["median_s"] * 1e3,
                    r["gb_per_s"],
                    r["memcpy_gb_per_s"],
                    r["fraction_of_memcpy"],
                ]
                for r in rows
            ],
        )
    )
    print(
        "\nwhere the compiled time goes (ms): amax pass alone, cast pass alone (scale "
        "given), one streaming read (x.max()), rowwise with amax and cast in one loop, "
        "delayed scaling's amax + cast (scale given)"
    )
    print(
        format_table(
            [
                "input",
                "granularity",
                "total",
                "amax pass",
                "cast pass",
                "read",
                "one loop",
                "delayed",
            ],
            [
                [
                    r["input"],
                    r["granularity"],
                    r["median_s"] * 1e3,
                    r["parts"]["amax_pass_s"] * 1e3,
                    r["parts"]["cast_pass_given_scale_s"] * 1e3,
                    r["parts"]["streaming_read_s"] * 1e3,
                    r["parts"].get("rowwise_in_one_loop_s", float("nan")) * 1e3,
                    (r["parts"]["delayed_kernel_s"] or float("nan")) * 1e3,
                ]
                for r in rows
                if r["parts"]
            ],
        )
    )
    for label, t in phase["first_touch"].items():
        print(
            f"writing {label} into a new allocation: {t['new_allocation_s'] * 1e3:.1f} ms, "
            f"into memory already touched: {t['reused_s'] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    raise SystemExit(main())
