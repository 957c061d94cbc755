"""torch's ``ZeroRedundancyOptimizer``: whole tensors, split among the ranks.

Each rank's optimizer holds whole parameters (its share), so trust ratios and ``clipnorm`` need nothing;
what spans ranks is the call's global quantities: ``global_clipnorm``'s squared norm and
``skip_nonfinite``'s count of unusable gradients are summed over ZeRO's process group (every rank joins,
also one that holds no parameter). ZeRO copies its param groups over the local optimizer's before and after
every step and on ``load_state_dict`` (rank 0's lists reach every rank), so the optimizer's per-parameter
lists in the groups are its own mirrors, never edits; its counters ride in the groups and come back with a
load. ``finalize_variable_values`` broadcasts each parameter from the rank that owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import ReducerKey, group_key
from ..shards import EngineDefaults

__all__ = ["ZeroEngine"]


class ZeroEngine(EngineDefaults):
    """The ``ZeroRedundancyOptimizer`` that built this optimizer (see the module docstring)."""

    name = "torch's ZeroRedundancyOptimizer"
    copies_groups = True

    def __init__(self, zero: Any) -> None:
        super().__init__(zero)
        self.global_reduce: ReducerKey | None = group_key(zero.process_group)
        # the names the user gave, by parameter, before ZeRO's group copies mix ranks' lists up
        self._names = {id(p): n for g in zero.param_groups for p, n in zip(g["params"], g.get("param_names", ()))}

    def param_names(self, params: Sequence[Tensor]) -> list[str] | None:
        """ZeRO hands each rank a copy of a group with its share of the parameters, in its own order, beside the
        whole group's names: each name found again by its parameter."""
        return [self._names[id(p)] for p in params] if all(id(p) in self._names for p in params) else None

    def finalize(self, write: Callable[[], None]) -> None:
        """Each rank writes its own parameters, then every parameter goes out from the rank that owns it (call
        ``finalize_variable_values`` on every rank)."""
        import torch.distributed as dist

        write()
        zero = self.owner()
        owners = zero._param_to_rank  # ZeRO's own partition: parameter -> rank
        group = zero.process_group
        with torch.no_grad():
            for g in zero.param_groups:
                for p in g["params"]:
                    dist.broadcast(p.data, src=dist.get_global_rank(group, owners[p]) if group is not None
                                   else owners[p], group=group)
