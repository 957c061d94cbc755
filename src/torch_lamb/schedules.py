"""Keras-compatible learning-rate schedules.

Each schedule is called with the optimizer's raw step counter (an ``int``, starting at 0) and
returns a Python ``float``: it runs on the host, so evaluating it never touches a device. The
argument names, defaults and formulas are those of ``keras.optimizers.schedules``.

Arguments are checked when a schedule is made, each error naming the argument and its accepted range.
The ranges are Keras's where Keras gives a usable learning rate, and narrower only where Keras's own
schedule would return an inf, a NaN or a negative rate (which the optimizer refuses at that step, long
into a run): a negative ``power``, ``decay_rate``, ``alpha``, ``m_mul`` or learning rate, ``t_mul`` < 1,
``decay_steps`` that is not a finite number > 0, and boundaries that are negative, unsorted or repeated.

The built-in schedules also take the step as a 0-dim integer tensor (``tensor_steps = True``) and then
return a 0-dim float64 tensor on its device, computed with torch ops in the same double-precision
formula (so its float32 rounding is the float one's): ``capturable=True`` evaluates them so on the
device step counter, where a captured CUDA graph advances them.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "takes_tensor_steps",
]

Step = Any  # an int, or a 0-dim tensor (float64 once the schedule has read it)


def _float_step(step: Step) -> Step:
    """The step as a float64 tensor (a tensor step), or as it is (an int: Python's float math)."""
    return step.to(torch.float64) if isinstance(step, Tensor) else step


def _floor(x: Step) -> Step:
    return torch.floor(x) if isinstance(x, Tensor) else math.floor(x)


def _ceil(x: Step) -> Step:
    return torch.ceil(x) if isinstance(x, Tensor) else math.ceil(x)


def _cos(x: Step) -> Step:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def _log(x: Step) -> Step:
    return torch.log(x) if isinstance(x, Tensor) else math.log(x)


def _power(base: float, exponent: Step) -> Step:
    return torch.pow(base, exponent) if isinstance(exponent, Tensor) else base**exponent


def _divide(numerator: float, denominator: Step) -> Step:
    """``numerator / denominator``; torch would form ``float / tensor`` as ``reciprocal(tensor) * float``."""
    if isinstance(denominator, Tensor):
        return torch.full_like(denominator, numerator) / denominator
    return numerator / denominator


def _at_most(x: Step, high: float) -> Step:
    return torch.clamp(x, max=high) if isinstance(x, Tensor) else min(x, high)


def _select(condition: Any, if_true: Step, if_false: Step) -> Step:
    """``if_true if condition else if_false``, elementwise when ``condition`` is a tensor (both sides computed)."""
    if isinstance(condition, Tensor):
        return torch.where(condition, if_true, if_false)
    return if_true if condition else if_false


def takes_tensor_steps(schedule: Any) -> bool:
    """Whether ``schedule(step)`` takes a 0-dim tensor step with torch ops only (no host read): the class that
    defines its ``__call__`` says so with ``tensor_steps = True`` (the built-in schedules do; a subclass that
    overrides ``__call__`` must say it again)."""
    owner = next((c for c in type(schedule).__mro__ if "__call__" in c.__dict__), None)
    return owner is not None and bool(owner.__dict__.get("tensor_steps", False))


def _number(name: str, value: Any, *, low: float | None = None, low_open: bool = False, why: str = "") -> Any:
    """A schedule's numeric argument, checked when the schedule is made (not at its first call, minutes into a run).

    Python ints and floats are kept as given (so ``get_config`` and the formulas see them unchanged); other
    real numbers (numpy scalars) become Python floats. Bools, strings, tensors and non-finite values are refused.
    """
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
        reason = f" ({why})" if why else ""
        raise ValueError(f"`{name}` must be a finite number{bound}{reason}. Received: {name}={value!r}")
    return value if type(value) in (int, float) else float(value)


def _steps(name: str, value: Any) -> Any:
    """A number of steps that divides the step counter: finite and > 0 (Keras checks only > 0)."""
    return _number(name, value, low=0.0, low_open=True)


def _rate(name: str, value: Any) -> Any:
    """A learning rate a schedule returns or starts from: the optimizer refuses a negative one at its step."""
    return _number(name, value, low=0.0, why="a learning rate")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (True or False). Received: {name}={value!r}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`name` must be a str. Received: name={value!r}")
    return value


def _numbers(name: str, value: Any, check: Callable[[str, Any], Any]) -> list[Any]:
    """A sequence of numbers (a list, tuple or 1-d array), each checked by ``check`` under the name ``name[i]``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"`{name}` must be a list of numbers. Received: {name}={value!r}")
    return [check(f"{name}[{i}]", item) for i, item in enumerate(value)]


class LearningRateSchedule:
    """Base class: subclasses implement ``__call__(step) -> float``.

    ``step`` is the optimizer's raw micro-step counter (under gradient accumulation the schedule
    sees every call to ``step()``, as in Keras). A subclass whose ``__call__`` also takes a 0-dim tensor
    step (torch ops only, no ``float()``/``if`` on it) may set ``tensor_steps = True`` in its class body,
    so that ``capturable=True`` evaluates it on the device.
    """

    tensor_steps = False

    def __call__(self, step: int) -> float:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' must override `__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored if staircase)."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
        name: str = "ExponentialDecay",
    ) -> None:
        self.initial_learning_rate = _rate("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _steps("decay_steps", decay_steps)
        # a negative base alternates the sign (staircase) or has no real power (NaN in Keras)
        self.decay_rate = _number("decay_rate", decay_rate, low=0.0)
        self.staircase = _flag("staircase", staircase)
        self.name = _name(name)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        p = _float_step(step) / self.decay_steps
        if self.staircase:
            p = _floor(p)
        return self.initial_learning_rate * _power(self.decay_rate, p)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to and including ``boundaries[0]``, ``values[i]`` up to ``boundaries[i]``..."""

    def __init__(
        self,
        boundaries: Sequence[float],
        values: Sequence[float],
        name: str = "PiecewiseConstant",
    ) -> None:
        checked_boundaries = _numbers("boundaries", boundaries, lambda n, v: _number(n, v, low=0.0, why="a step"))
        checked_values = _numbers("values", values, _rate)
        if not checked_boundaries or len(checked_boundaries) != len(checked_values) - 1:
            # Keras indexes boundaries[0] at every call: no boundaries crash there
            raise ValueError(
                "`boundaries` must hold at least one step and exactly one less than `values`. "
                f"Received: boundaries={boundaries!r} of length {len(checked_boundaries)}, "
                f"and values={values!r} of length {len(checked_values)}."
            )
        for i, (low, high) in enumerate(itertools.pairwise(checked_boundaries)):
            if not low < high:  # Keras adds up every range a step falls in: unsorted ranges overlap
                raise ValueError(
                    "`boundaries` must be strictly increasing. "
                    f"Received: boundaries={boundaries!r} (boundaries[{i}]={low!r} >= boundaries[{i + 1}]={high!r})"
                )
        self.boundaries = checked_boundaries
        self.values = checked_values
        self.name = _name(name)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        if isinstance(step, Tensor):  # the first boundary that holds wins: select from the last one back
            step = _float_step(step)
            out = torch.full_like(step, float(self.values[-1]))
            for boundary, value in zip(reversed(self.boundaries), reversed(self.values[:-1])):
                out = torch.where(step <= boundary, float(value), out)
            return out
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return value
        return self.values[-1]


