"""``skip_nonfinite``: whether a call's gradients hold inf or NaN, and the finite copies a device skip runs on.

Also counted as non-finite: a gradient element of magnitude 2**64 (1.8e19) or more after unscaling, since
its square overflows float32 and would turn the second moment into inf, then NaN, from finite inputs.

:func:`found_nonfinite` is an input of the plan (:mod:`torch_lamb.plan`), not a rewriter of it. The check is
one max-abs norm per tensor (it cannot overflow for finite values; NaN and inf propagate), each backend
checking its own bucket, summed across shards so that every rank agrees.

* **On the host** (every bucket on the CPU, ``capturable=False``): reading a CPU tensor is not a device
  sync, so the verdict is a Python bool, from the fast L2 norms (a tensor whose squares overflow is then
  checked element by element). A skipped call runs nothing.
* **On the device** (CUDA, or ``capturable=True``): a 0-dim bool tensor, never read on the host. The plan
  masks its scalars with it, and the engine runs on :class:`FiniteCopies` of the gradients, filled with a
  finite value where the call is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .bucket import Bucket
from .distributed import reducer_for
from .shards import Engine

__all__ = ["FiniteCopies", "found_nonfinite", "limit"]

_SQUARE_LIMIT = 2.0**64  # |t| at or above this squares beyond float32's range: v would become inf, then NaN


def limit(loss_scale: float | None) -> float:
    """The gradient magnitude from which a call is skipped: inf and NaN, and values whose unscaled square
    overflows float32 (they would make the second moment infinite, then NaN)."""
    return _SQUARE_LIMIT * (loss_scale or 1.0)


def found_nonfinite(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], loss_scale: float | None,
                    on_device: bool, sharding: Engine | None = None) -> bool | Tensor:
    """Whether any gradient is unusable: a host bool, or (``on_device``) a 0-dim bool tensor on the buckets'
    device; every rank of a sharding engine agrees. Reads only."""
    flags = []
    for b, gs in zip(buckets, grads):
        bad = b.backend.bad_gradients(b, gs, limit(loss_scale))  # type: ignore[union-attr]
        flags.append(b.tensor_reduce(bad.reshape(1)).sum() if b.tensor_reduce is not None else bad)
    device = buckets[0].device
    total = torch.stack([f.to(device) for f in flags]).sum().reshape(1)
    if sharding is not None and sharding.global_reduce is not None:  # ranks holding other whole tensors
        total = reducer_for(sharding.global_reduce)(total.to(torch.float32))  # type: ignore[misc]
    return bool(total.sum() > 0) if not on_device else total.sum() > 0  # CPU tensors: no device to wait for


class FiniteCopies:
    """Reused flat buffers into which a device-side skip copies the gradients, filled with a finite value where
    the call is skipped (no host read decides it)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[Tensor, list[Tensor]]] = {}

    def __call__(self, grads: list[list[Tensor]], found: Tensor, fill: float) -> list[list[Tensor]]:
        copies, buffers = [], {}
        for index, gs in enumerate(grads):
            key = (index, gs[0].device, gs[0].dtype, tuple(g.shape for g in gs))
            flat, views = buffers[key] = self._buffers.get(key) or _flat_buffer(gs, gs[0].dtype)
            torch._foreach_copy_(views, gs)
            flat.masked_fill_(found.to(flat.device), fill)
            copies.append(views)
        self._buffers = buffers  # buffers of parameter sets no longer stepped are dropped
        return copies


def _flat_buffer(grads: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    flat = torch.empty(sum(g.numel() for g in grads), dtype=dtype, device=grads[0].device)
    return flat, [t.view(g.shape) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
