"""The foreach backend: the whole pipeline in ``torch._foreach_*`` ops, on any device, with no host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from ..bucket import Bucket
from ..clipping import clip_by_value, scale_by_factors
from ..distributed import local_squared_norms
from ..functional import lamb_update
from ..plan import StepPlan
from .common import TorchOpsBackend, state_grads, unscaled

__all__ = ["ForeachBackend"]


class ForeachBackend(TorchOpsBackend):
    """Accepts every bucket. Scalars may be floats or 0-dim device tensors (a device-side guard)."""

    name = "foreach"
    lamb = staticmethod(lamb_update)

    @staticmethod
    def form(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> tuple[list[Tensor], bool]:
        """The gradients after unscaling and accumulation, and whether they are ours to clip in place."""
        work, owned = state_grads(bucket, unscaled(grads, plan.unscale))
        owned = owned or plan.unscale is not None
        if plan.loss_scale is not None:
            work, owned = list(torch._foreach_div(work, plan.loss_scale)), True
        if plan.accumulation is not None:
            torch._foreach_add_(bucket.accumulators, work)
            torch._foreach_div_(bucket.accumulators, plan.accumulation)
            work, owned = bucket.accumulators, True  # zeroed after the update
        return work, owned

    squares = staticmethod(local_squared_norms)

    @staticmethod
    def clip(work: list[Tensor], owned: bool, plan: StepPlan, clip_factors: Tensor | None) -> list[Tensor]:
        if plan.clip.kind == "value":
            return clip_by_value(work, plan.clip.value, inplace=owned)
        if clip_factors is not None:
            return scale_by_factors(work, clip_factors, inplace=owned)
        return work

    @staticmethod
    def accumulate(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        work, _ = state_grads(bucket, unscaled(grads, plan.unscale))
        if plan.loss_scale is not None:
            work = list(torch._foreach_div(work, plan.loss_scale))
        torch._foreach_add_(bucket.accumulators, work)
