"""The reference backend: Keras's pipeline and update in their literal per-tensor form (the spec)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed import local_squared_norms
from ..functional import TrustStats, lamb_reference
from .common import TorchOpsBackend

if TYPE_CHECKING:
    from ..layout import Bucket
    from ..plan import StepPlan

__all__ = ["ReferenceBackend"]


class ReferenceBackend(TorchOpsBackend):
    """One tensor at a time, each expression as Keras writes it. Slow; every other backend is tested against it."""

    name = "reference"
    lamb = staticmethod(lamb_reference)

    @staticmethod
    def _formed(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> list[Tensor]:
        """``g / loss_scale``, then ``(acc + g) / N`` at the end of an accumulation window (new tensors)."""
        out = []
        for i, g in enumerate(grads):
            g = g.to(bucket.momentums[i].dtype)
            if plan.loss_scale is not None:
                g = g / plan.loss_scale
            if plan.accumulation is not None:
                g = (bucket.accumulators[i] + g) / plan.accumulation
            out.append(g)
        return out

    def accumulate(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        for acc, g in zip(bucket.accumulators, grads):
            g = g.to(acc.dtype)
            acc.copy_(acc + (g / plan.loss_scale if plan.loss_scale is not None else g))

    def grad_squares(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> Tensor:
        formed = self._formed(bucket, grads, plan)
        # float64 where float32 would overflow; a slice's strided view is summed as its own tensor would be
        return torch.cat([local_squared_norms([g.contiguous()]) for g in formed])

    def update(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan, clip_factors: Tensor | None) -> TrustStats:
        formed = self._formed(bucket, grads, plan)
        if plan.clip.kind == "value":
            formed = [torch.clamp(g, -plan.clip.value, plan.clip.value) for g in formed]
        elif clip_factors is not None:
            formed = [g * f.to(g.dtype) for g, f in zip(formed, clip_factors.unbind(0))]
        return self._update(bucket, formed, plan)
