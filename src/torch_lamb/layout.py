"""The bucket layout: which tensors each backend call covers, cached across steps and revalidated.

A bucket is the parameters of one param group that share a device, a dtype, a DTensor mesh
placement and whether they have a float32 master; it holds their state slots, masks, names and the
reducer that sums squared norms across shards. This module is the ONE place that picks each
bucket's backend (:func:`torch_lamb.backends.select`).

The layout is reused while nothing it relies on changed. Every step compares, cheaply and list-wise,
the data pointer of every tensor a backend writes (weights, masters' copies, moments, accumulators,
averages) and the shape of every parameter with the cached ones; any difference rebuilds it, so a
raw-pointer backend never writes through a stale pointer. A rebuild checks every state slot's shape
against its parameter and raises a clear error, before anything changes, when they disagree.

The layout never creates state: the optimizer makes every slot (:mod:`torch_lamb.state`) first.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backends import select
from .bucket import Bucket
from .config import LambConfig
from .distributed import is_dtensor, local, reducer_for, reducer_key
from .rules import GroupRules
from .slices import LocalSlices, local_slices
from .state import ACCUMULATOR, AVERAGE, MASTER, MOMENTUM, VELOCITY

__all__ = ["Layout", "LayoutCache", "build", "read_grads"]


@dataclass(eq=False)
class Layout:
    """This step's buckets: ``active`` have gradients; ``idle`` hold the others that have an average or an
    accumulator (moved and reset with the rest)."""

    key: tuple[Any, ...]  # its first item says which of the parameters have a gradient
    params: list[Tensor]  # every parameter, in group order (a group edited in place changes one)
    active: list[Bucket]
    idle: list[Bucket]
    pointers: list[int]
    rebuild_every_step: bool  # DTensor buckets: FSDP may swap the local tensors between steps
    written: list[Tensor] = field(default_factory=list)  # every tensor a backend writes, in `pointers` order
    params_written: list[Tensor] = field(default_factory=list)  # those that are parameters: checked every step
    param_pointers: list[int] = field(default_factory=list)
    state_reads: int | None = -1  # optimizer.state's read count when the state slots' pointers were checked
    grad_spec: GradSpec | None = None  # what the gradients of the parameters that have one must match
    grad_params: list[Tensor] = field(default_factory=list)  # those parameters
    slots: list[tuple[Tensor, str, Tensor]] = field(default_factory=list)  # every state slot the buckets use

    @property
    def buckets(self) -> list[Bucket]:
        return self.active + self.idle


def _pointers(tensors: Sequence[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]  # a list: building an array of 10,000 ints costs more than reading them


class LayoutCache:
    """The optimizer's layout, rebuilt when what it relies on no longer holds. It reads the state, and never
    creates any: the optimizer makes every slot before it asks for a layout."""

    reuse = True  # False: rebuild at every call (to compare a cached layout with fresh ones)

    def __init__(self) -> None:
        self.layout: Layout | None = None

    def invalidate(self) -> None:
        self.layout = None

    def get(self, groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules], state: dict[Any, dict[str, Tensor]],
            config: LambConfig, params: list[Tensor], grads: list[Tensor | None], missing: tuple[bool, ...],
            names: Callable[[], dict[int, str]]) -> Layout:
        """The layout for this step (checks only; raises before anything changes).

        Reused while the parameters are the same objects and keep their storage (checked every step),
        and the state slots keep theirs (checked after any read of ``optimizer.state``, the only way user
        code reaches them). The gradients must match the parameters' shapes and devices recorded with it;
        a gradient of another dtype is converted by the backends.
        """
        key = (
            missing,
            tuple([(g["weight_decay"] is None, g["layer_adaptation"], id(r)) for g, r in zip(groups, rules)]),
            config, len(state),  # `del opt.state[p]` and `opt.state.clear()` rebuild too
        )
        layout = self.layout
        present = grads if not any(missing) else [g for g in grads if g is not None]
        reads = getattr(state, "reads", None)
        if (
            self.reuse and layout is not None and not layout.rebuild_every_step and layout.key == key
            and all(map(operator.is_, layout.params, params))
            and _pointers(layout.params_written) == layout.param_pointers
            and ((reads is not None and reads == layout.state_reads) or _state_unchanged(state, layout))
        ):
            layout.grad_spec.check(layout.grad_params, present)  # type: ignore[union-attr]
            layout.state_reads = reads
            return layout
        with_grads = [p for p, g in zip(params, grads) if g is not None]
        spec = GradSpec.of(with_grads)
        spec.check(with_grads, present)
        known = names()
        check_state_shapes(state, params, known)
        check_no_overlap(params, known)
        layout = self.layout = build(groups, rules, state, config, key, params, known)
        layout.grad_spec, layout.grad_params = spec, with_grads
        layout.state_reads = getattr(state, "reads", None)
        return layout


def _state_unchanged(state: dict[Any, dict[str, Tensor]], layout: Layout) -> bool:
    """After a read of ``optimizer.state``: every slot is still the tensor the layout uses (not replaced, not
    deleted) and keeps its storage."""
    return all(
        dict.get(dict.get(state, p, {}), key) is slot for p, key, slot in layout.slots
    ) and _pointers(layout.written) == layout.pointers


def check_state_shapes(state: dict[Any, dict[str, Tensor]], params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Every state slot must have its parameter's shape (a resized parameter cannot reuse its state)."""
    for p in params:
        for key, t in dict.get(state, p, {}).items():
            if key == MASTER or not isinstance(t, Tensor) or t.dim() == 0:
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"State {key!r} of parameter {names.get(id(p), '?')!r} has shape {tuple(t.shape)} but the "
                    f"parameter has shape {tuple(p.shape)}: it was resized after its state was made. Restore "
                    "its shape, or drop its state (`del optimizer.state[param]`) to start it afresh."
                )


