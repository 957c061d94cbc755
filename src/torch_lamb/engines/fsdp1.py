"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``): its pieces, read from its own records.

* ``use_orig_params=False``: the optimizer holds ``FlatParameter`` s, each one rank's 1-D shard of many
  parameters (plus padding at the end). ``_shard_param_infos`` (one entry per parameter: in this shard or
  not, where, how many elements) and ``_fqns`` (the parameters' names under the wrapped module) make a row
  of fragments that every rank lays out alike.
* ``use_orig_params=True``: the optimizer holds the original parameters, each a 1-D view of its piece of
  the local shard (size 0 where this rank holds none of it): a piece of one logical tensor.

Either way the squared sums are summed over the ``FlatParamHandle`` 's process group (the shard group:
under ``HYBRID_SHARD`` the replicas are not summed twice), once per bucket. The handles are found once, by
a scan of the live objects (``gc``), when the optimizer first steps such tensors. A strategy that does not
shard (``NO_SHARD``) needs no reduction. Trust-ratio slices are refused: FSDP1 flattens the tensors, so
their shapes are gone (FSDP2's ``fully_shard`` keeps them).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..config import LambConfig
from ..distributed import ReducerKey, group_key
from ..shards import EngineDefaults, Fragment, Shards

__all__ = ["Fsdp1Engine"]


def _alive(ref: Any) -> Any:
    return ref() if ref is not None else None


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class Fsdp1Engine(EngineDefaults):
    """The FSDP1 handles behind an optimizer's tensors (see the module docstring)."""

    name = "FSDP1"

    def __init__(self, handles: dict[int, Any], views: dict[int, Any]) -> None:
        super().__init__()
        # weakly: the optimizer must not keep FSDP's handles (and their process groups) alive
        self._handles = {k: weakref.ref(h) for k, h in handles.items()}  # id(FlatParameter) -> its FlatParamHandle
        self._views = {k: weakref.ref(h) for k, h in views.items()}  # id(original parameter) -> the one it views

    @classmethod
    def find(cls, params: Sequence[Tensor]) -> Fsdp1Engine:
        handles = [o for o in gc.get_objects()
                   if type(o).__name__ == "FlatParamHandle" and type(o).__module__.startswith("torch.distributed")]
        by_flat = {id(h.flat_param): h for h in handles}
        views = {id(p): h for h in handles for p in (getattr(h.flat_param, "_params", None) or ())}
        missing = [p for p in params if getattr(p, "_fsdp_flattened", False) and id(p) not in by_flat
                   and id(p) not in views]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) were flattened by FSDP1, but their FSDP module is gone, so their "
                "pieces cannot be mapped to whole tensors: Lamb's trust ratios would be those of the pieces. "
                "Build the optimizer from the live FSDP model's parameters."
            )
        return cls(by_flat, views)

    @staticmethod
    def _key(handle: Any) -> ReducerKey | None:
        return group_key(handle.process_group) if handle.uses_sharded_strategy else None

    def shards(self, p: Tensor, name: str) -> Shards | None:
        handle = _alive(self._handles.get(id(p)))
        if handle is not None:  # a FlatParameter: a row of fragments, one per parameter it flattens
            cleaned = _clean(name)  # named_parameters() gives "<module path>._flat_param"
            prefix = cleaned.removesuffix("_flat_param") if cleaned.endswith("_flat_param") else f"{name}/"
            infos = p._shard_param_infos  # type: ignore[attr-defined]
            fragments = tuple(
                Fragment(info.offset_in_shard if info.in_shard else 0, info.numel_in_shard if info.in_shard else 0,
                         prefix + fqn)
                for info, fqn in zip(infos, p._fqns)  # type: ignore[attr-defined]
            )
            return Shards(self._key(handle), fragments)
        handle = _alive(self._views.get(id(p)))
        if handle is not None:  # an original parameter: its piece of one logical tensor
            return Shards(self._key(handle))
        return None

    def refuses(self, config: LambConfig, sliced: bool) -> str | None:
        if sliced:
            return ("FSDP1 flattens parameters, so per-slice trust ratios cannot find their slices: shard with "
                    "FSDP2 (torch.distributed.fsdp.fully_shard), which keeps them, or drop trust_ratio_slices")
        return None
