"""GradScaler's hand-off (``torch.amp``): the scale and the verdict an optimizer that unscales itself is given.

``scaler.step(opt)`` on an optimizer that declares ``_step_supports_amp_scaling`` skips its ``unscale_`` pass
and its host read of ``found_inf``: it sets ``opt.grad_scale`` (the scale, or None after an earlier
``scaler.unscale_(opt)``) and ``opt.found_inf`` for the one call, as for torch's fused optimizers. Lamb then
multiplies each gradient by ``1 / grad_scale`` where its step first reads it (rounded to the gradient's dtype,
as ``unscale_`` writes it), and changes nothing when ``found_inf`` is set (GradScaler's ordinary path does not
call ``step()`` then), so the two paths give the same bits.

Lamb declares it where every rank decides alone: not across processes (``ShardedGradScaler`` agrees on
``found_inf`` across ranks only in ``unscale_``); there GradScaler takes its ordinary path, with the same
numbers. Under ``capturable`` the step may not read the host, so the verdict is a device-side veto: the
call runs with every gradient replaced and every factor masked (as ``skip_nonfinite`` skips on a GPU) and
advances no counter, ``1 / scale`` is a 0-dim device tensor, and a captured graph replays both. That is
exact only where nothing the host decides counts calls (the host cannot see a vetoed call): with
gradient accumulation, an EMA overwrite period, a learning rate that a Python callable computes from the
call count, or ``skip_nonfinite`` (which counts skipped calls), a capturable Lamb does not declare the
hand-off and GradScaler unscales first, outside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import LambConfig
from .functional import f32

__all__ = ["NOTHING", "HandOff", "check_device_veto", "handed_over", "takes_hand_off", "vetoes_on_device"]


@dataclass(frozen=True)
class HandOff:
    """What GradScaler handed over for one call. ``skip``: it found inf/NaN (read on the host: the call changes
    nothing); ``veto``: the same verdict as a 0-dim bool device tensor (``capturable``); ``unscale``: the
    multiplier of each gradient, GradScaler's float32 ``1 / scale`` (a 0-dim device tensor under a veto; None:
    nothing to unscale)."""

    skip: bool = False
    veto: Tensor | None = None
    unscale: float | Tensor | None = None


NOTHING = HandOff()


def vetoes_on_device(config: LambConfig, lr_sources: Iterable[Any], device_schedule: Callable[[Any], bool]) -> bool:
    """Whether a ``capturable`` step can take GradScaler's verdict as a device-side veto: nothing the host decides
    counts calls (``lr_sources``: each group's learning rate, a number, a tensor or a schedule; a schedule that
    ``device_schedule`` says runs on the device step counter counts on the device)."""
    if config.gradient_accumulation_steps or config.skip_nonfinite or (config.use_ema and
                                                                     config.ema_overwrite_frequency):
        return False
    return not any(callable(s) and not isinstance(s, Tensor) and not device_schedule(s) for s in lr_sources)


def takes_hand_off(capturable: bool, vetoes: Callable[[], bool]) -> bool:
    """Whether GradScaler may hand its scale over (see the module docstring; ``vetoes``: whether a capturable
    step can take the verdict on the device, asked only under ``capturable``)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return False
    return not capturable or vetoes()


def check_device_veto(vetoes: bool) -> None:
    """Refuse, before anything changes, a hand-off that reached a capturable step which cannot take it on the
    device (its attributes set by hand: GradScaler asks ``_step_supports_amp_scaling`` first)."""
    if not vetoes:
        raise RuntimeError("A GradScaler verdict reached a capturable Lamb whose configuration counts calls on the "
                           "host (accumulation, an EMA overwrite period, a Python learning-rate callable or "
                           "skip_nonfinite): it cannot take it on the device. Let GradScaler ask "
                           "`_step_supports_amp_scaling` (False here), so that it unscales first.")


def handed_over(grad_scale: Tensor | None, found_inf: Tensor | None, on_device: bool) -> HandOff:
    """This call's :class:`HandOff`. On the host (``on_device`` False): reads of the two 0-dim tensors, free on
    the CPU, the one sync of GradScaler's ordinary path on a GPU. On the device: no read at all."""
    if found_inf is None and grad_scale is None:
        return NOTHING
    if on_device:
        unscale = None if grad_scale is None else grad_scale.double().reciprocal().float()  # as unscale_ forms it
        return HandOff(veto=None if found_inf is None else found_inf != 0, unscale=unscale)
    if found_inf is not None and float(found_inf) != 0.0:
        return HandOff(skip=True)
    if grad_scale is None:
        return NOTHING
    return HandOff(unscale=f32(1.0 / float(grad_scale.double())))
