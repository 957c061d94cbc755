"""Trust ratios per slice: one LAMB ratio for each layer kept inside a bigger tensor.

An MoE expert bank ``[experts, in, out]``, a fused QKV projection ``[3·d, d]`` or scan-stacked
layers ``[layers, ...]`` hold several layers in one parameter; one ratio for the whole tensor would
give all of them one step size. A *slice spec* names how such a tensor splits:

* ``{"dim": 0}``: one ratio per index along ``dim`` (an expert bank, stacked layers);
* ``{"dim": 0, "sizes": [d, d, d], "labels": ["q", "k", "v"]}``: chunks of the given sizes.

The layout turns a sliced tensor into *entries*, views of it and of its state along ``dim``, that
every backend treats as tensors of their own; so a sliced tensor is updated exactly as if each slice
were its own parameter (``clipnorm`` stays per tensor, as in Keras). Telemetry names the entries
``name[3]``, or ``name.q`` with labels.

A sharded tensor (DTensor) keeps one packed all-reduce per bucket, whatever the number of slices:

* when the shards along ``dim`` start and end on slice boundaries (always so for one ratio per
  index), the local slices are whole; their squared sums are summed only over the mesh dims that
  shard the *other* tensor dims (none for FSDP2's ``Shard(0)`` on an expert bank: no collective);
* otherwise (say a fused QKV whose shard boundary falls inside ``k``), every rank lays out all the
  tensor's slices, contributes its part of each (zero for slices it does not hold), and the packed
  sums are reduced over every mesh dim that shards the tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .distributed import ReducerKey, is_dtensor, reducer_key

__all__ = ["SLICES", "LocalSlices", "SliceSpec", "group_slices", "local_slices", "normalize"]

SLICES = "trust_ratio_slices"  # param-group key: per parameter, a normalised spec or None

SliceSpec = tuple[int, tuple[int, ...] | None, tuple[str, ...] | None]
"""A normalised spec as param groups and checkpoints keep it: ``(dim, sizes, labels)``, plain tuples (immutable,
loadable with ``torch.load(weights_only=True)``, and one leaf for ``torch.distributed.checkpoint``)."""


def normalize(spec: Any, shape: Sequence[int], where: str) -> SliceSpec | None:
    """``spec`` checked against a parameter of (global) ``shape``: ``(dim, sizes, labels)`` with a non-negative
    dim, or None. ``spec`` may be None, a dim (int), a dict with ``dim`` and optionally ``sizes`` and
    ``labels``, or the normalised tuple. Errors name ``where`` (the parameter) and the accepted values."""
    if spec is None:
        return None
    if isinstance(spec, tuple) and len(spec) == 3:
        dim, sizes, labels = spec
    elif isinstance(spec, dict):
        unknown = set(spec) - {"dim", "sizes", "labels"}
        if unknown or "dim" not in spec:
            raise ValueError(
                f"A trust-ratio slice spec is a dim or a dict with 'dim' and optionally 'sizes' and 'labels'; "
                f"{where} received {spec!r}."
            )
        dim, sizes, labels = spec["dim"], spec.get("sizes"), spec.get("labels")
    else:
        dim, sizes, labels = spec, None, None
    ndim = len(shape)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"`dim` must be an int (the dim to slice along); {where} received dim={dim!r}.")
    if ndim == 0 or not -ndim <= dim < ndim:
        raise ValueError(
            f"`dim` must be in [{-ndim}, {ndim}) for {where} of shape {tuple(shape)}; received dim={dim}."
            if ndim else f"{where} is 0-dimensional: it has no dim to slice along."
        )
    dim %= ndim
    extent = int(shape[dim])
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise ValueError(f"`sizes` must be a non-empty list of positive ints; {where} received sizes={sizes!r}.")
        if sum(sizes) != extent:
            raise ValueError(
                f"`sizes` must sum to the size of dim {dim} of {where} ({extent}, shape {tuple(shape)}); "
                f"received sizes={list(sizes)!r}, which sum to {sum(sizes)}."
            )
        sizes = tuple(int(s) for s in sizes)
    elif extent == 0:
        raise ValueError(f"dim {dim} of {where} has size 0 (shape {tuple(shape)}): there is nothing to slice.")
    count = len(sizes) if sizes is not None else extent
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not all(
            isinstance(x, str) and x for x in labels
        ):
            raise ValueError(f"`labels` must be a list of non-empty strings; {where} received labels={labels!r}.")
        if len(labels) != count or len(set(labels)) != count:
            raise ValueError(
                f"`labels` must name each of the {count} slices of {where} once; received labels={list(labels)!r}."
            )
        labels = tuple(labels)
    return (dim, sizes, labels)


def group_slices(group: dict[str, Any], params: Sequence[Any], group_index: int) -> list[SliceSpec | None]:
    """A group's ``trust_ratio_slices`` as one normalised spec per parameter (checked): a spec (a dim, a dict
    or a normalised tuple) given for the group applies to each parameter; a list gives one per parameter."""
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    given = group.get(SLICES)
    if isinstance(given, list):
        if len(given) != len(tensors):
            raise ValueError(
                f"`trust_ratio_slices` of param group {group_index} lists {len(given)} specs for "
                f"{len(tensors)} parameters (a list gives one spec per parameter; a dim or a dict applies to all)."
            )
        specs = given
    else:
        specs = [given] * len(tensors)
    given_names = group.get("param_names")
    names = [p[0] if isinstance(p, tuple) else given_names[i] if given_names and i < len(given_names) else
             f"{group_index}.{i}"
             for i, p in enumerate(params)]
    return [normalize(spec, p.shape, f"parameter {name!r}") for p, spec, name in zip(tensors, specs, names)]


@dataclass(frozen=True)
class LocalSlices:
    """A sliced tensor as this rank's entries: their extents along ``dim`` in the local tensor (they tile
    it), their names (None: a placeholder for a shard that holds no whole slice), and the mesh dims over
    which their squared sums are summed (``reduce``; None: no collective). ``scattered``: the slices are
    along the last dim (of size > 1) with rows before it, so no two of a slice's elements are adjacent."""

    dim: int
    lengths: list[int]
    names: list[str | None]
    reduce: ReducerKey | None
    scattered: bool = False


