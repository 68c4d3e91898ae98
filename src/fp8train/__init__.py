"""fp8train: bit-exact FP8 mixed-precision training for PyTorch."""

from fp8train import formats, optim
from fp8train.accumulator import TensorCoreAccumulator
from fp8train.activations import Fp8SavedActivations
from fp8train.cast import cast, round_to_grid
from fp8train.formats import E2M1, E4M3, E5M2, E8M0, INT8, Format
from fp8train.guard import Diagnosis, Guard, GuardThresholds
from fp8train.history import AmaxHistory
from fp8train.loss_scaler import LossScaler, LossScalerConfig
from fp8train.matmul import scaled_mm
from fp8train.monitor import HealthWarning, Monitor, Thresholds
from fp8train.nn import (
    Fp8Linear,
    convert,
    load_recipe_state_dict,
    migrate_recipe_state,
    recipe_state_dict,
)
from fp8train.optim import Fp8AdamW
from fp8train.recipes import RECIPE_NAMES, Recipe
from fp8train.scaling import Granularity, NonFiniteAmaxError, ScaleSpec
from fp8train.tensor import ScaledTensor, quantize

__version__ = "0.2.0"

__all__ = [
    "E2M1",
    "E4M3",
    "E5M2",
    "E8M0",
    "INT8",
    "RECIPE_NAMES",
    "AmaxHistory",
    "Diagnosis",
    "Format",
    "Fp8AdamW",
    "Fp8Linear",
    "Fp8SavedActivations",
    "Granularity",
    "Guard",
    "GuardThresholds",
    "HealthWarning",
    "LossScaler",
    "LossScalerConfig",
    "Monitor",
    "NonFiniteAmaxError",
    "Recipe",
    "ScaleSpec",
    "ScaledTensor",
    "TensorCoreAccumulator",
    "Thresholds",
    "__version__",
    "cast",
    "convert",
    "formats",
    "load_recipe_state_dict",
    "migrate_recipe_state",
    "optim",
    "quantize",
    "recipe_state_dict",
    "round_to_grid",
    "scaled_mm",
]
