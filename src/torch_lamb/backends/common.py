"""What the torch-op backends share: the steps after an update (accumulators, EMA, master copies), the
finite check, and the per-call object that carries a bucket's formed gradients from ``grad_squares`` to
``update``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..bucket import Bucket, dense
from ..config import LambConfig
from ..distributed import host_reads_allowed
from ..functional import TrustStats, foreach_lerp_
from ..plan import StepPlan

__all__ = ["TorchCall", "TorchOpsBackend", "bad_gradients", "finish_update", "move_averages", "narrowed",
           "norm_dtype", "overwrite_with_averages", "reset_accumulators", "state_grads", "unscaled"]


def norm_dtype(t: Tensor) -> torch.dtype:
    """Norms are summed in float32 at least (float64 for float64 tensors)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def state_grads(bucket: Bucket, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
    """The gradients in the state's dtype (float16/bfloat16 widened to float32), packed, and whether they are
    copies."""
    return dense(grads, bucket.momentums[0].dtype)


def unscaled(grads: list[Tensor], unscale: float | None) -> list[Tensor]:
    """GradScaler's hand-off: ``g * unscale`` in g's dtype, as ``unscale_`` writes it (new tensors; ``grads``
    when there is nothing to unscale). float16 ones in float32: ``unscale_`` refuses them, as they would
    underflow."""
    if unscale is None:
        return grads
    return list(torch._foreach_mul([g.float() if g.dtype == torch.float16 else g for g in grads], unscale))


def narrowed(sums: Tensor) -> Tensor:
    """Squared sums summed in float64, as the backends hand them on: float32 unless that overflows (then
    float64). Deciding reads the CPU tensor; on another device, or without host reads, they stay float64."""
    if sums.is_cpu and host_reads_allowed():
        # one read: float64 where a finite sum would round to inf in float32 and none is inf already
        largest = float(torch.nan_to_num(sums, nan=0.0, posinf=math.inf).max()) if sums.numel() else 0.0
        return sums if _FLOAT32_OVERFLOW <= largest < math.inf else sums.to(torch.float32)
    return sums


_FLOAT32_OVERFLOW = float(torch.finfo(torch.float32).max) + 2.0**103  # float32's largest + half its ulp: rounds to inf


def move_averages(bucket: Bucket, weight: float | Tensor) -> None:
    """``avg = lerp(avg, w, weight)`` toward the weights (the float32 master where there is one)."""
    if bucket.averages:
        dtype = bucket.averages[0].dtype
        weights = [w.to(dtype) for w in bucket.weights] if bucket.weights[0].dtype != dtype else bucket.weights
        foreach_lerp_(bucket.averages, weights, weight)


def finish_update(bucket: Bucket, plan: StepPlan) -> None:
    """After the weights moved: refresh the masters' copies, zero the accumulators, move the averages."""
    if bucket.mirrors:
        torch._foreach_copy_(bucket.mirrors, bucket.weights)
    if plan.accumulation is not None:
        torch._foreach_zero_(bucket.accumulators)
    if plan.ema_weight is not None:
        move_averages(bucket, plan.ema_weight)


def reset_accumulators(bucket: Bucket, plan: StepPlan) -> None:
    """At the end of an accumulation window, the accumulators of parameters that got no gradient reset too."""
    if plan.accumulation is not None and bucket.accumulators:
        torch._foreach_zero_(bucket.accumulators)


def overwrite_with_averages(bucket: Bucket, plan: StepPlan) -> None:
    """Copy the averages into the weights (Keras's ``ema_overwrite_frequency``), then into the masters' copies.

    Under a device-side guard the copy is a 0/1 lerp, so that a skipped call keeps the weights.
    """
    if not bucket.averages:
        return
    if plan.overwrite_keep is None:
        torch._foreach_copy_(bucket.weights, bucket.averages)
    else:
        dtype = bucket.weights[0].dtype
        averages = [a.to(dtype) for a in bucket.averages] if bucket.averages[0].dtype != dtype else bucket.averages
        foreach_lerp_(bucket.weights, averages, plan.overwrite_keep)
    if bucket.mirrors:
        torch._foreach_copy_(bucket.mirrors, bucket.weights)


def bad_gradients(bucket: Bucket, grads: list[Tensor], limit: float) -> Tensor:
    """A 0-dim count of tensors holding NaN or a value of magnitude >= ``limit``.

    On the CPU (host reads allowed) the fast L2 norms find the suspects (a norm is inf whenever an
    element reaches 2**64), which are then checked one by one; elsewhere, max-abs norms on the device.
    """
    grads = [g for g in grads if g.numel()] or [torch.zeros(1, dtype=grads[0].dtype, device=grads[0].device)]
    if grads[0].is_cpu and host_reads_allowed():
        suspects = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).nonzero().flatten().tolist()
        return torch.tensor(float(sum(not bool(grads[i].abs().max() < limit) for i in suspects)))
    return (~(torch.stack(torch._foreach_norm(grads, ord=float("inf"))) < limit)).float().sum()  # NaN is bad


class TorchCall:
    """One call of a torch-op backend on one bucket: the gradients formed for the update (unscaled,
    accumulated) are made once, by whichever of ``grad_squares`` and ``update`` runs first."""

    def __init__(self, backend: TorchOpsBackend, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> None:
        self.backend, self.bucket, self.grads, self.plan = backend, bucket, grads, plan
        self._formed: tuple[list[Tensor], bool] | None = None

    def formed(self) -> tuple[list[Tensor], bool]:
        """The gradients the update uses, before clipping, and whether they are ours to clip in place."""
        if self._formed is None:
            self._formed = self.backend.form(self.bucket, self.grads, self.plan)
        return self._formed

    def accumulate(self) -> None:
        self.backend.accumulate(self.bucket, self.grads, self.plan)

    def grad_squares(self) -> Tensor:
        return self.backend.squares(self.formed()[0])

    def update(self, clip_factors: Tensor | None) -> TrustStats:
        work, owned = self.formed()
        work = self.backend.clip(work, owned, self.plan, clip_factors)
        assert self.plan.scalars is not None
        bucket = self.bucket
        stats = self.backend.lamb(
            bucket.weights, work, bucket.momentums, bucket.velocities, self.plan.scalars[bucket.group_index],
            decay_mask=bucket.decay_mask, adapt_mask=bucket.adapt_mask, reduce=bucket.reduce,
        )
        finish_update(bucket, self.plan)
        return stats


class TorchOpsBackend:
    """What the torch-op backends share: they take every bucket, keep no view of it, and finish an update with
    the same steps; each supplies its LAMB function (``lamb``) and its gradient pipeline (``form``, ``clip``,
    ``accumulate``, ``squares``)."""

    name: str
    lamb: Callable[..., TrustStats]

    def refuses(self, bucket: Bucket, config: LambConfig) -> str | None:
        return None

    def prepare(self, bucket: Bucket) -> Any:
        return None

    def begin(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> Any:
        return TorchCall(self, bucket, grads, plan)

    def ready(self, call: Any, clipping: bool) -> None:
        return None

    def ema(self, bucket: Bucket, plan: StepPlan) -> None:
        if plan.ema_weight is not None:
            move_averages(bucket, plan.ema_weight)

    def bad_gradients(self, bucket: Bucket, grads: list[Tensor], limit: float) -> Tensor:
        return bad_gradients(bucket, grads, limit)
