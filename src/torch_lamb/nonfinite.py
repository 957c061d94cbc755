"""``skip_nonfinite``: skip a call whose gradients hold inf or NaN, as a transformation of the plan.

Also skipped: a gradient element of magnitude 2**64 (1.8e19) or more after unscaling, since its
square overflows float32 and would turn the second moment into inf, then NaN, from finite inputs.

:meth:`NonfiniteGuard.prepare` takes the call's gradients and plan and returns the ones the backends
run, so that every backend supports it. The check is one max-abs norm per tensor (it cannot overflow
for finite values; NaN and inf propagate), reduced across shards so that every rank agrees.

* **On the host** (every bucket on the CPU, ``capturable=False``): reading a CPU tensor is not a
  device sync, so the decision is a Python bool, from the fast L2 norms (a tensor whose squares
  overflow is then checked element by element). A skipped call runs nothing at all; an applied one
  is the plain plan with the guard's counters, and runs on any backend, the CPU kernel included.
* **On the device** (CUDA, or ``capturable=True``): no host read. The gradients are copied into one
  flat buffer per bucket, filled with a finite value when the call is skipped (``-1``; ``0`` under
  accumulation, so that ``acc + 0 == acc``), and the plan's scalars become 0-dim tensors chosen on
  the device: lerp weights and learning rate 0, decay factor 1, epsilon at least 1 (no 0/0 when
  ``epsilon=0``), EMA weight 0, overwrite off.

Counters: ``Lamb._iterations`` counts *calls* (it drives schedules, accumulation windows and the EMA
overwrite period); the counters below count what was applied and drive bias correction,
``Lamb.iterations`` and the EMA warm-up. On the device they advance in place (a captured CUDA graph
keeps advancing the same tensors), and under ``capturable`` ``applied_updates`` is the step counter
of :mod:`torch_lamb.capturable` (it derives the bias corrections and EMA weight from it; the guard
masks them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .functional import LambScalars, f32

if TYPE_CHECKING:
    from .layout import Layout
    from .plan import GroupHyper, StepPlan

__all__ = ["NonfiniteGuard"]

_FILL, _FILL_ACCUMULATING = -1.0, 0.0  # every gradient element of a skipped call (device mode)
_SQUARE_LIMIT = 2.0**64  # |t| at or above this squares beyond float32's range: v would become inf, then NaN


class NonfiniteGuard:
    """Flags and counters of ``skip_nonfinite`` (one per optimizer)."""

    COUNTERS = ("skipped_steps", "applied_updates", "finite_in_window")

    def __init__(self) -> None:
        self.counts: dict[str, Tensor | int] = dict.fromkeys(self.COUNTERS, 0)  # device tensors in device mode
        self._found: bool | Tensor = False  # this call's gradients are not all finite
        self._empty: bool | Tensor = False  # this call applies no update
        self._buffers: dict[tuple, tuple[Tensor, list[Tensor]]] = {}  # reused flat gradient copies

    def counter(self, name: str) -> int:
        """A counter as a Python int (a host sync when it lives on the device)."""
        return int(self.counts[name])

    def load(self, values: dict[str, int]) -> None:
        """Set the counters; device ones in place (``fill_``), so that a graph captured before still reads them."""
        for k in self.COUNTERS:
            current, value = self.counts[k], int(values.get(k, 0))
            if isinstance(current, Tensor):
                current.fill_(value)
            else:
                self.counts[k] = value

    def on_device(self, device: torch.device) -> dict[str, Tensor | int]:
        """The counters as 0-dim int64 tensors on ``device`` (made by ``torch.full``, a fill kernel: never a
        host-to-device copy, which would sync; moved, not read, when the device changes)."""
        counts = self.counts
        if not all(isinstance(v, Tensor) and v.device == device for v in counts.values()):
            self.counts = counts = {
                k: v.to(device) if isinstance(v, Tensor) else torch.full((), int(v), dtype=torch.int64, device=device)
                for k, v in counts.items()
            }
        return counts

    # ------------------------------------------------------------------ the transformation

    def prepare(
        self, layout: Layout, grads: list[list[Tensor]], plan: StepPlan, capturable: bool
    ) -> tuple[list[list[Tensor]], StepPlan]:
        """The gradients and plan the backends run for this call (see the module docstring)."""
        if not capturable and all(b.device.type == "cpu" for b in layout.buckets):
            return self._prepare_host(layout, grads, plan)
        return self._prepare_device(layout, grads, plan)

    def finish(self, plan: StepPlan) -> None:
        """Advance the counters once the call has run."""
        found, empty = self._found, self._empty
        counts = self.counts
        if isinstance(found, Tensor):  # in place: a captured graph keeps advancing the same tensors
            counts["skipped_steps"].add_(found.long())  # type: ignore[union-attr]
            if plan.updating:
                counts["applied_updates"].add_((~empty).long())  # type: ignore[union-attr]
            if plan.accumulating and plan.updating:
                counts["finite_in_window"].zero_()  # type: ignore[union-attr]
        else:
            counts["skipped_steps"] += int(found)
            if plan.updating:
                counts["applied_updates"] += int(not empty)
            if plan.accumulating and plan.updating:
                counts["finite_in_window"] = 0

    @staticmethod
    def _bad(layout: Layout, grads: list[list[Tensor]], limit: float) -> list[Tensor]:
        """Per bucket, a 0-dim count of unusable tensors, summed across shards (each backend checks its own)."""
        flags = []
        for b, gs in zip(layout.active, grads):
            bad = b.backend.bad_gradients(b, gs, limit)
            flags.append(b.tensor_reduce(bad.reshape(1)).sum() if b.tensor_reduce is not None else bad)
        return flags

    def _prepare_host(self, layout: Layout, grads: list[list[Tensor]], plan: StepPlan) -> tuple[list, StepPlan]:
        counts = self.counts = {k: int(v) for k, v in self.counts.items()}
        flags = self._bad(layout, grads, _limit(plan))
        found = self._found = bool(torch.stack(flags).sum() > 0)  # CPU tensors: no device to wait for
        applied = counts["applied_updates"]
        if plan.accumulating:
            window = counts["finite_in_window"] = counts["finite_in_window"] + (not found)
            self._empty = window == 0
        else:
            self._empty = found
        if found and not (plan.updating and plan.accumulating and not self._empty):
            return grads, replace(plan, apply=False)
        changes: dict[str, object] = {}
        if plan.ema_weight is not None:
            changes["ema_weight"] = 1.0 if applied == 0 else _steady_weight(plan)
        if plan.updating and plan.accumulating:
            changes["accumulation"] = float(window)
        if found:  # the end of a window with finite micro-batches: they apply, this one does not
            grads = [[torch.zeros_like(g) for g in gs] for gs in grads]
            changes.update(ema_weight=None, overwrite=False)
        return grads, replace(plan, **changes).with_step(applied + 1)

    # ------------------------------------------------------------------ device mode

    def _prepare_device(self, layout: Layout, grads: list[list[Tensor]], plan: StepPlan) -> tuple[list, StepPlan]:
        device = layout.active[0].device
        counts = self.on_device(device)
        flags = self._bad(layout, grads, _limit(plan))
        found = self._found = torch.stack([f.to(device) for f in flags]).sum() > 0
        fill = _FILL_ACCUMULATING if plan.accumulating else _FILL
        copies, buffers = [], {}
        for index, gs in enumerate(grads):
            dtype = gs[0].dtype
            key = (index, gs[0].device, dtype, tuple(g.shape for g in gs))
            flat, views = buffers[key] = self._buffers.get(key) or _flat_buffer(gs, dtype)
            torch._foreach_copy_(views, gs)
            flat.masked_fill_(found.to(flat.device), fill)
            copies.append(views)
        self._buffers = buffers  # buffers of parameter sets no longer stepped are dropped
        if plan.accumulating:
            window: Tensor = counts["finite_in_window"]  # type: ignore[assignment]
            window.add_((~found).long())
            self._empty = window == 0
        else:
            self._empty = found
        like = layout.active[0].momentums[0]
        changes: dict[str, object] = {}
        if plan.updating:
            assert plan.scalars is not None
            t = (counts["applied_updates"] + 1).to(like.device, torch.float32)
            changes["scalars"] = tuple(self._masked(s, g, t, like) for s, g in zip(plan.scalars, plan.groups))
            if plan.accumulating:
                changes["accumulation"] = counts["finite_in_window"].clamp(min=1).to(like.device, like.dtype)
        if plan.ema_weight is not None:  # momentum 0 until the first *applied* update; 0 when skipped
            w = plan.ema_weight
            if not isinstance(w, Tensor):  # (capturable derived it from this counter already)
                steady = torch.full((), _steady_weight(plan), device=like.device, dtype=like.dtype)
                w = torch.where((counts["applied_updates"] == 0).to(like.device), torch.ones_like(steady), steady)
            changes["ema_weight"] = torch.where(found.to(w.device), torch.zeros_like(w), w)
        if plan.overwrite:
            changes["overwrite_keep"] = (~found).to(like.device, like.dtype)
        return copies, replace(plan, **changes)

    def _masked(self, s: LambScalars, hyper: GroupHyper, t: Tensor, like: Tensor) -> LambScalars:
        """``s`` with device factors: bias correction from the applied-update count, and no-op factors
        when the update is skipped (float32 rounding as :func:`~torch_lamb.functional.lamb_scalars`).
        Under ``capturable`` the scalars that change per call are device tensors already; they are masked."""
        device, dtype = like.device, like.dtype
        empty = self._empty.to(device)
        zero = torch.zeros((), dtype=dtype, device=device)

        def masked(value: float | Tensor, off: float) -> Tensor:
            on = value if isinstance(value, Tensor) else torch.full_like(zero, value)
            return torch.where(empty, torch.full_like(on, off), on)

        if isinstance(s.bias_correction_1, Tensor):  # capturable: derived from this counter
            corrections = s.bias_correction_1, s.bias_correction_2
        else:
            b1 = torch.full((), f32(hyper.beta_1), dtype=torch.float32, device=device)
            b2 = torch.full((), f32(hyper.beta_2), dtype=torch.float32, device=device)
            corrections = (1 - torch.pow(b1, t)).to(dtype), (1 - torch.pow(b2, t)).to(dtype)
        return replace(
            s,
            lr=masked(s.lr, 0.0),
            one_minus_beta_1=masked(s.one_minus_beta_1, 0.0),
            one_minus_beta_2=masked(s.one_minus_beta_2, 0.0),
            bias_correction_1=corrections[0],
            bias_correction_2=corrections[1],
            decay_factor=None if s.decay_factor is None else masked(s.decay_factor, 1.0),
            epsilon=masked(s.epsilon, max(hyper.epsilon, 1.0)),  # a skipped call with epsilon=0 must not form 0/0
        )


def _limit(plan: StepPlan) -> float:
    """The gradient magnitude from which a call is skipped: inf and NaN, and values whose unscaled
    square overflows float32 (they would make the second moment infinite, then NaN)."""
    return _SQUARE_LIMIT * (plan.loss_scale or 1.0)


def _steady_weight(plan: StepPlan) -> float:
    """The EMA's lerp weight once an update has been applied: ``1 - ema_momentum`` in float32."""
    return f32(1.0 - f32(plan.ema_momentum))


def _flat_buffer(grads: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    flat = torch.empty(sum(g.numel() for g in grads), dtype=dtype, device=grads[0].device)
    return flat, [t.view(g.shape) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