def _bounds(spec: SliceSpec, extent: int) -> list[int]:
    sizes = spec[1] or [1] * extent
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _chunks(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``torch.chunk``'s split of ``[lo, hi)`` into ``parts`` (DTensor's ``Shard``; trailing ones may be empty)."""
    size = math.ceil((hi - lo) / parts) if hi > lo else 0
    return [(min(lo + i * size, hi), min(lo + (i + 1) * size, hi)) for i in range(parts)]


def local_slices(p: Tensor, spec: SliceSpec, name: str) -> LocalSlices:
    """This rank's entries of parameter ``p`` (named ``name``) sliced by the normalised ``spec``."""
    dim = spec[0]
    extent = int(p.shape[dim])
    bounds = _bounds(spec, extent)
    labels = spec[2]
    names = [f"{name}.{x}" for x in labels] if labels else [f"{name}[{k}]" for k in range(len(bounds) - 1)]
    shape = p.to_local().shape if is_dtensor(p) else p.shape
    scattered = math.prod(shape[dim + 1:]) == 1 and math.prod(shape[:dim]) > 1
    if not is_dtensor(p):
        return LocalSlices(dim, [b - a for a, b in itertools.pairwise(bounds)], list(names), None, scattered)
    key = reducer_key(p)  # validates the placements (Shard and Replicate only)
    along, other = [], []
    for mesh_dim, placement in enumerate(p.placements):
        kind = type(placement).__name__
        if kind == "_StridedShard" and placement.dim == dim:
            raise ValueError(
                f"Parameter {name!r} is sharded with a strided placement ({placement!r}) on its trust-ratio "
                f"slice dim {dim}: Lamb cannot tell which slices are local. Slice along another dim, or shard "
                "without nesting FSDP over tensor parallelism on that dim."
            )
        if kind in ("Shard", "_StridedShard"):
            (along if placement.dim == dim else other).append(mesh_dim)
    # every shard's extent along `dim` (mesh dims split it in order, each one the chunks of the last)
    spans = [(0, extent)]
    mine = (0, extent)
    coordinate = p.device_mesh.get_coordinate()
    for mesh_dim in along:
        parts = p.device_mesh.size(mesh_dim)
        spans = [c for lo, hi in spans for c in _chunks(lo, hi, parts)]
        mine = _chunks(*mine, parts)[coordinate[mesh_dim]] if coordinate is not None else (0, 0)
    local_extent = int(p.to_local().shape[dim])
    if mine[1] - mine[0] != local_extent:
        raise ValueError(
            f"Parameter {name!r}: its local shard has {local_extent} rows along slice dim {dim}, but its placements "
            f"{p.placements!r} give {mine[1] - mine[0]}; Lamb cannot place its trust-ratio slices."
        )
    edges = set(bounds)
    aligned = all(lo in edges and hi in edges for lo, hi in spans if hi > lo)
    mesh = key[0] if key is not None else p.device_mesh
    if aligned:
        lo, hi = mine
        held = [k for k in range(len(bounds) - 1) if lo <= bounds[k] and bounds[k + 1] <= hi]
        lengths = [bounds[k + 1] - bounds[k] for k in held]
        entry_names: list[str | None] = [names[k] for k in held]
        if not held:  # a shard with no rows: one empty entry keeps the tensor (and its collectives) in the step
            lengths, entry_names = [0], [None]
        dims = tuple(other)
    else:
        lo, hi = mine
        lengths = [max(0, min(b, hi) - max(a, lo)) for a, b in itertools.pairwise(bounds)]
        entry_names = list(names)
        dims = tuple(sorted(other + along))
    return LocalSlices(dim, lengths, entry_names, (mesh, dims) if dims else None, scattered)
