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
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
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
    try:
        return number(name, value)
    except ValueError:
        raise ValueError(
            f"`{name}` must be a float >= 0, a LearningRateSchedule or a callable. "
            f"Received: {name}={value!r}"
        ) from None


def tensor_learning_rate(name: str, value: torch.Tensor, params: Any = ()) -> torch.Tensor:
    """A learning rate kept as a tensor (``capturable``: the step reads it on the device). Its form is checked
    here; its value is not (reading it would be a host sync), so a negative one is the caller's to avoid."""
    if value.dim() != 0 or not value.is_floating_point() or value.requires_grad:
        raise ValueError(
            f"A tensor `{name}` must be a 0-dim floating-point tensor that does not require grad. "
            f"Received: {name}=tensor of shape {tuple(value.shape)}, dtype {value.dtype}, "
            f"requires_grad={value.requires_grad}"
        )
    first = next((p for p in params if isinstance(p, torch.Tensor)), None)
    if first is not None and value.device != first.device:
        raise ValueError(
            f"A tensor `{name}` must live on its parameters' device ({first.device}), where the step reads it "
            f"without a copy. Received: {name} on {value.device}"
        )
    return value


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


OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum", "ema_overwrite_frequency",
           "loss_scale_factor", "gradient_accumulation_steps")


def _optional_int(name: str, value: Any, low: int) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"`{name}` must be an integer >= {low} or None. Received: {name}={value!r}")
    return value


def options(**values: Any) -> dict[str, Any]:
    """The optimizer-wide options (:data:`OPTIONS`), checked: at construction, and again at each step
    since they are plain attributes a user may edit."""
    clips = {k: values[k] for k in ("clipnorm", "clipvalue", "global_clipnorm") if values[k] is not None}
    if len(clips) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
            f"Received: {', '.join(f'{k}={v!r}' for k, v in clips.items())}"
        )
    if not isinstance(values["use_ema"], bool):
        raise ValueError(f"`use_ema` must be a bool. Received: use_ema={values['use_ema']!r}")
    out = {k: optional_positive(k, values[k])
           for k in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor")}
    out["use_ema"] = values["use_ema"]
    out["ema_momentum"] = number("ema_momentum", values["ema_momentum"], low=0.0, high=1.0, high_open=False)
    out["ema_overwrite_frequency"] = _optional_int("ema_overwrite_frequency", values["ema_overwrite_frequency"], 1)
    out["gradient_accumulation_steps"] = _optional_int(
        "gradient_accumulation_steps", values["gradient_accumulation_steps"], 2)
    return out
