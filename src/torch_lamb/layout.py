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

from .backends import grad_scan, select
from .bucket import Bucket, Cut, GatheredGrads, entries
from .config import LambConfig
from .distributed import ReducerKey, is_dtensor, local, reducer_for, reducer_key
from .rules import ADAPT_EXCLUDED, DECAY_EXCLUDED, GroupRules
from .shards import Fragment, Shards
from .slices import local_slices
from .state import ACCUMULATOR, AVERAGE, MASTER, MOMENTUM, VELOCITY, state_dtype

__all__ = ["FragmentRule", "GradScan", "Layout", "LayoutCache", "ShardsOf", "build", "read_grads"]

ShardsOf = Callable[[Tensor, str], "Shards | None"]
"""How a sharding engine's tensor maps onto logical tensors (:mod:`torch_lamb.shards`)."""
FragmentRule = Callable[[str, "Fragment"], bool]
"""Whether a rule (``exclude_from_weight_decay``, ``exclude_from_layer_adaptation``) selects a fragment's logical
tensor (by its name, or the identity of its parameter)."""


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
    grads_packed: bool = False  # this call: every gradient packed, of its parameter's dtype (read as it is)
    scannable: bool = False  # every parameter has a gradient and feeds the CPU kernel whole: the scan may check
    grad_scan: GradScan | None = None  # built at the first call that finds the scan loaded
    call_grads: list[Sequence[Tensor]] = field(default_factory=list)  # this call: each active bucket's gradients
    param_shapes: list[torch.Size] = field(default_factory=list)  # `params`' shapes (a view swapped in by `.data`)

    @property
    def buckets(self) -> list[Bucket]:
        return self.active + self.idle


def _pointers(tensors: Sequence[Tensor]) -> list[int]:
    return list(map(Tensor.data_ptr, tensors))  # a list: building an array of 10,000 ints costs more than reading them


