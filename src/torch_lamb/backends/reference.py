"""The reference backend: Keras's pipeline and update in their literal per-tensor form.

It is deliberately independent of the other backends: each expression is written as Keras writes it
(``keras/src/optimizers/lamb.py`` and ``base_optimizer.py``), one tensor at a time, so that it can serve as
the oracle every faster backend is tested against, bit for bit where they share the expression forms.
It is slow, and never picked under ``implementation="auto"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bucket import Bucket
from ..distributed import local_squared_norms
from ..functional import lamb_reference
from ..plan import StepPlan
from .common import TorchOpsBackend, unscaled

__all__ = ["ReferenceBackend"]


class ReferenceBackend(TorchOpsBackend):
    """One tensor at a time, each expression as Keras writes it."""

    name = "reference"
    lamb = staticmethod(lamb_reference)

    @staticmethod
    def form(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> tuple[list[Tensor], bool]:
        """``g / loss_scale``, then ``(acc + g) / N`` at the end of an accumulation window (new tensors)."""
        out = []
        for i, g in enumerate(grads):
            g = unscaled([g], plan.unscale)[0].to(bucket.momentums[i].dtype)
            if plan.loss_scale is not None:
                g = g / plan.loss_scale
            if plan.accumulation is not None:
                g = (bucket.accumulators[i] + g) / plan.accumulation
            out.append(g)
        return out, False

    @staticmethod
    def squares(formed: list[Tensor]) -> Tensor:
        # float64 where float32 would overflow; a strided gradient is summed as its own packed tensor would be
        return torch.cat([local_squared_norms([g.contiguous()]) for g in formed])

    @staticmethod
    def clip(formed: list[Tensor], owned: bool, plan: StepPlan, clip_factors: Tensor | None) -> list[Tensor]:
        if plan.clip.kind == "value":
            return [torch.clamp(g, -plan.clip.value, plan.clip.value) for g in formed]
        if clip_factors is not None:
            return [g * f.to(g.dtype) for g, f in zip(formed, clip_factors.unbind(0))]
        return formed

    @staticmethod
    def accumulate(bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        for acc, g in zip(bucket.accumulators, grads):
            g = unscaled([g], plan.unscale)[0].to(acc.dtype)
            acc.copy_(acc + (g / plan.loss_scale if plan.loss_scale is not None else g))
