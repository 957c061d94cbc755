"""The leaf type every backend sees, :class:`Bucket`, and the contract a backend fulfils.

A bucket is the parameters of one param group that share a device, a dtype, a DTensor placement and
whether they have a float32 master. Backends see *entries*: one per tensor, or one per trust-ratio slice of
a sliced tensor (views of it and of its state along the slice dim, :mod:`torch_lamb.slices`), each with its
own ratio. ``owners``, ``indices``, ``splits`` and ``bases`` describe the tensors behind them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .config import LambConfig
from .distributed import Reducer, local
from .functional import TrustStats
from .plan import StepPlan

__all__ = ["Backend", "Bucket", "Call", "Cut", "GatheredGrads", "PackedGrads", "dense", "entries", "packed"]


@dataclass(eq=False)
class Bucket:
    """Tensors that one backend call updates together (fixed while the layout holds)."""

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
    cuts: list[Cut | None] | None = None  # per tensor, how it is cut into entries; None: each tensor is one entry
    units: Tensor | None = None  # per entry, its clipping unit (int64, on the device); None: the entries are the units
    unit_count: int = 0  # clipnorm's units: whole tensors, or the logical tensors of an engine's fragments
    bases: list[Tensor] = field(default_factory=list)  # every tensor written, whole (their pointers are checked)
    slots: list[tuple[Tensor, str, Tensor]] = field(default_factory=list)  # (parameter, state key, slot) used

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def grads(self, all_grads: Sequence[Tensor | None], packed: bool = False) -> list[Tensor]:
        """This bucket's gradient entries (local shards for DTensor parameters) out of every parameter's;
        ``packed``: the layout found every gradient packed and of its parameter's dtype."""
        if self.dtensor:
            grads = [local(all_grads[i]) for i in self.indices]
        elif self.span is not None:
            grads = all_grads[self.span[0]:self.span[1]]  # type: ignore[assignment]
        else:
            grads = [all_grads[i] for i in self.indices]  # type: ignore[misc]
        if self.cuts is None:
            return PackedGrads(grads) if packed and not self.dtensor else grads  # type: ignore[return-value]
        return [v for g, cut in zip(grads, self.cuts) for v in entries(g, cut)]  # type: ignore[arg-type]

    @property
    def span(self) -> tuple[int, int] | None:
        """``(start, stop)`` when the bucket's parameters are a run of consecutive positions (then its gradients
        are a slice of the list)."""
        indices = self.indices
        if indices and indices[-1] - indices[0] == len(indices) - 1:
            return indices[0], indices[-1] + 1
        return None

    def per_unit(self, entry_sums: Tensor) -> Tensor:
        """Per-entry sums added up per clipping unit (the identity when the entries are the units)."""
        if self.units is None:
            return entry_sums
        out = torch.zeros(self.unit_count, dtype=entry_sums.dtype, device=entry_sums.device)
        return out.index_add_(0, self.units.to(entry_sums.device), entry_sums)

    def per_entry(self, unit_values: Tensor) -> Tensor:
        """Per-unit values repeated for each entry (the identity when the entries are the units)."""
        if self.units is None:
            return unit_values
        return unit_values.index_select(0, self.units.to(unit_values.device))

    def written(self) -> list[Tensor]:
        """Every entry a backend writes for this bucket (views, for sliced tensors)."""
        return [*self.weights, *self.mirrors, *self.momentums, *self.velocities, *self.accumulators, *self.averages]


Cut = tuple[int, list[int]] | tuple[tuple[int, int], ...]
"""How a tensor is cut into entries: ``(dim, lengths)`` for trust-ratio slices (they tile it), or
``((start, numel), ...)`` for an engine's fragments of its flattened elements (padding between them is left out)."""


