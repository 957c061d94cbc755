"""``capturable=True``: a step counter on the device, and every per-step scalar derived from it there.

Under CUDA-graph replay the Python code of ``step()`` does not run, so whatever it computed on the host
stays at its value of the captured call. With ``capturable=True`` what changes from call to call is
derived in-graph instead, from two 0-dim int64 counters on the buckets' device that each call advances
in place (``add_``), as torch's capturable Adam advances its ``state_step``:

* ``updates``, the applied updates (Keras's ``iterations``); with ``skip_nonfinite`` it is the guard's own
  ``applied_updates`` (one counter, not two). It gives the bias corrections ``1 - beta**t`` (float32,
  ``t = updates + 1``, rounded as :func:`~torch_lamb.functional.lamb_scalars` rounds them) and the EMA
  weight (1 until the first applied update, then ``1 - ema_momentum``).
* ``calls``, the calls (``Lamb._iterations``, skipped calls included): the step at which the built-in
  schedules (:func:`~torch_lamb.schedules.takes_tensor_steps`) are evaluated with torch ops, giving the
  learning rate and the decay factor ``1 - weight_decay * lr`` on the device. A 0-dim tensor ``lr`` in a
  param group (torch's capturable convention) is read there too, never on the host.

The other scalars are constants of the call (the betas' complements, epsilon, a float learning rate, or
one that a plain callable or a ``torch.optim.lr_scheduler`` wrote into the group, the loss scale, ``N``).
They stay Python numbers in the plan: kernel arguments, never a host-to-device copy, frozen in a captured
graph exactly as a cached device tensor would be, and bit for bit the non-capturable step's. (The compiled
backends' scalar vector keeps them as cached device tensors, refilled by ``fill_`` when they change.)

Decided on the host by call count, and so frozen in a captured graph: whether a call accumulates or
updates, whether it overwrites the weights with their averages, which parameters have gradients, the
features in use, and the constants above. Capture one graph per distinct call (for instance one per phase
of an accumulation window) and replay them in order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .functional import LambScalars, f32

if TYPE_CHECKING:
    from .layout import Layout
    from .optimizer import Lamb
    from .plan import GroupHyper, StepPlan

__all__ = ["DeviceSteps"]


class DeviceSteps:
    """The device counters of ``capturable=True`` and the few device constants it caches (one per optimizer).

    The counters are made (``torch.full``, a fill kernel) at the first capturable call, from the host's
    counts; from then on they are the truth: ``Lamb.iterations``, ``state_dict()`` and pickling read them
    (a host sync, outside the step), since replays of a captured graph advance them without Python.
    """

    def __init__(self) -> None:
        self.calls: Tensor | None = None
        self._updates: Tensor | None = None  # the applied updates, when there is no guard to count them
        self._constants: dict[str, tuple[float, Tensor]] = {}

    @property
    def live(self) -> bool:
        """Whether the counters exist (a capturable call has run since they were last released)."""
        return self.calls is not None

    def updates(self, opt: Lamb) -> Tensor | None:
        """The applied-update counter (the guard's under ``skip_nonfinite``), or None before the first call."""
        if opt._guard is not None and isinstance(opt._guard.counts["applied_updates"], Tensor):
            return opt._guard.counts["applied_updates"]  # type: ignore[return-value]
        return self._updates

    def _counters(self, opt: Lamb, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(calls, updates)`` on ``device``: made from the host's counts the first time, moved (never read)
        when the buckets' device changes."""
        if self.calls is None:
            self.calls = torch.full((), opt._iterations, dtype=torch.int64, device=device)
        elif self.calls.device != device:
            self.calls = self.calls.to(device)
        if opt._guard is not None:  # its applied updates are the counter (one count, not two)
            updates = opt._guard.on_device(device)["applied_updates"]
            assert isinstance(updates, Tensor)
            return self.calls, updates
        if self._updates is None:
            n = opt.gradient_accumulation_steps
            self._updates = torch.full((), opt._iterations // n if n else opt._iterations, dtype=torch.int64,
                                       device=device)
        elif self._updates.device != device:
            self._updates = self._updates.to(device)
        return self.calls, self._updates

    def _constant(self, key: str, value: float, device: torch.device) -> Tensor:
        """A 0-dim float32 tensor holding ``value``, made once and refilled only when ``value`` changes."""
        cached = self._constants.get(key)
        if cached is None or cached[1].device != device:
            tensor = torch.full((), value, dtype=torch.float32, device=device)
        elif cached[0] != value:
            tensor = cached[1].fill_(value)
        else:
            return cached[1]
        self._constants[key] = (value, tensor)
        return tensor

    # ------------------------------------------------------------------ the transformation

    @staticmethod
    def check(layout: Layout) -> None:
        """Raise, before the call changes anything, where the buckets span devices: the counters and the scalars
        derived from them live on one device (a CUDA graph is captured on one device too)."""
        devices = {b.device for b in layout.buckets}
        if len(devices) > 1:
            raise ValueError(
                "capturable=True needs every parameter on one device: its step counters live there. Received "
                f"parameters on {', '.join(sorted(map(str, devices)))}; use one optimizer per device."
            )

    def prepare(self, opt: Lamb, layout: Layout, plan: StepPlan) -> StepPlan:
        """``plan`` with its per-call scalars derived on the device from the counters (see the module docstring)."""
        device = layout.active[0].device
        calls, updates = self._counters(opt, device)
        changes: dict[str, Any] = {}
        if plan.scalars is not None:
            t = updates.to(torch.float32) + 1
            schedules = opt._device_schedules()
            learning_rates: dict[int, Tensor] = {}  # groups that follow one schedule evaluate it once
            changes["scalars"] = tuple(
                self._scalars(s, hyper, self._lr(schedule, hyper, calls, device, learning_rates), t)
                for s, hyper, schedule in zip(plan.scalars, plan.groups, schedules)
            )
        if plan.ema_weight is not None:  # momentum 0 until the first applied update has completed
            one = self._constant("ema_first", 1.0, device)
            steady = self._constant("ema_steady", f32(1.0 - f32(plan.ema_momentum)), device)
            changes["ema_weight"] = torch.where(updates == 0, one, steady)
        return replace(plan, **changes)

    @staticmethod
    def _lr(schedule: Any, hyper: GroupHyper, calls: Tensor, device: torch.device,
            done: dict[int, Tensor]) -> Tensor | None:
        """The group's learning rate as a float32 device tensor when it changes without the host (None: the
        plan's float, a constant of the call)."""
        if schedule is not None:
            if id(schedule) not in done:
                done[id(schedule)] = schedule(calls).to(torch.float32)
            return done[id(schedule)]
        if isinstance(hyper.lr, Tensor):
            return hyper.lr.to(device, torch.float32)
        return None

    @staticmethod
    def _scalars(s: LambScalars, hyper: GroupHyper, lr: Tensor | None, t: Tensor) -> LambScalars:
        """``s`` with its bias corrections (and a device learning rate with its decay factor) as 0-dim float32
        tensors, in the float32 steps of :func:`~torch_lamb.functional.lamb_scalars`."""
        changes: dict[str, Any] = {
            "bias_correction_1": 1 - torch.pow(f32(hyper.beta_1), t),
            "bias_correction_2": 1 - torch.pow(f32(hyper.beta_2), t),
        }
        if lr is not None:
            changes["lr"] = lr
            if s.decay_factor is not None:
                assert hyper.weight_decay is not None
                changes["decay_factor"] = 1 - lr * f32(hyper.weight_decay)
        return replace(s, **changes)

    def finish(self, opt: Lamb, plan: StepPlan) -> None:
        """Advance the counters once the call has run (the guard advances its own applied updates)."""
        if self.calls is None:
            return
        self.calls.add_(1)
        if opt._guard is None and plan.updating and self._updates is not None:
            self._updates.add_(1)

    # ------------------------------------------------------------------ the host's view

    def call_count(self) -> int | None:
        """The calls so far (a host sync), or None when the counters do not exist."""
        return int(self.calls) if self.calls is not None else None

    def load(self, calls: int, updates: int) -> None:
        """Set the counters (``load_state_dict``), in place: a graph captured before still reads them."""
        if self.calls is not None:
            self.calls.fill_(calls)
        if self._updates is not None:
            self._updates.fill_(updates)

    def release(self) -> None:
        """Forget the counters (a call without ``capturable``: the host's counts are the truth again)."""
        self.calls = self._updates = None
