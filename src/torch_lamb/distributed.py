"""Norms of whole tensors, whether they are plain tensors or shards of a DTensor.

Every norm that LAMB and its clipping need comes from :func:`full_norms`, so that sharded
parameters get the norm of the full tensor (one collective for all of a step's norms) while plain
tensors pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Reducer", "full_norms", "local", "local_norms", "local_squared_norms"]


def local(t: Tensor) -> Tensor:
    """The local part of ``t``: the shard of a DTensor, or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_norms(tensors: Sequence[Tensor]) -> Tensor:
    """A 1-D tensor of the L2 norms of ``tensors`` (computed in float32 at least)."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(tensors), dtype=_norm_dtype(tensors[0])))


Reducer = Callable[[Tensor], Tensor]
"""Maps a 1-D tensor of local squared sums to the squared sums of the full tensors (a collective)."""


def local_squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """A 1-D tensor of the local sums of squares of ``tensors``."""
    return torch.square(local_norms(tensors))


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