class PolynomialDecay(LearningRateSchedule):
    """Polynomial decay from ``initial_learning_rate`` to ``end_learning_rate`` over ``decay_steps``."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str = "PolynomialDecay",
    ) -> None:
        self.initial_learning_rate = _rate("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _steps("decay_steps", decay_steps)
        self.end_learning_rate = _rate("end_learning_rate", end_learning_rate)
        # a negative power divides by `(1 - p) = 0` at the end of each decay (Keras returns inf there)
        self.power = _number("power", power, low=0.0)
        self.cycle = _flag("cycle", cycle)
        self.name = _name(name)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        step = _float_step(step)
        decay_steps = float(self.decay_steps)
        if self.cycle:
            decay_steps = decay_steps * _select(step == 0, 1.0, _ceil(step / self.decay_steps))
        else:
            step = _at_most(step, decay_steps)
        p = step / decay_steps
        start, end = self.initial_learning_rate, self.end_learning_rate
        return (start - end) * (1 - p) ** self.power + end


class InverseTimeDecay(LearningRateSchedule):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored if staircase)."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
        name: str = "InverseTimeDecay",
    ) -> None:
        self.initial_learning_rate = _rate("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _steps("decay_steps", decay_steps)
        # a negative rate drives `1 + decay_rate * p` through 0: an infinite, then a negative lr (as in Keras)
        self.decay_rate = _number("decay_rate", decay_rate, low=0.0)
        self.staircase = _flag("staircase", staircase)
        self.name = _name(name)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        p = _float_step(step) / self.decay_steps
        if self.staircase:
            p = _floor(p)
        return _divide(self.initial_learning_rate, 1 + self.decay_rate * p)


class CosineDecay(LearningRateSchedule):
    """Cosine decay, with an optional linear warmup to ``warmup_target`` over ``warmup_steps``."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        name: str = "CosineDecay",
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.initial_learning_rate = _rate("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _steps("decay_steps", decay_steps)
        # the floor is `alpha * lr`: a negative alpha ends on a negative lr; above 1 the schedule rises, as in Keras
        self.alpha = _number("alpha", alpha, low=0.0, why="the final fraction of the lr")
        self.name = _name(name)
        self.warmup_target = None if warmup_target is None else _rate("warmup_target", warmup_target)
        self.warmup_steps = _number("warmup_steps", warmup_steps, low=0.0)

    def _decay(self, step: Step, decay_from: float) -> Step:
        cosine = 0.5 * (1.0 + _cos(math.pi * (step / self.decay_steps)))
        return decay_from * ((1 - self.alpha) * cosine + self.alpha)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        step = _float_step(step)
        if self.warmup_target is None:
            return self._decay(_at_most(step, self.decay_steps), self.initial_learning_rate)
        step = _at_most(step, self.decay_steps + self.warmup_steps)
        delta = self.warmup_target - self.initial_learning_rate
        if not isinstance(step, Tensor):
            if step < self.warmup_steps:
                return delta * (step / self.warmup_steps) + self.initial_learning_rate
            return self._decay(step - self.warmup_steps, self.warmup_target)
        decayed = self._decay(step - self.warmup_steps, self.warmup_target)
        if not self.warmup_steps:
            return decayed  # no warmup phase (and no 0/0 to form for it)
        warming = delta * (step / self.warmup_steps) + self.initial_learning_rate
        return torch.where(step < self.warmup_steps, warming, decayed)


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR): periods grow by ``t_mul``, peaks by ``m_mul``."""

    def __init__(
        self,
        initial_learning_rate: float,
        first_decay_steps: int,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
        alpha: float = 0.0,
        name: str = "SGDRDecay",
    ) -> None:
        self.initial_learning_rate = _rate("initial_learning_rate", initial_learning_rate)
        self.first_decay_steps = _steps("first_decay_steps", first_decay_steps)
        # below 1 the periods shrink to a finite total, after which Keras's log() turns every lr into NaN
        self.t_mul = _number("t_mul", t_mul, low=1.0, why="each period's length over the previous one's")
        # a negative m_mul makes every other period's lr negative
        self.m_mul = _number("m_mul", m_mul, low=0.0, why="each period's peak over the previous one's")
        self.alpha = _number("alpha", alpha, low=0.0, why="the final fraction of the lr")
        self.name = _name(name)

    tensor_steps = True

    def __call__(self, step: Step) -> Step:
        fraction = _float_step(step) / self.first_decay_steps
        if self.t_mul == 1.0:
            restart = _floor(fraction)
            fraction = fraction - restart
        else:
            restart = _floor(_log(1.0 - fraction * (1.0 - self.t_mul)) / math.log(self.t_mul))
            done = (1.0 - _power(self.t_mul, restart)) / (1.0 - self.t_mul)
            fraction = (fraction - done) / _power(self.t_mul, restart)
        cosine = 0.5 * _power(self.m_mul, restart) * (1.0 + _cos(math.pi * fraction))
        return self.initial_learning_rate * ((1 - self.alpha) * cosine + self.alpha)