def build(groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules], state: dict[Any, dict[str, Tensor]],
           config: LambConfig, key: tuple[Any, ...], params: list[Tensor], names: dict[int, str]) -> Layout:
    active: dict[tuple[Any, ...], Bucket] = {}
    idle: dict[tuple[Any, ...], Bucket] = {}
    position = -1
    for gi, (group, rule) in enumerate(zip(groups, rules)):
        fixed = [not group["layer_adaptation"] or e for e in rule.adapt_excluded]  # ratio 1
        for i, p in enumerate(group["params"]):
            position += 1
            own = dict.__getitem__(state, p)
            has_grad = p.grad is not None
            if not has_grad and AVERAGE not in own and ACCUMULATOR not in own:
                continue  # nothing to do for it this call
            master = MASTER in own
            sliced = local_slices(p, rule.slices[i], names[id(p)]) if rule.slices[i] is not None else None
            tensor_key = reducer_key(p)
            entry_key = sliced.reduce if sliced is not None else tensor_key
            # slices one element wide go apart: a backend that cannot take them must not take the bucket
            scattered = sliced is not None and sliced.scattered
            bkey = (gi, p.device, p.dtype, is_dtensor(p), entry_key, tensor_key, master, scattered)
            buckets = active if has_grad else idle
            b = buckets.get(bkey)
            if b is None:
                b = buckets[bkey] = Bucket(
                    gi, adapt_mask=[] if any(fixed) else None, reduce=reducer_for(entry_key),
                    tensor_reduce=reducer_for(tensor_key), dtensor=is_dtensor(p),
                )
            _add_tensor(b, p, own, master, sliced, names[id(p)], position,
                        decay=group["weight_decay"] is not None and not rule.decay_excluded[i],
                        adapt=None if b.adapt_mask is None else not fixed[i])
    buckets = [*active.values(), *idle.values()]
    for b in buckets:
        if b.splits is not None:
            b.entry_tensor = torch.tensor(
                [t for t, split in enumerate(b.splits) for _ in (split[1] if split else (0,))], device=b.device
            )
        b.backend, b.handle = select(b, config)
    written = [t for b in buckets for t in b.bases]
    owned = {id(local(p)) for p in params}
    params_written = [t for t in written if id(t) in owned]
    return Layout(key, params, list(active.values()), list(idle.values()), _pointers(written),
                  any(b.dtensor for b in buckets), written, params_written, _pointers(params_written),
                  slots=[s for b in buckets for s in b.slots])