def entries(t: Tensor, cut: Cut | None) -> tuple[Tensor, ...]:
    """The entries of ``t`` (a parameter, a state slot or a gradient) under ``cut``: views of it."""
    if cut is None:
        return (t,)
    if isinstance(cut[0], int):
        return tuple(t.split(cut[1], cut[0]))  # type: ignore[arg-type]
    flat = t.reshape(-1)
    return tuple(flat.narrow(0, start, numel) for start, numel in cut)  # type: ignore[misc]


class PackedGrads(list):
    """Gradients the layout found packed, each of its parameter's shape, dtype and device: read as they are."""


class GatheredGrads(Sequence[Tensor]):
    """A bucket's gradients as the gradient scan found them (:mod:`torch_lamb.backends.grad_scan`): packed, of
    their parameters' shapes and dtypes, with their data pointers in ``table`` (int64). The kernel reads the
    table; an item is read from its parameter's ``.grad`` only where something asks for the tensor."""

    def __init__(self, owners: list[Tensor], table: Tensor) -> None:
        self.owners, self.table = owners, table

    def __len__(self) -> int:
        return len(self.owners)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [p.grad for p in self.owners[index]]
        return self.owners[index].grad

    def __iter__(self) -> Iterator[Tensor]:
        return (p.grad for p in self.owners)  # type: ignore[misc]


def dense(grads: list[Tensor], dtype: torch.dtype) -> tuple[list[Tensor], bool]:
    """The one gradient-normalising entry: ``grads`` as packed tensors of ``dtype``, and whether they are copies
    (then all of them are, so that a caller may write them). A stride-0 (``autograd.grad(p.sum(), p)``),
    transposed or sliced gradient, or one of another dtype, is copied; a packed one of ``dtype`` is read as it is."""
    if (type(grads) in (PackedGrads, GatheredGrads) and (not grads or grads[0].dtype is dtype)) or all(
            [g.dtype == dtype and g.is_contiguous() for g in grads]):
        return grads, False
    return [torch.empty(g.shape, dtype=dtype, device=g.device).copy_(g) for g in grads], True


def packed(grads: list[Tensor]) -> list[Tensor]:
    """``grads`` with every one that is not packed (stride 0, transposed, sliced) copied packed, dtypes kept."""
    if type(grads) in (PackedGrads, GatheredGrads) or all([g.is_contiguous() for g in grads]):
        return grads
    return [g if g.is_contiguous() else g.contiguous() for g in grads]


class Call(Protocol):
    """One call's work on one bucket: the gradients are read (and converted) once, shared by its phases."""

    def accumulate(self) -> None:
        """A micro-step: ``acc += g / loss_scale``."""

    def grad_squares(self) -> Tensor:
        """Per entry, the local sum of squares of the gradient the update uses, before clipping."""

    def update(self, clip_factors: Tensor | None) -> TrustStats:
        """The update: pipeline, LAMB (calling ``bucket.reduce`` between its passes), EMA, master copy."""


class Backend(Protocol):
    """What a backend provides (``backends/``). ``grads`` are the bucket's gradients as found in ``.grad``."""

    name: str

    def refuses(self, bucket: Bucket, config: LambConfig) -> str | None:
        """Why this backend cannot run ``bucket`` under ``config`` (None: it can)."""

    def prepare(self, bucket: Bucket) -> Any:
        """A view of the bucket built once per layout (the bucket's ``handle``)."""

    def begin(self, bucket: Bucket, grads: list[Tensor], plan: StepPlan) -> Call:
        """This call's work on ``bucket``."""

    def ready(self, call: Call, clipping: bool) -> None:
        """Work that may fail and must change nothing, run for every bucket of an update before any is measured
        or written (the compiling backends compile there); ``clipping``: the update takes clip factors."""

    def ema(self, bucket: Bucket, plan: StepPlan) -> None:
        """Move the averages toward the weights (a call that does not update this bucket)."""

    def bad_gradients(self, bucket: Bucket, grads: list[Tensor], limit: float) -> Tensor:
        """A 0-dim float count of local tensors holding NaN or a value of magnitude >= ``limit``."""
