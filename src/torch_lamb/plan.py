"""The plan of one ``step()`` call: a pure function of the config, the groups' values and the clock.

:func:`plan_step` decides whether the call updates or only accumulates and computes every scalar of the
call in Keras's float32 rounding: the bias corrections (written once, :func:`~torch_lamb.functional.
bias_correction`, for a host step or a device one), the EMA weight, the accumulation divisor and whether the
averages overwrite the weights. Two inputs change its form, never its values:

* the clock on the device (``capturable``, or ``skip_nonfinite`` deciding on a GPU): the scalars that change
  from call to call without the host are 0-dim device tensors derived from the device counters (a built-in
  schedule's learning rate and its decay factor too, and a 0-dim tensor ``lr``);
* ``found`` (``skip_nonfinite``): whether the call's gradients hold inf or NaN. A host bool makes a skipped
  call run nothing; a device flag masks the scalars (learning rate and moment weights 0, decay 1, epsilon at
  least 1, EMA weight 0, overwrite off) so that a skipped call changes nothing without a host read.

The backends only read the plan; the clock only advances from it (:meth:`StepPlan.advance`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .clock import StepClock
from .config import ClipSpec, GroupOptions, LambConfig
from .functional import LambScalars, f32, lamb_scalars

__all__ = ["StepPlan", "plan_step"]

_FILL, _FILL_ACCUMULATING = -1.0, 0.0  # every gradient element of a skipped call (device mode)


@dataclass(frozen=True)
class StepPlan:
    """Everything one call does: host values, or 0-dim device tensors where a value changes without the host.

    ``call`` counts calls (schedules, accumulation windows, the EMA overwrite period); the bias corrections
    count applied updates.
    """

    call: int
    updating: bool  # False: an accumulation micro-step (gradients are only accumulated)
    accumulating: bool  # gradient_accumulation_steps is set (accumulators exist)
    loss_scale: float | None
    accumulation: float | Tensor | None  # at an update under accumulation: the window's divisor
    clip: ClipSpec
    scalars: tuple[LambScalars, ...] | None  # per group, on updating calls
    ema_weight: float | Tensor | None  # lerp weight of the averages this call (None: no EMA)
    overwrite: bool  # copy the averages into the weights after this call's EMA
    overwrite_keep: Tensor | None = None  # device guard: 1 to overwrite, 0 to keep (a skipped call)
    apply: bool = True  # False: the call changes no tensor (a skipped non-finite call)
    skip: bool | Tensor = False  # the gradients are replaced by `fill` (True) or where the device flag is set
    fill: float = 0.0
    found: bool | Tensor = False  # skip_nonfinite: the call's gradients hold inf or NaN
    applied: bool | Tensor = True  # an updating call applies its update (False or a device flag: it is empty)
    window: int | Tensor | None = None  # skip_nonfinite: the window's finite micro-steps including this call
    unscale: float | Tensor | None = None  # GradScaler's hand-off: g * unscale (rounded to g's dtype), first
    counted: bool | Tensor = True  # the call counts (False where GradScaler's device-side veto is set)

    def advance(self, clock: StepClock) -> None:
        """Count this call once it has run."""
        clock.advance(updating=self.updating, accumulating=self.accumulating, skipped=self.found,
                      applied=self.applied, window=self.window, counted=self.counted)


def _steady_weight(config: LambConfig) -> float:
    """The EMA's lerp weight once an update has been applied: ``1 - ema_momentum`` in float32."""
    return f32(1.0 - f32(config.ema_momentum))


