"""torch_lamb: the LAMB optimizer for PyTorch with Keras 3's complete optimizer contract."""

from .backends.kernel_build import KernelStatus, kernel_status
from .optimizer import Lamb
from .recipes import transformer_recipe
from .schedules import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

__version__ = "0.1.0"

__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "KernelStatus",
    "Lamb",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "__version__",
    "kernel_status",
    "transformer_recipe",
]
