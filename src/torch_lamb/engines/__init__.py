"""Sharding engines, detected from what they leave behind, as :class:`~torch_lamb.shards.Engine` s.

* **FSDP1** (``FullyShardedDataParallel``): its tensors carry ``_fsdp_flattened``; a ``FlatParameter``
  describes its pieces (``_shard_param_infos``, ``_fqns``), and the ``FlatParamHandle`` that owns it knows
  the process group. Detected at the first step that sees such a tensor (:mod:`.fsdp1`).
* **torch's** ``ZeroRedundancyOptimizer`` builds the optimizer itself; detected from its constructor's frame
  (:mod:`.zero`).
* **DeepSpeed ZeRO 1-3** swap the groups' parameters for flat fp32 partitions and call ``step()`` from their
  own ``_optimizer_step``; detected from that frame when a group holds a tensor the optimizer was never
  given (:mod:`.deepspeed`).

DTensor parameters (FSDP2, tensor parallel) need no engine: their placements say everything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..config import LambConfig
from ..rules import GroupRules
from ..shards import Engine

__all__ = ["constructing_engine", "detect", "refuse"]

_DEPTH = 16  # frames looked through, from the optimizer's own


def _caller_self(class_names: tuple[str, ...], module_prefix: str) -> Any:
    """The ``self`` of the nearest calling frame whose class is one of ``class_names`` from a module under
    ``module_prefix`` (None: none within :data:`_DEPTH` frames)."""
    frame = sys._getframe(2)
    for _ in range(_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        kind = type(candidate)
        if kind.__name__ in class_names and kind.__module__.startswith(module_prefix):
            return candidate
        frame = frame.f_back
    return None


def constructing_engine() -> Engine | None:
    """The engine building this optimizer: torch's ``ZeroRedundancyOptimizer`` calls ``optimizer_class(...)``
    from its ``_init_local_optimizer`` (and from ``add_param_group``)."""
    zero = _caller_self(("ZeroRedundancyOptimizer",), "torch.distributed.optim")
    if zero is None:
        return None
    from .zero import ZeroEngine

    return ZeroEngine(zero)


def detect(params: Sequence[Tensor], given: set[int], state: dict[Any, Any]) -> Engine | None:
    """The engine behind ``params`` (``given``: the ids of the tensors the optimizer was given), or None; an
    engine that replaced them has their state dropped (DeepSpeed swaps them for flat partitions)."""
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        from .fsdp1 import Fsdp1Engine

        return Fsdp1Engine.find(params)
    if any(id(p) not in given for p in params):
        caller = _caller_self(("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer"),
                              "deepspeed")
        if caller is not None:
            from .deepspeed import DeepSpeedEngine

            engine = DeepSpeedEngine(caller)
            engine.forget(state, [p for p in state if id(p) in given])
            return engine
    return None


def refuse(engine: Engine, config: LambConfig, rules: Sequence[GroupRules]) -> None:
    """Raise, naming the engine and what to do instead, where ``engine`` cannot run this configuration right."""
    reason = engine.refuses(config, any(s is not None for r in rules for s in r.slices))
    if reason is not None:
        raise ValueError(f"Lamb under {engine.name}: {reason}.")