def plan_step(config: LambConfig, groups: tuple[GroupOptions, ...], clock: StepClock,
              found: bool | Tensor | None = None, dtype: torch.dtype = torch.float32,
              unscale: float | Tensor | None = None, veto: Tensor | None = None) -> StepPlan:
    """The plan of the next call (``found``: ``skip_nonfinite``'s verdict; ``dtype``: the state's, for the masked
    device scalars; ``unscale``: GradScaler's inverse scale, handed over; ``veto``: its device-side verdict, under
    ``capturable`` only, without ``skip_nonfinite``, accumulation or an overwrite period: a vetoed call changes
    and counts nothing)."""
    call = clock.host_calls
    n = config.gradient_accumulation_steps
    updating = not n or (call + 1) % n == 0
    frequency = config.ema_overwrite_frequency
    plan = StepPlan(
        call=call, updating=updating, accumulating=bool(n), loss_scale=config.loss_scale_factor,
        accumulation=float(n) if n and updating else None, clip=config.clip, scalars=None, ema_weight=None,
        overwrite=bool(config.use_ema and frequency and ((call // n if n else call) + 1) % frequency == 0),
        unscale=unscale,
    )
    if clock.on_device:
        return _device_plan(plan, config, groups, clock, found, dtype, veto)
    if veto is not None:
        raise ValueError("GradScaler's device-side veto needs the counters on the device (capturable=True).")
    return _host_plan(plan, config, groups, clock, found)


def _host_plan(plan: StepPlan, config: LambConfig, groups: tuple[GroupOptions, ...], clock: StepClock,
               found: bool | None) -> StepPlan:
    updates = clock.value("updates")
    changes: dict[str, object] = {}
    if found is not None:  # skip_nonfinite, decided on the host
        window = clock.value("window") + (not found) if plan.accumulating else None
        empty = window == 0 if plan.accumulating else found
        changes.update(found=found, applied=not empty, window=window)
        if found and not (plan.updating and plan.accumulating and not empty):
            return replace(plan, apply=False, overwrite=False, **changes)
        if plan.updating and plan.accumulating:
            changes["accumulation"] = float(window)  # type: ignore[arg-type]
    if config.use_ema:  # momentum 0 until the first update has completed (Keras copies the weights then)
        changes["ema_weight"] = 1.0 if updates == 0 else _steady_weight(config)
    if plan.updating:
        changes["scalars"] = tuple(lamb_scalars(**_scalar_args(g), step=updates + 1) for g in groups)
    if found:  # the end of a window with finite micro-batches: they apply, this one does not
        changes.update(skip=True, fill=_FILL_ACCUMULATING, ema_weight=None, overwrite=False)
    return replace(plan, **changes)


def _scalar_args(g: GroupOptions) -> dict[str, object]:
    return {"lr": 0.0 if isinstance(g.lr, Tensor) else g.lr, "beta_1": g.beta_1, "beta_2": g.beta_2,
            "epsilon": g.epsilon, "weight_decay": g.weight_decay, "weight_decay_mode": g.weight_decay_mode,
            "min_trust_ratio": g.min_trust_ratio, "max_trust_ratio": g.max_trust_ratio}


def _device_plan(plan: StepPlan, config: LambConfig, groups: tuple[GroupOptions, ...], clock: StepClock,
                 found: Tensor | None, dtype: torch.dtype, veto: Tensor | None = None) -> StepPlan:
    """The scalars that change without the host, derived on the device from the counters (and masked by a
    device-side ``found``, or GradScaler's ``veto``)."""
    calls, updates = clock.calls, clock.updates
    assert isinstance(calls, Tensor) and isinstance(updates, Tensor)
    device = updates.device
    changes: dict[str, object] = {}
    empty: Tensor | None = None
    if veto is not None:  # as a skipped non-finite call, counted nowhere (GradScaler's ordinary path never calls)
        if found is not None or plan.accumulating or (config.use_ema and config.ema_overwrite_frequency):
            raise ValueError("GradScaler's device-side veto cannot be combined with skip_nonfinite, gradient "
                             "accumulation or an EMA overwrite period (the host counts their calls).")
        found = empty = veto.to(device)
        changes.update(skip=found, fill=_FILL, applied=~empty, counted=~empty)
    elif found is not None:
        found = found.to(device)
        window = clock.window + (~found).long() if plan.accumulating else None
        empty = (window == 0) if window is not None else found
        changes.update(found=found, applied=~empty, window=window, skip=found,
                       fill=_FILL_ACCUMULATING if plan.accumulating else _FILL)
        if plan.updating and plan.accumulating:
            changes["accumulation"] = window.clamp(min=1).to(device, dtype)  # type: ignore[union-attr]
        if plan.overwrite:
            changes["overwrite_keep"] = (~found).to(device, dtype)
    if plan.updating:
        t = updates.to(torch.float32) + 1
        evaluated: dict[int, Tensor] = {}  # groups that follow one schedule evaluate it once
        scalars = [_device_scalars(g, t, _device_lr(g, calls, device, evaluated)) for g in groups]
        if empty is not None:
            scalars = [_masked(s, g, empty, dtype) for s, g in zip(scalars, groups)]
        changes["scalars"] = tuple(scalars)
    if config.use_ema:  # momentum 0 until the first applied update has completed; 0 when skipped
        one = clock.constant("ema_first", 1.0, device)
        weight = torch.where(updates == 0, one, clock.constant("ema_steady", _steady_weight(config), device))
        changes["ema_weight"] = weight if found is None else torch.where(found, torch.zeros_like(weight), weight)
    return replace(plan, **changes)


def _device_lr(g: GroupOptions, calls: Tensor, device: torch.device, done: dict[int, Tensor]) -> Tensor | None:
    """The group's learning rate as a float32 device tensor when it changes without the host (None: the group's
    float, a constant of the call)."""
    if g.schedule is not None:
        if id(g.schedule) not in done:
            done[id(g.schedule)] = g.schedule(calls).to(torch.float32)
        return done[id(g.schedule)]
    if isinstance(g.lr, Tensor):
        return g.lr.to(device, torch.float32)
    return None


def _device_scalars(g: GroupOptions, t: Tensor, lr: Tensor | None) -> LambScalars:
    """The group's scalars for the device step ``t``: :func:`~torch_lamb.functional.lamb_scalars` with its bias
    corrections (and a device learning rate with its decay factor) as 0-dim float32 tensors."""
    return lamb_scalars(**{**_scalar_args(g), **({"lr": lr} if lr is not None else {})}, step=t)


def _masked(s: LambScalars, g: GroupOptions, empty: Tensor, dtype: torch.dtype) -> LambScalars:
    """``s`` with no-op factors where the update is empty (a skipped call), chosen on the device."""
    zero = torch.zeros((), dtype=dtype, device=empty.device)

    def masked(value: float | Tensor, off: float) -> Tensor:
        on = value if isinstance(value, Tensor) else torch.full_like(zero, value)
        return torch.where(empty, torch.full_like(on, off), on)

    return LambScalars(
        lr=masked(s.lr, 0.0),
        one_minus_beta_1=masked(s.one_minus_beta_1, 0.0),
        one_minus_beta_2=masked(s.one_minus_beta_2, 0.0),
        bias_correction_1=s.bias_correction_1,
        bias_correction_2=s.bias_correction_2,
        epsilon=masked(s.epsilon, max(g.epsilon, 1.0)),  # a skipped call with epsilon=0 must not form 0/0
        decay_factor=None if s.decay_factor is None else masked(s.decay_factor, 1.0),
        adaptive_weight_decay=s.adaptive_weight_decay,
        min_trust_ratio=s.min_trust_ratio,
        max_trust_ratio=s.max_trust_ratio,
    )
