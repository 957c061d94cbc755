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

Master weights follow one rule: **the parameter is the truth whenever it changed since the optimizer
last wrote it** (its storage, shape, dtype or in-place version differ). Then its master is re-made
from it, or dropped when the parameter is no longer float16/bfloat16.
"""

from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .distributed import Reducer, is_dtensor, local, reducer_for, reducer_key
from .functional import LOW_PRECISION
from .slices import SLICES, LocalSlices, group_slices, local_slices

if TYPE_CHECKING:
    from .backends import Backend
    from .optimizer import Lamb

__all__ = ["Bucket", "Layout", "LayoutCache", "read_grads"]

MOMENTUM, VELOCITY, AVERAGE, ACCUMULATOR = "momentum", "velocity", "average", "gradient_accumulator"
MASTER = "master_weight"
DECAY_EXCLUDED = "exclude_from_weight_decay"
ADAPT_EXCLUDED = "exclude_from_layer_adaptation"


@dataclass(eq=False)
class Bucket:
    """Tensors that one backend call updates together (fixed while the layout holds).

    The backends see *entries*: one per tensor, or one per trust-ratio slice of a sliced tensor (views
    of it and of its state along the slice dim, :mod:`torch_lamb.slices`), each with its own ratio.
    ``owners``, ``indices``, ``splits`` and ``bases`` describe the tensors behind them.
    """

    group_index: int
    weights: list[Tensor] = field(default_factory=list)  # what the update writes: a float32 master, else p
    mirrors: list[Tensor] = field(default_factory=list)  # low-precision params copied from their masters
    momentums: list[Tensor] = field(default_factory=list)
    velocities: list[Tensor] = field(default_factory=list)
    accumulators: list[Tensor] = field(default_factory=list)
    averages: list[Tensor] = field(default_factory=list)
    decay_mask: list[bool] = field(default_factory=list)
    adapt_mask: list[bool] | None = None  # None: every entry takes the trust ratio
    names: list[str | None] = field(default_factory=list)  # per entry (None: a placeholder telemetry skips)
    owners: list[Tensor] = field(default_factory=list)  # per tensor: the parameters (keys of the optimizer's state)
    indices: list[int] = field(default_factory=list)  # their positions among all parameters
    reduce: Reducer | None = None  # sums the entries' local squared norms across shards (None: whole entries)
    tensor_reduce: Reducer | None = None  # sums per-tensor local sums across shards (clipnorm, the guard)
    dtensor: bool = False
    backend: Backend | None = None
    handle: Any = None  # the backend's prebuilt view of the bucket (the kernel's pointer arrays)
    splits: list[tuple[int, list[int]] | None] | None = None  # per tensor, (dim, entry lengths); None: none sliced
    entry_tensor: Tensor | None = None  # with splits: each entry's tensor index (int64, on the bucket's device)
    bases: list[Tensor] = field(default_factory=list)  # every tensor written, whole (their pointers are checked)
    slots: list[tuple[Tensor, str, Tensor]] = field(default_factory=list)  # (parameter, state key, slot) used

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    @property
    def tensor_count(self) -> int:
        return len(self.indices)

    def grads(self, all_grads: Sequence[Tensor | None]) -> list[Tensor]:
        """This bucket's gradient entries (local shards for DTensor parameters) out of every parameter's."""
        if self.dtensor:
            grads = [local(all_grads[i]) for i in self.indices]
        else:
            grads = [all_grads[i] for i in self.indices]  # type: ignore[misc]
        if self.splits is None:
            return grads  # type: ignore[return-value]
        return [v for g, split in zip(grads, self.splits)
                for v in ((g,) if split is None else g.split(split[1], split[0]))]  # type: ignore[union-attr]

    def per_tensor(self, entry_sums: Tensor) -> Tensor:
        """Per-entry sums added up per tensor (the identity without slices)."""
        if self.entry_tensor is None:
            return entry_sums
        out = torch.zeros(self.tensor_count, dtype=entry_sums.dtype, device=entry_sums.device)
        return out.index_add_(0, self.entry_tensor.to(entry_sums.device), entry_sums)

    def per_entry(self, tensor_values: Tensor) -> Tensor:
        """Per-tensor values repeated for each entry (the identity without slices)."""
        if self.entry_tensor is None:
            return tensor_values
        return tensor_values.index_select(0, self.entry_tensor.to(tensor_values.device))

    def written(self) -> list[Tensor]:
        """Every entry a backend writes for this bucket (views, for sliced tensors)."""
        return [*self.weights, *self.mirrors, *self.momentums, *self.velocities, *self.accumulators, *self.averages]


class TrackedState(defaultdict):
    """``optimizer.state``, counting the reads made through it.

    Every way to reach a state tensor from outside (``state[p]``, ``get``, ``values``, ``items``,
    iteration, copies) bumps :attr:`reads`; the layout re-reads the pointers of every state slot only
    after such a read, since only then can user code have given a slot new storage
    (``state[p]["momentum"].data = ...``). The optimizer's own per-step code reads the dict directly.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads = 0

    def _read(self) -> None:
        self.reads += 1

    def __getitem__(self, key: Any) -> Any:
        self._read()
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._read()
        return super().get(key, default)

    def values(self) -> Any:
        self._read()
        return super().values()

    def items(self) -> Any:
        self._read()
        return super().items()

    def __iter__(self) -> Any:
        self._read()
        return super().__iter__()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._read()
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self._read()
        return super().pop(*args)

    def copy(self) -> Any:
        self._read()
        return super().copy()

    def __reduce__(self) -> Any:
        return (type(self), (self.default_factory,), None, None, iter(dict.items(self)))


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
    """The optimizer's layout, rebuilt when what it relies on no longer holds."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self._marks: dict[int, tuple[int, int, torch.Size, torch.dtype]] = {}  # id(p) -> p as last written

    def invalidate(self) -> None:
        self.layout = None

    def get(self, opt: Lamb, params: list[Tensor], grads: list[Tensor | None], missing: tuple[bool, ...]) -> Layout:
        """The layout for this step (checks only; raises before anything changes).

        Reused while the parameters are the same objects and keep their storage (checked every step),
        and the state slots keep theirs (checked after any read of ``optimizer.state``, the only way user
        code reaches them). The gradients must match the parameters' shapes and devices recorded with it;
        a gradient of another dtype is converted by the backends.
        """
        key = (
            missing,
            tuple([(g["weight_decay"] is None, g["layer_adaptation"], id(g[DECAY_EXCLUDED]), id(g[ADAPT_EXCLUDED]),
                    id(g.get(SLICES))) for g in opt.param_groups]),
            opt.implementation, opt.capturable, opt.use_ema, opt.gradient_accumulation_steps,
            len(opt.state),  # `del opt.state[p]` and `opt.state.clear()` rebuild too
        )
        layout = self.layout
        present = grads if not any(key[0]) else [g for g in grads if g is not None]
        reads = getattr(opt.state, "reads", None)
        if (
            layout is not None and not layout.rebuild_every_step and layout.key == key
            and all(map(operator.is_, layout.params, params))
            and _pointers(layout.params_written) == layout.param_pointers
            and ((reads is not None and reads == layout.state_reads) or self.state_unchanged(opt, layout))
            and not self.stale_masters(opt, params)
        ):
            layout.grad_spec.check(layout.grad_params, present)
            layout.state_reads = reads
            return layout
        with_grads = [p for p, g in zip(params, grads) if g is not None]
        spec = GradSpec.of(with_grads)
        spec.check(with_grads, present)
        self.check_state_shapes(opt, params)
        check_no_overlap(params, _names(opt))
        self.refresh_masters(opt, params)
        layout = self.layout = self._build(opt, key, params)
        layout.grad_spec, layout.grad_params = spec, with_grads
        layout.state_reads = getattr(opt.state, "reads", None)
        return layout

    @staticmethod
    def state_unchanged(opt: Lamb, layout: Layout) -> bool:
        """After a read of ``optimizer.state``: every slot is still the tensor the layout uses (not replaced,
        not deleted) and keeps its storage."""
        state = opt.state
        return all(
            dict.get(dict.get(state, p, {}), key) is slot for p, key, slot in layout.slots
        ) and _pointers(layout.written) == layout.pointers

    # ------------------------------------------------------------------ master weights

    def mark(self, opt: Lamb, params: Sequence[Tensor]) -> None:
        """Remember each parameter with a master as the optimizer last wrote it."""
        state = opt.state
        self._marks = {
            id(p): _signature(local(p)) for p in params if MASTER in dict.get(state, p, ())
        }

    def absorb_version_bumps(self, opt: Lamb, params: Sequence[Tensor]) -> None:
        """A compiled graph's runtime bumps the version of the parameters the step op declares it writes: for
        a parameter with a master whose only change is its version, keep the master wherever the parameter
        still holds the master's rounding (elsewhere it was written: it is the truth there)."""
        marks = self._marks
        if not marks:
            return
        for p in params:
            mark = marks.get(id(p))
            if mark is None:
                continue
            lp = local(p)
            sig = _signature(lp)
            if sig == mark or (sig[0], sig[2], sig[3]) != (mark[0], mark[2], mark[3]):
                continue
            master = local(dict.__getitem__(opt.state, p)[MASTER])
            torch.where(lp == master.to(lp.dtype), master, lp.to(master.dtype), out=master)
            marks[id(p)] = sig

    def stale_masters(self, opt: Lamb, params: Sequence[Tensor]) -> bool:
        marks = self._marks
        if not marks:
            return False
        return any(_signature(local(p)) != marks.get(id(p)) for p in params if id(p) in marks)

    def refresh_masters(self, opt: Lamb, params: Sequence[Tensor]) -> None:
        """Apply the master rule: a parameter changed since the last write is the truth."""
        marks = self._marks
        for p in params:
            state = opt.state.get(p)
            if not state or MASTER not in state or id(p) not in marks:
                continue
            lp = local(p)
            if _signature(lp) == marks[id(p)]:
                continue
            if p.dtype not in LOW_PRECISION:
                del state[MASTER]  # a float32 (or float64) parameter is its own master
            elif local(state[MASTER]).shape == lp.shape:
                local(state[MASTER]).copy_(lp)
            else:
                state[MASTER] = p.detach().to(torch.float32, copy=True)
            marks[id(p)] = _signature(lp)

    @staticmethod
    def check_state_shapes(opt: Lamb, params: Sequence[Tensor]) -> None:
        """Every state slot must have its parameter's shape (a resized parameter cannot reuse its state)."""
        names = _names(opt)
        for p in params:
            for key, t in opt.state.get(p, {}).items():
                if key == MASTER or not isinstance(t, Tensor) or t.dim() == 0:
                    continue
                if t.shape != p.shape:
                    raise ValueError(
                        f"State {key!r} of parameter {names.get(id(p), '?')!r} has shape {tuple(t.shape)} but the "
                        f"parameter has shape {tuple(p.shape)}: it was resized after its state was made. Restore "
                        "its shape, or drop its state (`del optimizer.state[param]`) to start it afresh."
                    )

    # ------------------------------------------------------------------ build

    def _build(self, opt: Lamb, key: tuple[Any, ...], params: list[Tensor]) -> Layout:
        from .backends import select

        opt._ensure_state(recheck=True)
        names = _names(opt)
        active: dict[tuple[Any, ...], Bucket] = {}
        idle: dict[tuple[Any, ...], Bucket] = {}
        position = -1
        for gi, group in enumerate(opt.param_groups):
            fixed = [not group["layer_adaptation"] or e for e in group[ADAPT_EXCLUDED]]  # ratio 1
            specs = group_slices(group, group["params"], gi)  # checked again: the group may have been edited
            for i, p in enumerate(group["params"]):
                position += 1
                state = opt.state[p]
                has_grad = p.grad is not None
                if not has_grad and AVERAGE not in state and ACCUMULATOR not in state:
                    continue  # nothing to do for it this call
                master = MASTER in state
                sliced = local_slices(p, specs[i], names[id(p)]) if specs[i] is not None else None
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
                _add_tensor(b, p, state, master, sliced, names[id(p)], position,
                            decay=group["weight_decay"] is not None and not group[DECAY_EXCLUDED][i],
                            adapt=None if b.adapt_mask is None else not fixed[i])
        buckets = [*active.values(), *idle.values()]
        for b in buckets:
            if b.splits is not None:
                b.entry_tensor = torch.tensor(
                    [t for t, split in enumerate(b.splits) for _ in (split[1] if split else (0,))], device=b.device
                )
            b.backend, b.handle = select(b, opt)
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


def read_grads(params: list[Tensor]) -> tuple[list[Tensor | None], tuple[bool, ...]]:
    """Every parameter's ``.grad``, read once, and which are None (all True: no gradient at all). They
    are checked against their parameters by :meth:`LayoutCache.get`."""
    grads = [p.grad for p in params]
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


def _signature(p: Tensor) -> tuple[int, int, torch.Size, torch.dtype]:
    return (p.data_ptr(), p._version, p.shape, p.dtype)


def _names(opt: Lamb) -> dict[int, str]:
    """Each parameter's name: from ``named_parameters()`` when given, else ``"<group>.<index>"``."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        given = group.get("param_names")
        for i, p in enumerate(group["params"]):
            out[id(p)] = given[i] if given else f"{gi}.{i}"
    return out
