"""The optimizer's one clock: every counter, on the host or on the device.

* ``calls``: calls of ``step()`` that had gradients (skipped ones included). It drives the schedules, the
  accumulation window (a call updates when ``(calls + 1) % N == 0``) and the EMA overwrite period.
* ``updates``: updates applied (Keras's ``iterations``). It drives bias correction (``t = updates + 1``)
  and the EMA warm-up.
* ``window``: finite micro-steps in the open accumulation window (``skip_nonfinite``: the divisor).
* ``skipped``: calls skipped for non-finite gradients.

The counters are Python ints, or 0-dim int64 tensors on the parameters' device when the step may not read
the host (``capturable=True``, or ``skip_nonfinite`` deciding on a GPU). Device counters advance in place,
so a captured CUDA graph keeps advancing the same tensors; then the host keeps ``host_calls``, the calls it
planned (what it decides by call count is frozen in a captured graph anyway), and reading a counter
(``iterations``, ``state_dict()``) is a host sync, outside the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COUNTERS", "StepClock"]

COUNTERS = ("calls", "updates", "window", "skipped")


class StepClock:
    """The counters (see the module docstring), and the device constants the device form derives scalars from."""

    def __init__(self, calls: int = 0, updates: int = 0, window: int = 0, skipped: int = 0) -> None:
        self.counts: dict[str, int | Tensor] = {"calls": calls, "updates": updates, "window": window,
                                                "skipped": skipped}
        self.host_calls = calls
        self._constants: dict[str, tuple[float, Tensor]] = {}

    @property
    def calls(self) -> int | Tensor:
        return self.counts["calls"]

    @property
    def updates(self) -> int | Tensor:
        return self.counts["updates"]

    @property
    def window(self) -> int | Tensor:
        return self.counts["window"]

    @property
    def skipped(self) -> int | Tensor:
        return self.counts["skipped"]

    @property
    def on_device(self) -> bool:
        return isinstance(self.counts["calls"], Tensor)

    def value(self, name: str) -> int:
        """A counter as a Python int (a host sync when it lives on the device)."""
        return int(self.counts[name])

    def values(self) -> dict[str, int]:
        return {k: self.value(k) for k in COUNTERS}

    # ------------------------------------------------------------------ where the counters live

    def to_device(self, device: torch.device) -> None:
        """Counters on ``device``: made by ``torch.full`` (a fill kernel, never a host-to-device copy, which
        would sync) from the host's counts, or moved (never read) when the device changes."""
        for k, v in self.counts.items():
            if not isinstance(v, Tensor):
                self.counts[k] = torch.full((), v, dtype=torch.int64, device=device)
            elif v.device != device:
                self.counts[k] = v.to(device)

    def settle(self, devices: list[torch.device], capturable: bool, skip_nonfinite: bool) -> None:
        """Where the counters live for a call on ``devices``: on the device under ``capturable`` (one device: a
        CUDA graph is captured on one) or a device-side ``skip_nonfinite``, else on the host."""
        if capturable and len(set(devices)) > 1:
            raise ValueError("capturable=True needs every parameter on one device: its step counters live there. "
                             f"Received parameters on {', '.join(sorted(set(map(str, devices))))}; use one "
                             "optimizer per device.")
        if devices and (capturable or (skip_nonfinite and any(d.type != "cpu" for d in devices))):
            self.to_device(devices[0])
        else:
            self.to_host()  # capturable switched off: replays advanced the device counts (a host sync)

    def to_host(self) -> None:
        """Host counters again (a host sync): the device counts, which replays may have advanced, are the truth."""
        if self.on_device:
            self.counts = self.values()
            self.host_calls = self.counts["calls"]  # type: ignore[assignment]

    def constant(self, key: str, value: float, device: torch.device) -> Tensor:
        """A 0-dim float32 tensor on ``device`` holding ``value``: made once, refilled only when it changes (a
        captured graph reads a stable address)."""
        cached = self._constants.get(key)
        if cached is None or cached[1].device != device:
            tensor = torch.full((), value, dtype=torch.float32, device=device)
        elif cached[0] != value:
            tensor = cached[1].fill_(value)
        else:
            return cached[1]
        self._constants[key] = (value, tensor)
        return tensor

    # ------------------------------------------------------------------ advancing

    def advance(self, *, updating: bool, accumulating: bool, skipped: bool | Tensor = False,
                applied: bool | Tensor = True, window: int | Tensor | None = None,
                counted: bool | Tensor = True) -> None:
        """Count one call: ``applied`` (bool or device flag) says whether an update was applied at an updating
        call; ``window``: the window's finite micro-steps including this call (``skip_nonfinite``); ``counted``:
        a device flag, unset where GradScaler vetoed the call (then nothing advances on the device, and the host's
        ``host_calls``, which cannot see the verdict, runs ahead: nothing it decides counts calls then)."""
        counts = self.counts
        self.host_calls += 1
        if not self.on_device:
            counts["calls"] += 1  # type: ignore[operator]
            counts["skipped"] += int(skipped)  # type: ignore[operator]
            if updating:
                counts["updates"] += int(applied)  # type: ignore[operator]
            if window is not None:
                counts["window"] = 0 if (updating and accumulating) else int(window)
            return
        counts["calls"].add_(counted.long() if isinstance(counted, Tensor) else 1)  # type: ignore[union-attr]
        if isinstance(skipped, Tensor):
            counts["skipped"].add_(skipped.long())  # type: ignore[union-attr]
        if updating:
            step = applied.long() if isinstance(applied, Tensor) else int(applied)
            counts["updates"].add_(step)  # type: ignore[union-attr]
        if window is not None:
            if updating and accumulating:
                counts["window"].zero_()  # type: ignore[union-attr]
            elif isinstance(window, Tensor):
                counts["window"].copy_(window)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ saving

    def load(self, values: dict[str, int]) -> None:
        """Set the counters; device ones in place (``fill_``), so that a graph captured before still reads them."""
        for k in COUNTERS:
            current, value = self.counts[k], int(values.get(k, 0))
            if isinstance(current, Tensor):
                current.fill_(value)
            else:
                self.counts[k] = value
        self.host_calls = int(values.get("calls", 0))
