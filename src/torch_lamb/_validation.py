"""Argument checks: each error names the argument and the accepted range."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from .functional import f32
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
    if (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
            and not value.is_meta):  # a meta tensor has no value to read
        return float(value)  # torch's accepted tensor forms: 0-dim or one element
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
    x32 = f32(x)  # the math runs in float32: a value that rounds out of range there is out of range
    if math.isinf(x32) or (low_open and not x32 > low) or (high_open and not x32 < high):
        raise ValueError(
            f"`{name}` must stay in range when rounded to float32 (where the update runs); {x!r} rounds to "
            f"{x32!r}. Received: {name}={value!r}"
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
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element: a tensor `{name}` holds one number. "
                         f"Received: {name}=tensor of shape {tuple(value.shape)}")
    try:
        return number(name, value)
    except ValueError:
        raise ValueError(
            f"`{name}` must be a float >= 0, a LearningRateSchedule or a callable. "
            f"Received: {name}={value!r}"
        ) from None


def tensor_learning_rate(name: str, value: torch.Tensor, params: Any = ()) -> torch.Tensor:
    """A learning rate kept as a tensor (``capturable``: the step reads it on the device). Its form is checked
    here; its value is not (reading it would be a host sync), so a negative one is the caller's to avoid.
    Returns a 0-dim view of it (torch takes any one-element shape)."""
    if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
        raise ValueError(
            f"Tensor lr must be 1-element: a tensor `{name}` must be a one-element floating-point tensor that does "
            "not require grad. "
            f"Received: {name}=tensor of shape {tuple(value.shape)}, dtype {value.dtype}, "
            f"requires_grad={value.requires_grad}"
        )
    first = next((p for p in params if isinstance(p, torch.Tensor)), None)
    if first is not None and value.device != first.device:
        raise ValueError(
            f"A tensor `{name}` must live on its parameters' device ({first.device}), where the step reads it "
            f"without a copy. Received: {name} on {value.device}"
        )
    return value if value.dim() == 0 else value.view(())


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


def optional_int(name: str, value: Any, low: int) -> int | None:
    """None, or an int (not a bool) >= ``low``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"`{name}` must be an integer >= {low} or None. Received: {name}={value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """A bool (not 0/1, not a tensor)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return value