class LayoutCache:
    """The optimizer's layout, rebuilt when what it relies on no longer holds. It reads the state, and never
    creates any: the optimizer makes every slot before it asks for a layout."""

    reuse = True  # False: rebuild at every call (to compare a cached layout with fresh ones)

    def __init__(self) -> None:
        self.layout: Layout | None = None

    def invalidate(self) -> None:
        self.layout = None

    def holds(self, params: list[Tensor]) -> bool:
        """Whether the cached layout was built for exactly these parameters."""
        layout = self.layout
        return layout is not None and len(layout.params) == len(params) and all(map(operator.is_, layout.params,
                                                                                    params))

    def gather(self, params: list[Tensor]) -> list[GatheredGrads] | None:
        """Where the cached layout holds for ``params`` and only feeds the CPU kernel: its gradients, checked and
        their pointers read by the gradient scan in one pass; None where the scan is not loaded, or anything
        (a missing, strided or converted gradient, a parameter given new storage) needs the ordinary path."""
        layout = self.layout
        if layout is None or not layout.scannable or not self.reuse or not self.holds(params):
            return None
        scan = grad_scan.scanner()
        if scan is None:
            return None
        if layout.grad_scan is None:
            layout.grad_scan = GradScan.of(layout.active)
            if layout.grad_scan is None:
                layout.scannable = False
                return None
        return layout.grad_scan.run(scan)

    def get(self, groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules], state: dict[Any, dict[str, Tensor]],
            config: LambConfig, params: list[Tensor], grads: list[Tensor | None] | None, missing: tuple[bool, ...],
            names: Callable[[], dict[int, str]], shards_of: ShardsOf | None = None,
            fragment_rule: FragmentRule | None = None, holds: bool | None = None,
            gathered: list[GatheredGrads] | None = None) -> Layout:
        """The layout for this step (checks only; raises before anything changes).

        Reused while the parameters are the same objects and keep their storage (checked every step),
        and the state slots keep theirs (checked after any read of ``optimizer.state``, the only way user
        code reaches them). The gradients must match the parameters' shapes and devices recorded with it;
        a gradient of another dtype is converted by the backends. ``holds``: :meth:`holds` already asked.
        ``gathered``: what :meth:`gather` found this call (then ``grads`` is None; they are read here if the
        layout no longer holds).
        """
        layout = self.layout
        scan = layout.grad_scan if layout is not None else None
        if scan is None or gathered is not scan.buckets:
            gathered = None
        if grads is None and gathered is None:
            grads, missing = read_grads(params)
        key = (
            missing,
            tuple([(g["weight_decay"] is None, g["layer_adaptation"], id(r)) for g, r in zip(groups, rules)]),
            config, len(state), shards_of,  # `del opt.state[p]` and `opt.state.clear()` rebuild too
        )
        reads = getattr(state, "reads", None)
        if (
            self.reuse and layout is not None and not layout.rebuild_every_step and layout.key == key
            and (holds if holds is not None else self.holds(params))
            and (gathered is not None or (_pointers(layout.params_written) == layout.param_pointers
                                          and list(map(_shape, params)) == layout.param_shapes))
            and ((reads is not None and reads == layout.state_reads) or _state_unchanged(state, layout))
        ):
            layout.grads_packed = gathered is not None or layout.grad_spec.check(  # type: ignore[union-attr]
                layout.grad_params, _present(grads, missing))  # type: ignore[arg-type]
            layout.state_reads = reads
            layout.call_grads = gathered or [b.grads(grads, layout.grads_packed) for b in layout.active]  # type: ignore[arg-type]
            return layout
        if grads is None:  # the scan checked a layout that no longer holds: read the gradients as usual
            grads, missing = read_grads(params)
            key = (missing, *key[1:])
        with_grads = [p for p, g in zip(params, grads) if g is not None]
        spec = GradSpec.of(with_grads)
        packed = spec.check(with_grads, _present(grads, missing))
        known = names()
        check_state_shapes(state, params, known)
        check_no_overlap(params, known)
        layout = self.layout = build(groups, rules, state, config, key, params, known, missing, shards_of,
                                     fragment_rule)
        layout.grad_spec, layout.grad_params, layout.grads_packed = spec, with_grads, packed
        layout.state_reads = getattr(state, "reads", None)
        layout.call_grads = [b.grads(grads, packed) for b in layout.active]
        return layout


def _present(grads: list[Tensor | None], missing: tuple[bool, ...]) -> list[Tensor]:
    return grads if not any(missing) else [g for g in grads if g is not None]  # type: ignore[return-value]


def _state_unchanged(state: dict[Any, dict[str, Tensor]], layout: Layout) -> bool:
    """After a read of ``optimizer.state``: every slot is still the tensor the layout uses (not replaced, not
    deleted) and keeps its storage."""
    return all(
        dict.get(dict.get(state, p, {}), key) is slot for p, key, slot in layout.slots
    ) and _pointers(layout.written) == layout.pointers


def check_state_shapes(state: dict[Any, dict[str, Tensor]], params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Every state slot must have its parameter's shape (a resized parameter cannot reuse its state) and the
    state's dtype (a slot whose ``.data`` was given another one would fail halfway through a step)."""
    for p in params:
        for key, t in dict.get(state, p, {}).items():
            if not isinstance(t, Tensor) or t.dim() == 0:
                continue
            if t.dtype != state_dtype(p):
                raise ValueError(
                    f"State {key!r} of parameter {names.get(id(p), '?')!r} is {t.dtype}; Lamb keeps "
                    f"{state_dtype(p)} state for a {p.dtype} parameter. Convert it back, or drop the parameter's "
                    "state (`del optimizer.state[param]`) to start it afresh."
                )
            if key == MASTER:
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"State {key!r} of parameter {names.get(id(p), '?')!r} has shape {tuple(t.shape)} but the "
                    f"parameter has shape {tuple(p.shape)}: it was resized after its state was made. Restore "
                    "its shape, or drop its state (`del optimizer.state[param]`) to start it afresh."
                )


