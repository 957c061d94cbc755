"""The plan of one ``Lamb.step()`` call: every host-side scalar, decided before anything changes.

:func:`plan_step` reads the optimizer's options, its param groups (which users and schedulers may
have edited since the last call) and its counters, checks all of them, and returns a frozen
:class:`StepPlan`. Whatever can fail fails here, so a call that raises has changed nothing. The
backends only read the plan; :mod:`torch_lamb.nonfinite` transforms it (``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import _validation as check
from .backends import IMPLEMENTATIONS
from .functional import LambScalars, f32, lamb_scalars

if TYPE_CHECKING:
    from .optimizer import Lamb

__all__ = ["ClipSpec", "GroupHyper", "StepPlan", "plan_step"]

WEIGHT_DECAY_MODES = ("decoupled", "adaptive")


@dataclass(frozen=True)
class ClipSpec:
    """Keras's gradient clipping of this call: at most one kind."""

    kind: str | None = None  # None, "value", "norm" (per tensor) or "global"
    value: float = 0.0


@dataclass(frozen=True)
class GroupHyper:
    """One param group's resolved hyperparameters for this call (callables and schedules evaluated).

    ``lr`` is a 0-dim tensor only under ``capturable`` (torch's convention: the step reads it on the device,
    never on the host; :mod:`torch_lamb.capturable` puts it, and its decay factor, into the scalars).
    """

    lr: float | Tensor
    beta_1: float
    beta_2: float
    epsilon: float
    weight_decay: float | None
    weight_decay_mode: str
    min_trust_ratio: float | None
    max_trust_ratio: float | None

    def scalars(self, step: int) -> LambScalars:
        lr = 0.0 if isinstance(self.lr, Tensor) else self.lr  # a tensor: torch_lamb.capturable sets lr and decay
        return lamb_scalars(
            lr=lr, beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
            weight_decay=self.weight_decay, step=step, weight_decay_mode=self.weight_decay_mode,
            min_trust_ratio=self.min_trust_ratio, max_trust_ratio=self.max_trust_ratio,
        )


@dataclass(frozen=True)
class StepPlan:
    """Everything one call does, as host values (or, under ``capturable`` or a device-side guard, 0-dim
    device tensors where a value changes without the host: :mod:`torch_lamb.capturable`).

    ``call`` counts calls (it drives schedules, accumulation windows and the EMA overwrite period);
    ``iterations`` counts updates applied before this call, as Keras's ``iterations``.
    """

    call: int
    iterations: int
    updating: bool  # False: an accumulation micro-step (gradients are only accumulated)
    loss_scale: float | None
    accumulation: float | Tensor | None  # at an update under accumulation: the window's divisor
    accumulating: bool  # gradient_accumulation_steps is set (accumulators exist)
    clip: ClipSpec
    groups: tuple[GroupHyper, ...]
    scalars: tuple[LambScalars, ...] | None  # per group, on updating calls
    ema_weight: float | Tensor | None  # lerp weight of the averages this call (None: no EMA)
    ema_momentum: float  # the configured momentum (the guard derives its own weights from it)
    overwrite: bool  # copy the averages into the weights after this call's EMA
    scheduled: tuple[float | None, ...] = ()  # per group, the scheduled learning rate (None: the group's own)
    overwrite_keep: Tensor | None = None  # device guard: 1 to overwrite, 0 to keep (a skipped call)
    apply: bool = True  # False: the call changes no tensor (a skipped non-finite call)

    def write_back(self, opt: Lamb) -> None:
        """Show this call's values in the groups, in both spellings (after every check passed)."""
        marks = []
        for group, lr, hyper in zip(opt.param_groups, self.scheduled, self.groups):
            if lr is not None:
                group["lr"] = lr
            group["beta_1"], group["beta_2"], group["epsilon"] = hyper.beta_1, hyper.beta_2, hyper.epsilon
            group["betas"], group["eps"] = (hyper.beta_1, hyper.beta_2), hyper.epsilon
            marks.append((hyper.beta_1, hyper.beta_2, hyper.epsilon))
        opt._alias_marks = marks

    def with_step(self, step: int) -> StepPlan:
        """The same plan with bias corrections for update number ``step``."""
        if self.scalars is None:
            return self
        return replace(self, scalars=tuple(g.scalars(step) for g in self.groups))


