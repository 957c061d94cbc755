"""DeepSpeed ZeRO stages 1, 2 and 3 with Lamb as the client optimizer: flat partitions, read as fragments.

DeepSpeed swaps each group's parameters for flat fp32 partitions and calls ``step()`` itself, from its ZeRO
optimizer (found up the stack at the first such call):

* **ZeRO-1/2** (``DeepSpeedZeroOptimizer``): one partition per group, ``single_partition_of_fp32_groups[i]``,
  and one ``step()`` per group, showing only that group. Each parameter ``lp`` of ``bit16_groups[i]`` that
  reaches this rank's partition carries ``lp._hp_mapping``: where its piece sits in the partition.
* **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): one partition per sub-group,
  ``fp32_partitioned_groups_flat[s]``, the concatenation of its parameters' slots of ``partition_numel()``
  elements, of which rank ``r`` holds ``[r * n, min((r + 1) * n, ds_numel))`` of each: the rest of a slot is
  padding (uninitialised memory), which no fragment covers. One ``step()`` per sub-group.

Each partition becomes a row of fragments, one per parameter of its group (the same row on every rank),
summed over the data-parallel group. One engine step is several ``step()`` calls, so the clock ticks once,
after the last; ``global_clipnorm`` takes DeepSpeed's own norm of all the step's gradients (set before its
first call, and scaled by its own ``gradient_clipping`` where that clipped them). Refused, with what to do
instead: Lamb's gradient accumulation (DeepSpeed accumulates), ``skip_nonfinite`` (DeepSpeed's
loss scaler skips overflowing steps), trust-ratio slices (the partitions are flat), the bf16 optimizer
(``BF16_Optimizer``), and ``finalize_variable_values`` (DeepSpeed copies its fp32 partitions to the model
only inside its step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import LambConfig
from ..distributed import group_key
from ..shards import EngineDefaults, Fragment, Shards

__all__ = ["DeepSpeedEngine"]


class DeepSpeedEngine(EngineDefaults):
    """The DeepSpeed ZeRO optimizer that steps this optimizer (see the module docstring)."""

    copies_groups = True  # its groups hold flat partitions, not the tensors the rule lists were written for

    def __init__(self, zero: Any) -> None:
        super().__init__(zero)
        self._stage3 = type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3"
        self._bf16 = type(zero).__name__ == "BF16_Optimizer"
        self.name = "DeepSpeed ZeRO-3" if self._stage3 else "DeepSpeed ZeRO-1/2"
        self._rows: dict[int, Shards] = {}
        self._calls = 0
        if not self._bf16:
            self._rows = self._stage3_rows() if self._stage3 else self._stage12_rows()

    def _name(self, p: Any, fallback: str) -> str:
        names = getattr(self.owner(), "param_names", None) or {}
        return names.get(p, fallback)

    def _stage12_rows(self) -> dict[int, Shards]:
        zero, rows = self.owner(), {}
        for i, (params, flat) in enumerate(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups)):
            fragments = []
            for j, lp in enumerate(params):
                mapping = getattr(lp, "_hp_mapping", None)
                where = mapping.hp_fragment_address if mapping is not None else None
                fragments.append(Fragment(where.start if where else 0, where.numel if where else 0,
                                          self._name(lp, f"{i}.{j}"), id(lp)))
            rows[id(flat)] = Shards(group_key(zero.real_dp_process_group[i]), tuple(fragments))
        return rows

    def _stage3_rows(self) -> dict[int, Shards]:
        import torch.distributed as dist

        zero, rows = self.owner(), {}
        rank = dist.get_rank(zero.dp_process_group)
        for s, (params, flat) in enumerate(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat)):
            fragments, at = [], 0
            for j, p in enumerate(params):
                slot = p.partition_numel()
                held = max(0, min(slot, p.ds_numel - rank * slot))
                fragments.append(Fragment(at, held, self._name(p, f"{s}.{j}"), id(p)))
                at += slot
            rows[id(flat)] = Shards(group_key(zero.dp_process_group), tuple(fragments))
        return rows

    def shards(self, p: Tensor, name: str) -> Shards | None:
        return self._rows.get(id(p))

    def refuses(self, config: LambConfig, sliced: bool) -> str | None:
        if self._bf16:
            return ("DeepSpeed's BF16_Optimizer (bf16 with an fp32 gradient accumulator at stage 1) is not mapped; "
                    "use ZeRO stage 1 or 2 with bf16 and no grad_accum_dtype, whose fp32 partitions Lamb maps")
        if config.global_clipnorm is not None and not getattr(self.owner(), "compute_grad_norm", True):
            return "global_clipnorm needs DeepSpeed's gradient norm: drop zero_optimization.compute_grad_norm=false"
        if config.gradient_accumulation_steps:
            return ("DeepSpeed accumulates gradients itself: set gradient_accumulation_steps in the DeepSpeed "
                    "config, not on Lamb")
        if config.skip_nonfinite:
            return "DeepSpeed's loss scaler already skips steps with overflowing gradients: drop skip_nonfinite"
        if sliced:
            return "DeepSpeed ZeRO flattens parameters, so per-slice trust ratios cannot find their slices"
        return None

    def clock_ticks(self) -> bool:
        """One engine step is one ``step()`` per group (ZeRO-1/2) or sub-group (ZeRO-3): tick after the last."""
        self._calls += 1
        if self._calls < len(self._rows):
            return False
        self._calls = 0
        return True

    def global_grad_norm(self) -> Tensor | None:
        """The norm of the gradients Lamb's calls see: DeepSpeed's norm of the step's gradients (taken before its
        own clipping), times the factor its ``gradient_clipping`` applied (``c / (norm + 1e-6)`` where that is
        below 1, as ``torch.nn.utils.clip_grad_norm_`` forms it)."""
        norm = getattr(self.owner(), "_global_grad_norm", None)
        if norm is None:
            return None
        norm = torch.as_tensor(norm, dtype=torch.float64).reshape(()).cpu()
        clip = float(getattr(self.owner(), "clip_grad", 0.0) or 0.0)
        return norm * torch.clamp(clip / (norm + 1e-6), max=1.0) if clip > 0 else norm

    def finalize(self, write: Callable[[], None]) -> None:
        raise ValueError(
            "finalize_variable_values under DeepSpeed ZeRO would write Lamb's fp32 partitions only: DeepSpeed "
            "copies them to the model inside its own step. Copy the averages (optimizer.state[p]['average'] of "
            "each partition) with deepspeed.utils.safe_set_full_fp32_param before the last engine.step()."
        )

    def forget(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        """The state made for the parameters DeepSpeed replaced by its partitions (``state_dict()`` would fail)."""
        for p in params:
            dict.pop(state, p, None)
