"""torch_lamb: the LAMB optimizer for PyTorch with Keras 3's complete optimizer contract.

The public names are imported on first use (PEP 562), so that ``import torch_lamb.cli`` (the ``torch-lamb``
command's ``--version`` and ``--help``) does not import torch; ``from torch_lamb import Lamb`` is unchanged.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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

_HOMES = {  # public name -> the submodule that defines it
    "KernelStatus": ".backends.kernel_build",
    "kernel_status": ".backends.kernel_build",
    "Lamb": ".optimizer",
    "transformer_recipe": ".recipes",
    **{name: ".schedules" for name in (
        "CosineDecay", "CosineDecayRestarts", "ExponentialDecay", "InverseTimeDecay", "LearningRateSchedule",
        "PiecewiseConstantDecay", "PolynomialDecay")},
}

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


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``torch_lamb.functional``), imported the first time it is asked for."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports does not
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
