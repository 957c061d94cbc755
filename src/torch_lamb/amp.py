"""GradScaler's hand-off (``torch.amp``): the scale and the verdict an optimizer that unscales itself is given.

``scaler.step(opt)`` on an optimizer that declares ``_step_supports_amp_scaling`` skips its ``unscale_`` pass
and its host read of ``found_inf``: it sets ``opt.grad_scale`` (the scale, or None after an earlier
``scaler.unscale_(opt)``) and ``opt.found_inf`` for the one call, as for torch's fused optimizers. Lamb then
multiplies each gradient by ``1 / grad_scale`` where its step first reads it (rounded to the gradient's dtype,
as ``unscale_`` writes it), and changes nothing when ``found_inf`` is set (GradScaler's ordinary path does not
call ``step()`` then), so the two paths give the same bits.

Lamb declares it only where its step may read the host and every rank decides alone: not under
``capturable`` (the verdict would need a device-side veto of the counters), and not across processes
(``ShardedGradScaler`` agrees on ``found_inf`` across ranks only in ``unscale_``). There GradScaler takes
its ordinary path, with the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import f32

__all__ = ["handed_over", "takes_hand_off"]


def takes_hand_off(capturable: bool) -> bool:
    """Whether GradScaler may hand its scale over (see the module docstring)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not capturable and not (distributed and torch.distributed.get_world_size() > 1)


def handed_over(grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple[bool, float | None]:
    """``(skip, unscale)``: whether GradScaler found inf/NaN (the call changes nothing), and the multiplier of
    each gradient, GradScaler's float32 ``1 / scale`` (None: nothing to unscale). Host reads of the two 0-dim
    tensors: free on the CPU, the one sync of GradScaler's ordinary path on a GPU."""
    if found_inf is not None and float(found_inf) != 0.0:
        return True, None
    if grad_scale is None:
        return False, None
    return False, f32(1.0 / float(grad_scale.double()))
