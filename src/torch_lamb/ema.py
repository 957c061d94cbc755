"""Exponential moving average of the parameters, as Keras's ``use_ema`` keeps it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ema_momentum_at", "ema_weight", "overwrite_with_averages", "should_overwrite", "update_averages"]


def ema_momentum_at(iterations: int, ema_momentum: float) -> float:
    """The momentum used after ``iterations`` updates: 0 before the first update completes."""
    return 0.0 if iterations == 0 else float(ema_momentum)


def ema_weight(momentum: float) -> float:
    """The lerp weight ``1 - momentum``, rounded to float32 as Keras forms it."""
    return float(np.float32(1.0) - np.float32(momentum))


def update_averages(averages: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """``avg = momentum * avg + (1 - momentum) * param`` for every pair (one foreach pass)."""
    if averages:
        params = [p.to(a.dtype) if p.dtype != a.dtype else p for a, p in zip(averages, params)]
        torch._foreach_lerp_(list(averages), params, ema_weight(momentum))


def should_overwrite(iterations: int, frequency: int | None) -> bool:
    """Keras's test ``(iterations + 1) % frequency == 0`` (never when frequency is None or 0)."""
    return bool(frequency) and (iterations + 1) % frequency == 0


def overwrite_with_averages(params: Sequence[Tensor], averages: Sequence[Tensor]) -> None:
    """Copy the averages into the parameters."""
    if params:
        torch._foreach_copy_(list(params), list(averages))
