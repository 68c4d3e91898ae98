"""Know before you rent: predict FP8's speed-up per layer on a given GPU, from the CPU.

* :mod:`~fp8train.planner.gpus`: the GPU table (peak throughput, bandwidths, which FP8
  scalings each GEMM takes) and the GEMM-efficiency curve;
* :func:`plan_linear`: one Linear's three GEMMs in bf16 and FP8 plus the recipe's
  quantisation passes;
* :func:`plan_model`: every Linear of a model with its real token count, a whole-step
  estimate and, with ``calibrate_steps``, numerics and a recommendation per layer;
  ``plan.filter`` plugs into ``fp8train.convert``;
* :mod:`~fp8train.planner.archs`: Llama-, Mistral- and Qwen-style decoders from their
  published dimensions (no download).

``fp8train plan`` is the command line; ``docs/planner.md`` explains every term of the
model, its assumptions and where it is known to be wrong.
"""

from fp8train.planner.archs import ARCHS, ArchConfig, build
from fp8train.planner.gpus import GPUS, Gpu, get_gpu
from fp8train.planner.model import LinearPlan, plan_linear, quant_passes
from fp8train.planner.walk import LayerRow, ModelPlan, StepEstimate, plan_model

__all__ = [
    "ARCHS",
    "GPUS",
    "ArchConfig",
    "Gpu",
    "LayerRow",
    "LinearPlan",
    "ModelPlan",
    "StepEstimate",
    "build",
    "get_gpu",
    "plan_linear",
    "plan_model",
    "quant_passes",
]
