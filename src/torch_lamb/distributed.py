"""Norms of whole tensors, whether they are plain tensors or shards of a DTensor.

Every norm that LAMB and its clipping need comes from :func:`full_norms`, so that sharded
parameters get the norm of the full tensor (one collective for all of a step's norms) while plain
tensors pay nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "Reducer",
    "ReducerKey",
    "dtensor_reducer",
    "full_norms",
    "group_key",
    "host_reads_allowed",
    "is_dtensor",
    "local",
    "local_norms",
    "local_squared_norms",
    "no_host_reads",
    "reducer_for",
    "reducer_key",
]


def local(t: Tensor) -> Tensor:
    """The local part of ``t``: the shard of a DTensor, or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


_HOST_READS: contextvars.ContextVar[bool] = contextvars.ContextVar("torch_lamb_host_reads", default=True)


@contextlib.contextmanager
def no_host_reads(active: bool = True) -> Iterator[None]:
    """Within (when ``active``): norms never read a tensor on the host (``capturable=True``)."""
    if not active:
        yield
        return
    token = _HOST_READS.set(False)
    try:
        yield
    finally:
        _HOST_READS.reset(token)


def host_reads_allowed() -> bool:
    """False inside :func:`no_host_reads` (``capturable=True``)."""
    return _HOST_READS.get()


def local_norms(tensors: Sequence[Tensor]) -> Tensor:
    """A 1-D tensor of the L2 norms of ``tensors``, finite for every finite input.

    Float32 sums of squares overflow above about 1.8e19. On the CPU the fast float32 norms are
    checked on the host (no device sync) and an overflowed one is summed again in float64 (the result
    is then float64); where the host may not read (another device, ``capturable``) they are summed in
    float64 throughout.
    """
    if not tensors:
        return torch.zeros(0)
    tensors = list(tensors)
    dtype = _norm_dtype(tensors[0])
    if dtype == torch.float32 and not (tensors[0].is_cpu and _HOST_READS.get()):
        return torch.stack(torch._foreach_norm(tensors, dtype=torch.float64))
    norms = torch.stack(torch._foreach_norm(tensors, dtype=dtype))
    if dtype == torch.float32 and bool(torch.isinf(norms).any()):
        norms = norms.double()
        for i in torch.isinf(norms).nonzero().flatten().tolist():  # rare: huge (or non-finite) values
            norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


Reducer = Callable[[Tensor], Tensor]
"""Maps a 1-D tensor of local squared sums to the squared sums of the full tensors (a collective)."""


def local_squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """A 1-D tensor of the local sums of squares of ``tensors`` (float64 where float32 would overflow)."""
    return torch.square(local_norms(tensors))  # float32 norms are below 1.8e19: their squares fit


def full_norms(*tensor_lists: Sequence[Tensor], reduce: Reducer | None = None) -> list[Tensor]:
    """For each list of local tensors, a 1-D tensor of the L2 norms of the full tensors.

    Without ``reduce`` the tensors are whole and their norms are taken directly. With it, the local
    squared sums of all lists are packed into one buffer, reduced once, and split again.
    """
    if reduce is None:
        return [local_norms(tensors) for tensors in tensor_lists]
    packed = reduce(torch.cat([local_squared_norms(t) for t in tensor_lists]))
    return list(torch.sqrt(packed).split([len(t) for t in tensor_lists]))


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (checked without importing ``torch.distributed.tensor``)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


ReducerKey = tuple[object, object]
"""Where a tensor's local squared sums must be summed: ``(mesh, mesh dims)`` for a DTensor, or
``("group", process group)`` for a piece handed out by another sharding engine (both hashable)."""

def reducer_key(t: Tensor) -> ReducerKey | None:
    """``(mesh, shard mesh dims)`` of a DTensor, or None for a plain or fully replicated tensor.

    Supported placements: ``Shard(d)`` on any tensor dim (FSDP2, tensor parallel) and ``Replicate``,
    on 1-D or N-D meshes. ``Partial`` (and any other placement) raises, since its local values are
    not a piece of the full tensor.
    """
    if not is_dtensor(t):
        return None
    dims = []
    for i, pl in enumerate(t.placements):
        kind = type(pl).__name__
        if kind == "Shard" or kind == "_StridedShard":
            dims.append(i)
        elif kind != "Replicate":
            raise ValueError(
                f"Lamb supports DTensor placements Shard and Replicate only; received {t.placements!r}. "
                "Redistribute the parameter (e.g. to Replicate) first."
            )
    return (t.device_mesh, tuple(dims)) if dims else None


def dtensor_reducer(t: Tensor) -> Reducer | None:
    """A :data:`Reducer` summing squared norms over the mesh dims where ``t`` is sharded.

    One ``all_reduce`` per sharded mesh dim (one for FSDP2 or TP, two for a 2-D mesh sharded on
    both dims); Replicate dims are skipped so replicas are not double-counted.
    """
    return reducer_for(reducer_key(t))


def group_key(group: object) -> ReducerKey:
    """The key of a reducer over a process group, held weakly: an optimizer that outlives
    ``destroy_process_group()`` must not keep the group alive until the interpreter tears it down."""
    return ("group", weakref.ref(group))


def reducer_for(key: ReducerKey | None) -> Reducer | None:
    """The :data:`Reducer` of ``key``: one ``all_reduce`` per sharded mesh dim, or one over the process group
    (None: no collective)."""
    if key is None:
        return None
    import torch.distributed as dist

    if isinstance(key[0], str):
        groups = [key[1]]  # a weak reference
    else:
        mesh, dims = key
        groups = [weakref.ref(mesh.get_group(d)) for d in dims]  # type: ignore[attr-defined, union-attr]

    def reduce(squares: Tensor) -> Tensor:
        for ref in groups:
            group = ref()  # type: ignore[operator]
            if group is None:
                raise RuntimeError("torch_lamb: the process group of these sharded parameters was destroyed.")
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        return squares

    return reduce  # not kept in a module-level cache: a process group held there outlives destroy_process_group()
    # and is torn down with the interpreter, which can abort it ("terminate called without an active exception")
