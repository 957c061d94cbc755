"""Argument checks: each error names the argument and the accepted range."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from .schedules import LearningRateSchedule


class _Default(float):
    """A float default that remembers it was not given, so aliases can detect double spellings."""


def is_given(value: Any) -> bool:
    return not isinstance(value, _Default)


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number or a 0-dim real tensor, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    return None


def number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
           low_open: bool = False, high_open: bool = True) -> float:
    """Check that ``value`` is a finite real number in the given interval; return it as float."""
    x = _real(value)
    ok = (
        x is not None
        and math.isfinite(x)
        and (x > low if low_open else x >= low)
        and (x < high if high_open else x <= high)
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must be a finite real number in {lo}{low}, {high}{hi}. Received: {name}={value!r}"
        )
    return x


def optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return number(name, value, low=0.0, low_open=True)


def optional_nonnegative(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return number(name, value, low=0.0)


def call_arity(fn: Callable[..., Any]) -> int:
    """1 if ``fn`` wants the step as its argument (schedules), 0 for zero-argument callables."""
    if isinstance(fn, LearningRateSchedule):
        return 1
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0
    required = [
        p for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return 1 if required else 0


def learning_rate(name: str, value: Any) -> Any:
    """A non-negative number, a schedule (called with the step) or a zero-argument callable."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    try:
        return number(name, value)
    except ValueError:
        raise ValueError(
            f"`{name}` must be a float >= 0, a LearningRateSchedule or a callable. "
            f"Received: {name}={value!r}"
        ) from None


def beta(name: str, value: Any) -> Any:
    """A number in [0, 1), a 0-dim tensor in [0, 1) or a zero-argument callable returning one."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    # Stored as a plain float (numpy scalars and tensors too), so that checkpoints load with
    # torch.load(weights_only=True).
    return number(name, value, low=0.0, high=1.0)


def resolve(name: str, value: Any, *, step: int | None = None, **bounds: Any) -> float:
    """Evaluate a (possibly callable) hyperparameter for this step and check its range."""
    if callable(value) and not isinstance(value, torch.Tensor):
        value = value(step) if call_arity(value) else value()
    return number(name, value, **bounds)
