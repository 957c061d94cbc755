"""The phases of one call, over the layout's buckets: what a Keras ``apply`` does once the plan is made.

:func:`run` is the one place that orders them::

    an update call:   ready (compile) -> clip factors -> update each bucket
    a micro-step:     accumulate each bucket
    every call:       EMA of the buckets not updated -> reset idle accumulators -> overwrite with the averages

Each phase is a backend call per bucket (:class:`~torch_lamb.bucket.Call`, made once per bucket and call, so
that ``grad_squares`` and ``update`` share what they read). Whatever may fail without changing anything (a
first-use compile) runs for every bucket before any bucket is measured or written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import fall_back
from .backends.common import overwrite_with_averages, reset_accumulators
from .bucket import Bucket, Call
from .clipping import global_clip_factor, global_norm, norm_clip_factors
from .clock import StepClock
from .config import GroupOptions, LambConfig
from .distributed import reducer_for
from .functional import TrustStats
from .nonfinite import FiniteCopies
from .plan import StepPlan, plan_step
from .shards import Engine

__all__ = ["TrustRecord", "clip_factors", "join", "run"]

TrustRecord = tuple[list[str | None], TrustStats]
"""One bucket's entry names and the trust statistics of its update."""


def run(buckets: Sequence[Bucket], idle: Sequence[Bucket], grads: list[list[Tensor]], plan: StepPlan,
        auto: bool, finite_copies: FiniteCopies, sharding: Engine | None = None) -> list[TrustRecord]:
    """Run ``plan`` on the ``buckets`` that have gradients (``grads``: theirs, as :meth:`Bucket.grads` gives them)
    and the ``idle`` ones that have none; returns the trust statistics of an update call (``auto``: a bucket
    whose compile fails falls back to foreach; ``sharding``: the engine whose ranks share the global norm)."""
    if not plan.apply:
        return []
    if isinstance(plan.skip, Tensor):  # a device-side skip: finite copies, filled where the call is skipped
        grads = finite_copies(grads, plan.skip, plan.fill)
    elif plan.skip:
        grads = [[torch.full_like(g, plan.fill) for g in gs] for gs in grads]
    calls: list[Call] = [b.backend.begin(b, g, plan) for b, g in zip(buckets, grads)]  # type: ignore[union-attr]
    records: list[TrustRecord] = []
    if plan.updating:
        calls = _ready(buckets, grads, calls, plan, auto)
        factors = clip_factors(buckets, calls, plan, sharding)  # reads only
        records = [(b.names, call.update(f)) for b, call, f in zip(buckets, calls, factors)]
    else:
        for call in calls:
            call.accumulate()
    for bucket in idle if plan.updating else [*buckets, *idle]:
        bucket.backend.ema(bucket, plan)  # type: ignore[union-attr]
    for bucket in idle:
        reset_accumulators(bucket, plan)
    if plan.overwrite:
        for bucket in [*buckets, *idle]:
            overwrite_with_averages(bucket, plan)
    return records


def _ready(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], calls: list[Call], plan: StepPlan,
           auto: bool) -> list[Call]:
    """Every bucket's first-use work (the compiling backends compile, the clipping norms' graphs included)
    before any bucket of the call is measured or written. Under "auto" a bucket whose compile fails takes
    ``foreach`` (with one warning): "auto" never asked for a compiler. An explicit choice raises, having
    changed nothing."""
    clipping = plan.clip.kind in ("norm", "global")  # the update multiplies by per-entry factors
    out = []
    for bucket, bucket_grads, call in zip(buckets, grads, calls):
        try:
            bucket.backend.ready(call, clipping)  # type: ignore[union-attr]
        except Exception as err:
            if not auto:
                raise
            fall_back(bucket, err)
            call = bucket.backend.begin(bucket, bucket_grads, plan)  # type: ignore[union-attr]
        out.append(call)
    return out


def clip_factors(buckets: Sequence[Bucket], calls: Sequence[Call], plan: StepPlan,
                 sharding: Engine | None = None) -> list[Tensor | None]:
    """Per bucket, the per-entry factors that ``clipnorm`` or ``global_clipnorm`` multiply the gradients by.

    Each backend measures its gradients as the update will use them (``grad_squares``); the squares are added
    up per tensor (``clipnorm`` is per tensor, also for a tensor with trust-ratio slices), and sharded buckets
    sum them across ranks with one collective each.
    """
    if plan.clip.kind not in ("norm", "global"):
        return [None] * len(buckets)
    engine_norm = sharding.global_grad_norm() if sharding is not None and plan.clip.kind == "global" else None
    if engine_norm is not None:  # the engine measured every gradient of the step (DeepSpeed: before its calls)
        factor = global_clip_factor(engine_norm, plan.clip.value)
        return [factor.to(b.device, torch.float32).expand(len(b.weights)) for b in buckets]
    norms = []
    for bucket, call in zip(buckets, calls):
        squares = call.grad_squares()
        # A global norm adds each slice's squares as those of a parameter of its own, where they are complete
        # after the bucket's reduction; clipnorm (and a sharded slice's norm) needs the tensor's.
        if plan.clip.kind == "norm" or bucket.reduce is not bucket.tensor_reduce:
            squares = bucket.per_unit(squares)
        reduce = bucket.tensor_reduce
        norms.append(torch.sqrt(reduce(squares) if reduce is not None else squares))
    if plan.clip.kind == "norm":
        return [b.per_entry(norm_clip_factors(n, plan.clip.value)) for b, n in zip(buckets, norms)]
    factor = global_clip_factor(_global_norm(norms, sharding), plan.clip.value)
    return [factor.to(n.device, torch.float32).expand(len(b.weights)) for b, n in zip(buckets, norms)]


def _global_norm(norms: list[Tensor], sharding: Engine | None) -> Tensor:
    """The norm of every gradient of the step from the buckets' norms, summed over the ranks of an engine that
    splits whole tensors among them."""
    key = sharding.global_reduce if sharding is not None else None
    return global_norm(norms, reducer_for(key))


def join(config: LambConfig, options: tuple[GroupOptions, ...], clock: StepClock, sharding: Engine) -> StepPlan:
    """A rank with no gradient this call joins the collectives its engine's other ranks run (``skip_nonfinite``'s
    count, ``global_clipnorm``'s squared norm, with its share 0) and plans the call as they do."""
    found = None
    if config.skip_nonfinite:
        found = bool(reducer_for(sharding.global_reduce)(torch.zeros(1)).sum() > 0)  # type: ignore[misc]
    plan = plan_step(config, options, clock, found)
    if plan.apply and plan.updating and plan.clip.kind == "global":
        _global_norm([], sharding)
    return plan
