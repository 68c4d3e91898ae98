"""fp8train: bit-exact FP8 mixed-precision training for PyTorch."""

from fp8train import formats
from fp8train.cast import cast, round_to_grid
from fp8train.formats import E2M1, E4M3, E5M2, E8M0, INT8, Format
from fp8train.history import AmaxHistory
from fp8train.loss_scaler import LossScaler
from fp8train.matmul import scaled_mm
from fp8train.monitor import HealthWarning, Monitor, Thresholds
from fp8train.nn import Fp8Linear, convert, load_recipe_state_dict, recipe_state_dict
from fp8train.recipes import RECIPE_NAMES, Recipe
from fp8train.scaling import Granularity, NonFiniteAmaxError, ScaleSpec
from fp8train.tensor import ScaledTensor, quantize

__all__ = [
    "formats",
    "Format",
    "E4M3",
    "E5M2",
    "E8M0",
    "E2M1",
    "INT8",
    "cast",
    "round_to_grid",
    "Granularity",
    "ScaleSpec",
    "NonFiniteAmaxError",
    "AmaxHistory",
    "ScaledTensor",
    "quantize",
    "scaled_mm",
    "Recipe",
    "RECIPE_NAMES",
    "Fp8Linear",
    "convert",
    "recipe_state_dict",
    "load_recipe_state_dict",
    "LossScaler",
    "Monitor",
    "Thresholds",
    "HealthWarning",
]
