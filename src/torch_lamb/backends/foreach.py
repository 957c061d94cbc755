"""The foreach backend: the whole pipeline in ``torch._foreach_*`` ops, on any device, with no host sync."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..clipping import clip_by_value, scale_by_factors
from ..distributed import local_squared_norms
from ..functional import TrustStats, lamb_update
from .common import TorchOpsBackend, state_grads

if TYPE_CHECKING:
    from ..layout import Bucket
    from ..plan import StepPlan

__all__ = ["ForeachBackend"]


class ForeachBackend(TorchOpsBackend):
    """Accepts every bucket. Scalars may be floats or 0-dim device tensors (a device-side guard)."""

    name = "foreach"
    lamb = staticmethod(lamb_update)

    def __init__(self) -> None:
        # The gradients formed by `grad_squares` (which must unscale and accumulate to measure them),
        # handed to the `update` of the same call so that the pipeline runs once.
        self._formed: dict[int, tuple[list[Tensor], bool]] = {}

    @staticmethod
    def _form(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> tuple[list[Tensor], bool]:
        """The gradients after unscaling and accumulation, and whether they are ours to clip in place."""
        work, owned = state_grads(bucket, grads)
        if plan.loss_scale is not None:
            work, owned = list(torch._foreach_div(work, plan.loss_scale)), True
        if plan.accumulation is not None:
            torch._foreach_add_(bucket.accumulators, work)
            torch._foreach_div_(bucket.accumulators, plan.accumulation)
            work, owned = bucket.accumulators, True  # zeroed after the update
        return work, owned

    def accumulate(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        work, _ = state_grads(bucket, grads)
        if plan.loss_scale is not None:
            work = list(torch._foreach_div(work, plan.loss_scale))
        torch._foreach_add_(bucket.accumulators, work)

    def grad_squares(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> Tensor:
        formed = self._formed[id(bucket)] = self._form(bucket, grads, plan)
        return local_squared_norms(formed[0])

    def update(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan, clip_factors: Tensor | None) -> TrustStats:
        formed = self._formed.pop(id(bucket), None)
        work, owned = formed if formed is not None else self._form(bucket, grads, plan)
        if plan.clip.kind == "value":
            work = clip_by_value(work, plan.clip.value, inplace=owned)
        elif clip_factors is not None:
            work = scale_by_factors(work, clip_factors, inplace=owned)
        return self._update(bucket, work, plan)