def _add_tensor(
    b: Bucket, p: Tensor, state: dict[str, Tensor], master: bool, sliced: LocalSlices | None,
    name: str, position: int, *, decay: bool, adapt: bool | None,
) -> None:
    """Append parameter ``p`` to bucket ``b``: its whole tensors to ``bases``, its entries to the lists."""
    slots = [
        ("weights", local(state[MASTER]) if master else local(p)),
        ("mirrors", local(p) if master else None),
        ("momentums", local(state[MOMENTUM])),
        ("velocities", local(state[VELOCITY])),
        ("accumulators", local(state[ACCUMULATOR]) if ACCUMULATOR in state else None),
        ("averages", local(state[AVERAGE]) if AVERAGE in state else None),
    ]
    count = 1 if sliced is None else len(sliced.lengths)
    b.slots.extend((p, key, state[key]) for key in (MASTER, MOMENTUM, VELOCITY, ACCUMULATOR, AVERAGE) if key in state)
    for attr, t in slots:
        if t is None:
            continue
        b.bases.append(t)
        getattr(b, attr).extend((t,) if sliced is None else t.split(sliced.lengths, sliced.dim))
    if sliced is not None and b.splits is None:
        b.splits = [None] * len(b.indices)  # the tensors added before had one entry each
    if b.splits is not None:
        b.splits.append(None if sliced is None else (sliced.dim, list(sliced.lengths)))
    if b.adapt_mask is not None:
        b.adapt_mask.extend([bool(adapt)] * count)
    b.decay_mask.extend([decay] * count)
    b.names.extend([name] if sliced is None else sliced.names)
    b.owners.append(p)
    b.indices.append(position)


def read_grads(params: list[Tensor], given: list[Tensor | None] | None = None
               ) -> tuple[list[Tensor | None], tuple[bool, ...]]:
    """Every parameter's ``.grad``, read once (or the ``given`` ones, a compiled graph's), and which are None (all
    True: no gradient at all). They are checked against their parameters by :meth:`LayoutCache.get`."""
    grads = [p.grad for p in params] if given is None else given
    return grads, tuple([g is None for g in grads])


_shape = operator.attrgetter("shape")


def _same_shapes(tensors: Sequence[Tensor], shapes: Sequence[torch.Size]) -> bool:
    """Compared one by one: a list of 2,000 fresh torch.Size objects would wake the garbage collector."""
    return len(tensors) == len(shapes) and all(map(operator.eq, map(_shape, tensors), shapes))


@dataclass(frozen=True)
class GradSpec:
    """What every gradient must match: its parameter's shape and device (kept with the layout, whose
    validity implies that the parameters still have them). A gradient of another dtype is converted
    by the backends."""

    shapes: list[torch.Size]
    all_cpu: bool
    devices: list[torch.device]

    @classmethod
    def of(cls, params: Sequence[Tensor]) -> GradSpec:
        return cls([p.shape for p in params], all(p.is_cpu for p in params), [p.device for p in params])

    def check(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """List-wise in the common case; otherwise find the offender and raise (before any write)."""
        if (
            _same_shapes(grads, self.shapes) and not any([g.is_sparse for g in grads])
            and (all([g.is_cpu for g in grads]) if self.all_cpu else [g.device for g in grads] == self.devices)
        ):
            return
        for i, (p, g) in enumerate(zip(params, grads)):
            where = f"the gradient of parameter {i} (of those with gradients)"
            if g.is_sparse:
                raise RuntimeError(f"Lamb does not support sparse gradients ({where}).")
            if g.shape != p.shape:
                raise RuntimeError(f"{where} has shape {tuple(g.shape)}; its parameter has {tuple(p.shape)}.")
            if g.device != p.device:
                raise RuntimeError(f"{where} is on {g.device} but its parameter is on {p.device}.")


def check_no_overlap(params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Parameters whose elements share memory would be updated twice per step: refuse them."""
    spans = []
    for p in params:
        t = local(p)
        if t.numel() == 0 or t.device.type == "meta":
            continue
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        start = t.data_ptr()
        spans.append((t.device, start, start + extent * t.element_size(), p))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for (dev_a, _, end_a, a), (dev_b, start_b, _, b) in itertools.pairwise(spans):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(
                f"Parameters {names.get(id(a), '?')!r} and {names.get(id(b), '?')!r} share memory (views of one "
                "tensor?): each step would update those elements twice. Give Lamb separate tensors."
            )