@dataclass(frozen=True)
class _Pieces:
    """How one parameter enters a bucket: its cut into entries and, per entry, its name and flags."""

    cut: Cut | None
    names: list[str | None]
    decay: list[bool]
    adapt: list[bool]
    own_units: bool  # each entry is a clipping unit of its own (an engine's fragments); else one per tensor
    entry_key: ReducerKey | None
    tensor_key: ReducerKey | None
    scattered: bool = False


def _pieces(p: Tensor, group: dict[str, Any], rule: GroupRules, i: int, name: str, shards: Shards | None,
            fragment_rule: FragmentRule) -> _Pieces:
    decays = group["weight_decay"] is not None
    adapts = bool(group["layer_adaptation"])
    if shards is not None and shards.fragments is not None:  # an engine's flat piece of many tensors
        frags = shards.fragments
        return _Pieces(tuple((f.start, f.numel) for f in frags), [f.name for f in frags],
                       [decays and not fragment_rule(DECAY_EXCLUDED, f) for f in frags],
                       [adapts and not fragment_rule(ADAPT_EXCLUDED, f) for f in frags], True, shards.reduce,
                       shards.reduce)
    tensor_key = shards.reduce if shards is not None else reducer_key(p)
    decay, adapt = decays and not rule.decay_excluded[i], adapts and not rule.adapt_excluded[i]
    if rule.slices[i] is None:
        return _Pieces(None, [name], [decay], [adapt], False, tensor_key, tensor_key)
    sliced = local_slices(p, rule.slices[i], name)
    n = len(sliced.lengths)
    # slices one element wide go apart: a backend that cannot take them must not take the bucket
    return _Pieces((sliced.dim, list(sliced.lengths)), list(sliced.names), [decay] * n, [adapt] * n, False,
                   sliced.reduce, tensor_key, sliced.scattered)


def build(groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules], state: dict[Any, dict[str, Tensor]],
          config: LambConfig, key: tuple[Any, ...], params: list[Tensor], names: dict[int, str],
          missing: tuple[bool, ...], shards_of: ShardsOf | None = None,
          fragment_rule: FragmentRule | None = None) -> Layout:
    active: dict[tuple[Any, ...], Bucket] = {}
    idle: dict[tuple[Any, ...], Bucket] = {}
    position = -1
    for gi, (group, rule) in enumerate(zip(groups, rules)):
        for i, p in enumerate(group["params"]):
            position += 1
            own = dict.__getitem__(state, p)
            has_grad = not missing[position]
            if not has_grad and AVERAGE not in own and ACCUMULATOR not in own:
                continue  # nothing to do for it this call
            master = MASTER in own
            shards = shards_of(p, names[id(p)]) if shards_of is not None else None
            pieces = _pieces(p, group, rule, i, names[id(p)], shards, fragment_rule or _no_rule)
            bkey = (gi, p.device, p.dtype, is_dtensor(p), pieces.entry_key, pieces.tensor_key, master,
                    pieces.scattered)
            buckets = active if has_grad else idle
            b = buckets.get(bkey)
            if b is None:
                b = buckets[bkey] = Bucket(gi, adapt_mask=[], reduce=reducer_for(pieces.entry_key),
                                           tensor_reduce=reducer_for(pieces.tensor_key), dtensor=is_dtensor(p))
            _add_tensor(b, p, own, master, pieces, position)
    buckets = [*active.values(), *idle.values()]
    for b in buckets:
        if all(b.adapt_mask):  # type: ignore[arg-type]
            b.adapt_mask = None  # every entry takes the trust ratio
        b.units = torch.tensor(b.units, dtype=torch.int64, device=b.device) if b.units is not None else None
        b.backend, b.handle = select(b, config)
    written = [t for b in buckets for t in b.bases]
    owned = {id(local(p)) for p in params}
    params_written = [t for t in written if id(t) in owned]
    scannable = bool(active) and not idle and not any(missing) and all(
        b.backend.name == "fused" and b.cuts is None and not b.dtensor and b.handle.runs is None  # type: ignore[union-attr]
        for b in active.values())
    return Layout(key, params, list(active.values()), list(idle.values()), _pointers(written),
                  any(b.dtensor for b in buckets), written, params_written, _pointers(params_written),
                  slots=[s for b in buckets for s in b.slots], scannable=scannable,
                  param_shapes=list(map(_shape, params)))


