"""fp8train on a GPU: the CUDA tests, the hardware GEMM against the emulation, and Linear
and train-step timings against bf16 and torchao (issue 28).

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu.py [--quick]
        [--sections tests,gemm,linear,train] [--budget-s 400] [--name gpu]

Sections, in this order (``benchmarks/_gpu_bench.py`` holds them; each says what it
measures):

1. ``tests``: ``tests/numerics/test_cuda_route.py``, ``tests/test_kernels_cuda.py``
   (compiled quantisation kernels, triton on CUDA, bitwise equal to the eager ones) and
   any other test file that skips itself without CUDA, run by pytest on the device,
   pass/fail counts per file;
2. ``gemm``: every GEMM of every recipe that this GPU's compute capability routes to
   ``torch.nn.functional.scaled_mm`` (``fp8train.cuda_gemm.route``), hardware against
   the emulation and against float64 on the same quantised operands; bitwise where it
   must hold (the "exact" case: integer operands whose sums no accumulator rounds);
3. ``linear``: forward + backward of one Linear at (M, K, N) in (1024, 2048, 1024),
   (4096, 4096, 4096), (4096, 8192, 16384), (16384, 4096, 14336): bf16, each recipe
   the GPU takes, torchao's float8 tensorwise and rowwise where torchao imports (it
   can travel as a wheel; "not installed" otherwise), all under ``torch.compile``,
   CUDA-event timing, median after warm-up;
4. ``train``: a train step of the lab GPT (d_model 1024) and of a Llama-style block
   (hidden 4096), bf16 and each recipe.

``linear`` and ``train`` also record ``fp8train.planner``'s prediction for this GPU
(found in the planner's table by its name; "no planner entry" for a part the table does
not describe) beside each measured shape or model and recipe: predicted bf16 and FP8
times, predicted and measured speed-up, and the error, predicted / measured - 1.

A section that fails is recorded with its error and the run goes on; past the time
budget (``--budget-s``, seconds of work) no further section, shape, model or variant
starts, which keeps a run within the 8 minutes one H100 may give it, whatever the
compilations cost (what the budget cut is listed as skipped); ``--quick`` takes smaller
sizes. Results: ``benchmarks/results/gpu.json`` (``gpu-quick.json`` with ``--quick``),
with the GPU, its compute capability, the driver, torch, CUDA, triton and torchao
versions; ``docs/gen_performance.py`` shows it as the performance page's CUDA section.

Exit status: 0 when every section ran clean; 1 when the results hold a failed section,
a failed test or a broken bitwise check (the file is written all the same); 2 for a bad
option; 3 without a CUDA device (nothing is run or written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Last on the path: an installed fp8train wins; a GPU machine with only the checkout
# finds its src/.
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))
import _gpu_bench as bench

from fp8train import cuda_gemm


def main(argv: list[str] | None = None) -> int:
    args = bench.parse_args(argv)
    blocker = bench.cuda_blocker()
    if blocker is not None:
        print(
            f"benchmarks/gpu.py needs a CUDA GPU: {blocker}. Nothing was run or written. "
            "Run it on a GPU machine; on a CPU, the CUDA route's checks are "
            "tests/numerics/test_cuda_route.py.",
            file=sys.stderr,
        )
        return bench.EXIT_NO_CUDA
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = bench.gpu_info(device)
    print(f"{gpu['name']} (compute capability {gpu['compute_capability']}), torch {gpu['torch']}")
    body = bench.run_benchmark(args, device, cuda_gemm.device_capability(device), gpu)
    path = bench.write(args.name, body, args.results_dir)
    print("\n" + bench.summary(body))
    print(f"\nwritten to {path} after {body['elapsed_s']:.0f} s")
    for problem in body["problems"]:
        print(f"PROBLEM: {problem}")
    return bench.EXIT_PROBLEMS if body["problems"] else bench.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
