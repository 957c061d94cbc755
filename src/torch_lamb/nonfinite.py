"""``skip_nonfinite``: skip a call whose gradients hold inf or NaN, decided on the device.

No host sync: the decision is a 0-dim bool tensor, and the step runs in full with factors chosen on
the device so that a skipped call leaves every tensor exactly as it was:

* the gradients are copied into one flat buffer that is filled with ``-1`` when the call is
  skipped (finite, so ``0 * (g - m)`` is a signed zero and never NaN);
* the moment lerp weights and the learning rate become 0, the decay factor 1, the EMA weight 0,
  and accumulated gradients are multiplied by 0 (``acc + (-0) == acc`` bit for bit).

``x + 0 * y`` returns ``x`` bit for bit except that a stored ``-0.0`` can come back as ``+0.0``
(an equal value); moments, velocities and accumulators never hold ``-0.0`` (they start at
``+0.0`` and ``a + b`` is ``-0.0`` only when both are), so in practice only a parameter or
average that is exactly ``-0.0`` can change its sign bit.

Counters: the Python counter ``Lamb._iterations`` counts *calls* (it drives learning-rate
schedules, accumulation windows and the EMA overwrite period, which cannot wait for the device);
the device counters below count what was applied and drive bias correction, ``Lamb.iterations``
and the EMA warm-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from .distributed import Reducer
from .functional import LambScalars

__all__ = ["NonfiniteGuard"]

_FILL = -1.0  # the value of every gradient element of a skipped call


class NonfiniteGuard:
    """Device-side flags and counters of ``skip_nonfinite`` (one per optimizer)."""

    COUNTERS = ("skipped_steps", "applied_updates", "finite_in_window")

    def __init__(self) -> None:
        self.counts: dict[str, Tensor | int] = dict.fromkeys(self.COUNTERS, 0)  # ints until the first step
        self.found: Tensor | None = None  # this call's gradients are not all finite
        self.empty: Tensor | None = None  # this call applies no update (found, or a window without finite calls)
        self._device: torch.device | None = None
        self._buffers: dict[tuple, tuple[Tensor, list[Tensor]]] = {}  # reused flat gradient copies

    # ------------------------------------------------------------------ counters

    def counter(self, name: str) -> int:
        """A counter as a Python int (a host sync when it lives on the device)."""
        return int(self.counts[name])

    def load(self, values: dict[str, int]) -> None:
        self.counts = {k: int(values.get(k, 0)) for k in self.COUNTERS}
        self._device = None

    def _on(self, device: torch.device) -> None:
        if self._device != device:
            self.counts = {  # torch.full: a fill kernel, never a host-to-device copy (which would sync)
                k: torch.full((), int(v), dtype=torch.int64, device=device) for k, v in self.counts.items()
            }
            self._device = device

    # ------------------------------------------------------------------ the check

    def check(self, grad_lists: Sequence[list[Tensor]], reducers: Sequence[Reducer | None]) -> list[list[Tensor]]:
        """Set :attr:`found` and return the gradients as finite copies (all ``-1`` when found).

        The test is one float32 L1 norm per tensor (NaN and inf propagate; unlike the L2 norm it
        cannot overflow for finite gradients unless ``sum |g|`` exceeds 3.4e38), stacked per bucket;
        with a ``reduce`` the flags are summed across shards so that every rank agrees. The copies
        live in one flat buffer per bucket, kept between steps (one ``_foreach_copy_`` and one
        ``masked_fill_`` per bucket and step).
        """
        device = grad_lists[0][0].device
        self._on(device)
        flags = []
        for grads, reduce in zip(grad_lists, reducers):
            dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
            bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=1, dtype=dtype)))).float()
            if reduce is not None:
                bad = reduce(bad)
            flags.append(bad.sum().to(device))
        self.found = torch.stack(flags).sum() > 0
        buffers, out = {}, []
        for index, grads in enumerate(grad_lists):
            dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32
            key = (index, grads[0].device, dtype, tuple(g.shape for g in grads))
            flat, views = buffers[key] = self._buffers.get(key) or _flat_buffer(grads, dtype)
            torch._foreach_copy_(views, grads)
            flat.masked_fill_(self.found.to(flat.device), _FILL)
            out.append(views)
        self._buffers = buffers  # buffers of parameter sets no longer stepped are dropped
        return out

    def keep(self, grads: list[Tensor]) -> None:
        """Zero this call's (already finite) gradients in place when it is skipped: ``g * 0 = -0``."""
        if grads:
            torch._foreach_mul_(grads, (~self.found).to(grads[0].device, grads[0].dtype))

    def count_window(self) -> None:
        """Under accumulation: count this call if its gradients were finite."""
        self.counts["finite_in_window"] += (~self.found).long()

    def window_divisor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The number of finite calls in the window (at least 1), to average the accumulators."""
        return self.counts["finite_in_window"].clamp(min=1).to(device, dtype)

    def begin_update(self, accumulating: bool) -> None:
        """Decide whether this call's update is applied (device-side)."""
        if accumulating:
            self.empty = self.counts["finite_in_window"] == 0
        else:
            self.empty = self.found

    # ------------------------------------------------------------------ masked scalars

    def scalars(self, s: LambScalars, beta_1: float, beta_2: float, like: Tensor) -> LambScalars:
        """``s`` with device factors: bias correction from the applied-update count, and no-op factors
        when the update is skipped. Float32 rounding as :func:`lamb_scalars` (``beta ** t`` in float32)."""
        device, dtype = like.device, like.dtype
        empty = self.empty.to(device)
        t = (self.counts["applied_updates"] + 1).to(device, torch.float32)
        b1 = torch.full((), float(np.float32(beta_1)), dtype=torch.float32, device=device)
        b2 = torch.full((), float(np.float32(beta_2)), dtype=torch.float32, device=device)
        zero = torch.zeros((), dtype=dtype, device=device)

        def masked(value: float, off: float) -> Tensor:
            return torch.where(empty, torch.full_like(zero, off), torch.full_like(zero, value))

        return replace(
            s,
            lr=masked(s.lr, 0.0),
            one_minus_beta_1=masked(s.one_minus_beta_1, 0.0),
            one_minus_beta_2=masked(s.one_minus_beta_2, 0.0),
            bias_correction_1=(1 - torch.pow(b1, t)).to(dtype),
            bias_correction_2=(1 - torch.pow(b2, t)).to(dtype),
            decay_factor=None if s.decay_factor is None else masked(s.decay_factor, 1.0),
        )

    def end_update(self, accumulating: bool) -> None:
        self.counts["applied_updates"] += (~self.empty).long()
        if accumulating:
            self.counts["finite_in_window"].zero_()

    # ------------------------------------------------------------------ EMA

    def ema_weight(self, ema_momentum: float, like: Tensor) -> Tensor:
        """``1 - momentum`` (momentum 0 before the first applied update), 0 when the call is skipped."""
        w = torch.full((), float(np.float32(1.0) - np.float32(ema_momentum)), device=like.device, dtype=like.dtype)
        first = (self.counts["applied_updates"] == 0).to(like.device)
        w = torch.where(first, torch.ones_like(w), w)
        return torch.where(self.found.to(like.device), torch.zeros_like(w), w)

    def update_averages(self, averages: list[Tensor], params: list[Tensor], ema_momentum: float) -> None:
        if averages:
            params = [p.to(a.dtype) if p.dtype != a.dtype else p for a, p in zip(averages, params)]
            torch._foreach_lerp_(averages, params, self.ema_weight(ema_momentum, averages[0]))

    def overwrite(self, params: list[Tensor], averages: list[Tensor]) -> None:
        """Copy the averages into the parameters unless the call is skipped (a 0/1 lerp)."""
        if params:
            keep = (~self.found).to(params[0].device, params[0].dtype)
            averages = [a.to(p.dtype) if a.dtype != p.dtype else a for p, a in zip(params, averages)]
            torch._foreach_lerp_(params, averages, keep)

    def finish(self) -> None:
        self.counts["skipped_steps"] += self.found.long()


def _flat_buffer(grads: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    flat = torch.empty(sum(g.numel() for g in grads), dtype=dtype, device=grads[0].device)
    return flat, [t.view(g.shape) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