def live_values(group: dict[str, Any], mark: tuple[Any, Any, Any] | None,
                sources: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(beta_1, beta_2, epsilon)`` for this call, whichever spelling was edited since the last write.

    torch's schedulers (``OneCycleLR``, ``CyclicLR``) read and write ``betas``; users may write
    ``beta_1``/``beta_2``/``epsilon`` or ``eps``. Both spellings changed, to different values, is an error.
    """
    canonical = (group["beta_1"], group["beta_2"], group["epsilon"])
    betas = group.get("betas", canonical[:2])
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"`betas` must be a pair (beta_1, beta_2). Received: betas={betas!r}")
    alias = (betas[0], betas[1], group.get("eps", canonical[2]))
    if mark is None or _same(alias, mark) or _same(alias, canonical):
        chosen = canonical
    elif _same(canonical, mark):
        chosen = alias
    else:
        raise ValueError(
            f"`betas`/`eps` {alias[:2]}, {alias[2]} and `beta_1`/`beta_2`/`epsilon` {canonical} were both "
            "changed, to different values: set one spelling."
        )
    values = dict(zip(("beta_1", "beta_2", "epsilon"), chosen))
    for key, fn in sources.items():
        values[key] = fn
    return values["beta_1"], values["beta_2"], values["epsilon"]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(x is y or (not callable(x) and not callable(y) and bool(x == y)) for x, y in zip(a, b))


def resolve_group(group: dict[str, Any], index: int, lr: float | None,
                  live: tuple[Any, Any, Any] | None = None, capturable: bool = False) -> GroupHyper:
    """Check a group's (possibly edited) values and evaluate its callables; errors name the group.

    Under ``capturable`` a 0-dim tensor ``lr`` stays a tensor, checked without reading its value."""
    where = f" (param group {index})"
    try:
        beta_1, beta_2, epsilon = live if live is not None else (group["beta_1"], group["beta_2"], group["epsilon"])
        beta_1 = check.resolve("beta_1", beta_1, high=1.0)  # float32 rounding below 1 (check.number)
        beta_2 = check.resolve("beta_2", beta_2, high=1.0)
        if not isinstance(group["layer_adaptation"], bool):
            raise ValueError(f"`layer_adaptation` must be a bool. Received: {group['layer_adaptation']!r}")
        mode = group["weight_decay_mode"]
        if mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"`weight_decay_mode` must be one of {list(WEIGHT_DECAY_MODES)}. Received: {mode!r}")
        if lr is None and capturable and isinstance(group["lr"], Tensor):
            lr_value: float | Tensor = check.tensor_learning_rate("lr", group["lr"], group["params"])
        else:
            lr_value = check.number("lr", group["lr"] if lr is None else lr)
        return GroupHyper(
            lr=lr_value,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=check.number("epsilon", epsilon),
            weight_decay=check.optional_nonnegative("weight_decay", group["weight_decay"]),
            weight_decay_mode=mode,
            min_trust_ratio=check.optional_nonnegative("min_trust_ratio", group["min_trust_ratio"]),
            max_trust_ratio=check.optional_nonnegative("max_trust_ratio", group["max_trust_ratio"]),
        )
    except (ValueError, TypeError) as err:
        raise type(err)(f"{err}{where}") from None


def plan_step(opt: Lamb) -> StepPlan:
    """The plan of the next call of ``opt.step()`` (raises, changing nothing, on any bad value)."""
    if opt.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {list(IMPLEMENTATIONS)}. Received: {opt.implementation!r}")
    check.options(**{k: getattr(opt, k) for k in check.OPTIONS})  # plain attributes: maybe edited
    call = opt._iterations
    n = opt.gradient_accumulation_steps
    updating = not n or (call + 1) % n == 0
    iterations = call // n if n else call
    lrs = opt._scheduled_learning_rates(call)
    groups = tuple(
        resolve_group(g, i, lr, live_values(g, mark, sources), opt.capturable)
        for i, (g, lr, mark, sources) in enumerate(zip(opt.param_groups, lrs, opt._alias_marks, opt._hyper_sources))
    )
    if opt.clipvalue is not None:
        clip = ClipSpec("value", opt.clipvalue)
    elif opt.clipnorm is not None:
        clip = ClipSpec("norm", opt.clipnorm)
    elif opt.global_clipnorm is not None:
        clip = ClipSpec("global", opt.global_clipnorm)
    else:
        clip = ClipSpec()
    ema_weight = None
    if opt.use_ema:  # momentum 0 until the first update has completed (Keras copies the weights then)
        ema_weight = 1.0 if iterations == 0 else f32(1.0 - f32(opt.ema_momentum))
    frequency = opt.ema_overwrite_frequency
    return StepPlan(
        call=call,
        iterations=iterations,
        updating=updating,
        loss_scale=opt.loss_scale_factor,
        accumulation=float(n) if n and updating else None,
        accumulating=bool(n),
        clip=clip,
        groups=groups,
        scalars=tuple(g.scalars(iterations + 1) for g in groups) if updating else None,
        ema_weight=ema_weight,
        ema_momentum=opt.ema_momentum,
        overwrite=bool(opt.use_ema and frequency and (iterations + 1) % frequency == 0),
        scheduled=tuple(lrs),
    )