_PLAIN = (Tensor, torch.nn.Parameter)


@dataclass(eq=False)
class GradScan:
    """What the gradient scan checks a layout's parameters against (storage, size, dtype), in bucket order, and
    the table it writes their gradients' pointers to: each bucket reads its slice (built once per layout)."""

    params: list[Tensor]
    expected: tuple[Tensor, Tensor, Tensor]  # int64 data pointers, int64 shapes (dim count, dims), int8 dtype codes
    table: Tensor  # int64: the gradients' data pointers, written by each scan
    buckets: list[GatheredGrads]
    addresses: tuple[int, int, int, int]

    @classmethod
    def of(cls, active: Sequence[Bucket]) -> GradScan | None:
        """None where a parameter is of a tensor subclass (it may define its own ``.grad``): the ordinary path
        reads those through Python."""
        params = [p for b in active for p in b.owners]
        if not all(type(p) in _PLAIN for p in params):
            return None
        codes = {d: grad_scan.dtype_code(d) for d in {p.dtype for p in params}}
        expected = (torch.tensor(_pointers(params), dtype=torch.int64),
                    torch.tensor([d for p in params for d in (p.dim(), *p.shape)], dtype=torch.int64),
                    torch.tensor([codes[p.dtype] for p in params], dtype=torch.int8))
        table = torch.zeros(len(params), dtype=torch.int64)
        buckets, start = [], 0
        for b in active:
            buckets.append(GatheredGrads(b.owners, table[start:start + len(b.owners)]))
            start += len(b.owners)
        return cls(params, expected, table, buckets, (*[t.data_ptr() for t in expected], table.data_ptr()))

    def run(self, scan: grad_scan.Scan) -> list[GatheredGrads] | None:
        """The buckets' gradients when every one passed the scan, else None."""
        passed = scan(self.params, *self.addresses) < 0
        grad_scan.record(passed)
        return self.buckets if passed else None


def _no_rule(key: str, fragment: Fragment) -> bool:
    return False


def _add_tensor(b: Bucket, p: Tensor, state: dict[str, Tensor], master: bool, pieces: _Pieces, position: int) -> None:
    """Append parameter ``p`` to bucket ``b``: its whole tensors to ``bases``, its entries to the lists."""
    slots = [
        ("weights", local(state[MASTER]) if master else local(p)),
        ("mirrors", local(p) if master else None),
        ("momentums", local(state[MOMENTUM])),
        ("velocities", local(state[VELOCITY])),
        ("accumulators", local(state[ACCUMULATOR]) if ACCUMULATOR in state else None),
        ("averages", local(state[AVERAGE]) if AVERAGE in state else None),
    ]
    count = len(pieces.names)
    b.slots.extend((p, key, state[key]) for key in (MASTER, MOMENTUM, VELOCITY, ACCUMULATOR, AVERAGE) if key in state)
    for attr, t in slots:
        if t is None:
            continue
        b.bases.append(t)
        getattr(b, attr).extend(entries(t, pieces.cut))
    if pieces.cut is not None and b.cuts is None:
        b.cuts = [None] * len(b.indices)  # the tensors added before had one entry each
        b.units = list(range(b.unit_count))  # type: ignore[assignment]
    if b.cuts is not None:
        b.cuts.append(pieces.cut)
        units = range(b.unit_count, b.unit_count + count) if pieces.own_units else [b.unit_count] * count
        b.units.extend(units)  # type: ignore[union-attr]
    b.unit_count += count if pieces.own_units else 1
    b.adapt_mask.extend(pieces.adapt)  # type: ignore[union-attr]
    b.decay_mask.extend(pieces.decay)
    b.names.extend(pieces.names)
    b.owners.append(p)
    b.indices.append(position)


