"""torch_lamb: the LAMB optimizer for PyTorch with Keras 3's complete optimizer contract."""

from .optimizer import Lamb
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
    "Lamb",
    "LearningRateSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "__version__",
]
