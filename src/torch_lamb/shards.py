"""Pieces of tensors that sharding engines hand the optimizer, and where their sums meet.

LAMB needs, per logical tensor, ``||w||`` and ``||u||`` (and ``||g||`` for ``clipnorm``); ``global_clipnorm``
needs the sum over every logical tensor. A sharding engine hands each rank pieces: DTensor shards (FSDP2),
1-D views of a flat shard (FSDP1), flat partitions holding pieces of many tensors (DeepSpeed ZeRO), whole
tensors split among ranks (``ZeroRedundancyOptimizer``). They all fit one model:

* a local tensor is either a piece of one logical tensor (:class:`Shards` without ``fragments``) or a row of
  :class:`Fragment` s, one per logical tensor it may hold a piece of, laid out identically on every rank
  (a fragment a rank does not hold has ``numel == 0``);
* the layout makes one bucket entry per fragment (a view of the local tensor and of its state), so each
  entry's ``[w², u²]`` partial sums land in the logical tensor's slot; the packed slot vector is summed
  over the engine's data-parallel group with one all-reduce per bucket (``Shards.reduce``), and the ratio
  scales every fragment. Elements no fragment covers (an engine's padding) are never read or written;
* an engine that splits whole tensors among ranks adds the sums of the call's global quantities
  (``global_clipnorm``'s squared norm, ``skip_nonfinite``'s count) over its group (:attr:`Engine.global_reduce`).

Engines that leave enough to detect are detected (:mod:`torch_lamb.engines`); what cannot be mapped is
refused before anything changes, never approximated.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from .config import LambConfig
from .distributed import ReducerKey

__all__ = ["Engine", "EngineDefaults", "Fragment", "Shards"]


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, start + numel)`` of the flattened local tensor are this rank's piece of the logical
    tensor ``name`` (``numel == 0``: none of it here; it still takes part in the reduction)."""

    start: int
    numel: int
    name: str
    owner: int | None = None  # id() of the logical parameter object, for selections by identity (None: gone)


@dataclass(frozen=True)
class Shards:
    """How one local tensor maps onto logical tensors, and where their squared sums are summed."""

    reduce: ReducerKey | None
    fragments: tuple[Fragment, ...] | None = None  # None: the whole local tensor is a piece of one logical tensor


class Engine(Protocol):
    """What a sharding engine adds to the step (:mod:`torch_lamb.engines`)."""

    name: str  # for messages: "FSDP1", "DeepSpeed ZeRO-2", ...
    global_reduce: ReducerKey | None  # sums of the call's global quantities over the engine's group
    copies_groups: bool  # the engine copies param groups around (their lists are not the user's edits)

    def shards(self, p: Tensor, name: str) -> Shards | None:
        """How ``p`` maps onto logical tensors (None: a whole tensor)."""

    def param_names(self, params: Sequence[Tensor]) -> list[str] | None:
        """The names of ``params`` as the engine knows them (None: the group's own names hold)."""

    def refuses(self, config: LambConfig, sliced: bool) -> str | None:
        """Why this engine cannot run this configuration right (None: it can); ``sliced``: trust-ratio slices are
        in use."""

    def clock_ticks(self) -> bool:
        """Whether the call that just ran completes an engine step (DeepSpeed calls ``step()`` once per group)."""

    def global_grad_norm(self) -> Tensor | None:
        """The engine's norm of every gradient of the step, where one call sees only part of them (None: the
        call's own buckets hold every gradient)."""

    def finalize(self, write: Callable[[], None]) -> None:
        """Run ``write`` (``finalize_variable_values``' copy of the averages into the weights) and make what it
        wrote visible on every rank, or refuse before it runs."""

    def forget(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        """Drop the state of parameters the engine replaced (DeepSpeed swaps them for flat partitions)."""


class EngineDefaults:
    """An :class:`Engine` that adds nothing; each engine overrides what it changes. ``owner``: the engine's
    optimizer that steps this one, held weakly (it holds this optimizer, which holds the engine)."""

    name = "engine"
    global_reduce: ReducerKey | None = None
    copies_groups = False

    def __init__(self, owner: Any = None) -> None:
        self._ref = weakref.ref(owner) if owner is not None else None

    def owner(self) -> Any:
        """The engine's optimizer (raises if it is gone: this optimizer outlived the engine that stepped it)."""
        owner = self._ref() if self._ref is not None else None
        if owner is None:
            raise RuntimeError(f"torch_lamb: the {self.name} that stepped this optimizer no longer exists.")
        return owner

    def shards(self, p: Tensor, name: str) -> Shards | None:
        return None

    def param_names(self, params: Sequence[Tensor]) -> list[str] | None:
        return None

    def refuses(self, config: LambConfig, sliced: bool) -> str | None:
        return None

    def clock_ticks(self) -> bool:
        return True

    def global_grad_norm(self) -> Tensor | None:
        return None

    def finalize(self, write: Callable[[], None]) -> None:
        write()

    def forget(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        return None