_grad = operator.attrgetter("grad")


def read_grads(params: list[Tensor], given: list[Tensor | None] | None = None
               ) -> tuple[list[Tensor | None], tuple[bool, ...]]:
    """Every parameter's ``.grad``, read once (or the ``given`` ones, a compiled graph's), and which are None (all
    True: no gradient at all). They are checked against their parameters by :meth:`LayoutCache.get`."""
    grads = list(map(_grad, params)) if given is None else list(given)
    if not any(map(operator.is_, grads, itertools.repeat(None))):  # not `None in grads`: that calls Tensor.__eq__
        return grads, (False,) * len(grads)
    # FSDP1 gives a rank none of some parameters: a size-0 one has no gradient, its piece is empty
    grads = [p.new_empty(0) if g is None and p.numel() == 0 and p.requires_grad and getattr(
        p, "_fsdp_flattened", False) else g for p, g in zip(params, grads)]
    return grads, tuple([g is None for g in grads])


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_is_contiguous = Tensor.is_contiguous


@dataclass(frozen=True)
class GradSpec:
    """What every gradient must match: its parameter's shape and device (kept with the layout, whose
    validity implies that the parameters still have them). A gradient of another dtype, or one that is not
    packed, is converted by the backends; the common case (all packed, each of its parameter's dtype) is
    found in a few C-level passes over the list and read as it is."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    all_cpu: bool
    devices: list[torch.device]

    @classmethod
    def of(cls, params: Sequence[Tensor]) -> GradSpec:
        return cls(list(map(_shape, params)), list(map(_dtype, params)), all(map(_is_cpu, params)),
                   list(map(_device, params)))

    def check(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
        """Whether every gradient is packed, of its parameter's dtype, shape and device (then the backends read
        them as they are); otherwise find a gradient that cannot be used and raise (before any write), or return
        False (some need a packed copy of the parameter's dtype)."""
        try:
            if (
                list(map(_shape, grads)) == self.shapes and all(map(_is_contiguous, grads))
                and list(map(_dtype, grads)) == self.dtypes
                and (all(map(_is_cpu, grads)) if self.all_cpu else list(map(_device, grads)) == self.devices)
            ):
                return True
        except RuntimeError:  # a sparse gradient has no is_contiguous: named below
            pass
        for i, (p, g) in enumerate(zip(params, grads)):
            where = f"the gradient of parameter {i} (of those with gradients)"
            if g.is_sparse:
                raise RuntimeError(f"Lamb does not support sparse gradients ({where}).")
            if g.shape != p.shape:
                raise RuntimeError(f"{where} has shape {tuple(g.shape)}; its parameter has {tuple(p.shape)}.")
            if g.device != p.device:
                raise RuntimeError(f"{where} is on {g.device} but its parameter is on {p.device}.")
        return False


def _may_overlap_itself(t: Tensor) -> bool:
    """Whether two indices of ``t`` may reach one element: the dims of more than one element, by stride, must
    each step past everything the smaller ones reach."""
    reach = 0
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_no_overlap(params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Parameters whose elements share memory would be updated twice per step: refuse them."""
    spans = []
    for p in params:
        t = local(p)
        if t.numel() == 0 or t.device.type == "meta":
            continue
        if _may_overlap_itself(t):
            raise ValueError(
                f"Parameter {names.get(id(p), '?')!r} (shape {tuple(t.shape)}, strides {t.stride()}) has elements "
                "that share memory (an expanded view?): a step would write them more than once. Give Lamb a "
                "tensor that owns its elements (`.clone()`)."
            )
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
