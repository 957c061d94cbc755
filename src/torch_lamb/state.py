"""The optimizer's per-parameter state: the slots it keeps and the master-weight rule.

* :func:`ensure_slots` builds every parameter's slots (Keras builds them all on the first apply): the
  moments, the average (``use_ema``) and the accumulator (``gradient_accumulation_steps``), zeros in the
  state dtype (float32 for float16/bfloat16 parameters), and float32 masters with ``master_weights``.
* :class:`MasterWeights` keeps the rule **the parameter is the truth whenever it changed since the optimizer
  last wrote it** (its storage, shape, dtype or in-place version differ from the mark taken after each write).
  Then its master is re-made from it, or dropped when the parameter is no longer float16/bfloat16.
* :class:`TrackedState` is ``optimizer.state``, counting the reads made through it (the layout re-reads the
  state slots' pointers only after one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import local
from .functional import LOW_PRECISION

__all__ = ["ACCUMULATOR", "AVERAGE", "MASTER", "MOMENTUM", "SLOT_KEYS", "VELOCITY", "MasterWeights", "TrackedState",
           "copy_averages", "ensure_slots", "state_dtype", "weight_of"]

MOMENTUM, VELOCITY, AVERAGE, ACCUMULATOR = "momentum", "velocity", "average", "gradient_accumulator"
MASTER = "master_weight"
SLOT_KEYS = (MOMENTUM, VELOCITY, AVERAGE, ACCUMULATOR, MASTER)


def state_dtype(param: Tensor) -> torch.dtype:
    """Moments, averages and accumulators are float32 for float16/bfloat16 parameters."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def weight_of(state: dict[Any, dict[str, Tensor]], p: Tensor) -> Tensor:
    """The tensor the update writes: the float32 master of ``p`` if it has one, else ``p`` (local)."""
    own = dict.get(state, p)
    return local(own[MASTER]) if own and MASTER in own else local(p)


def ensure_slots(params: Iterable[Tensor], state: dict[Any, dict[str, Tensor]], keys: Sequence[str], *,
                 started: bool, masters: bool) -> None:
    """Create the missing ``keys`` slots of every parameter (a slot of an option switched on later too); an
    average made after training ``started`` starts at the weights (from zeros, an EMA with its steady momentum
    would drag the weights' average toward 0). ``masters``: float32 masters of float16/bfloat16 parameters."""
    for p in params:
        own = state[p]
        for key in keys:
            if key not in own:
                if key == AVERAGE and started:
                    own[key] = weight_of(state, p).detach().to(state_dtype(p), copy=True)
                else:
                    own[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        if masters and p.dtype in LOW_PRECISION and MASTER not in own:
            own[MASTER] = p.detach().to(torch.float32, copy=True)


def copy_averages(state: dict[Any, dict[str, Tensor]], pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``finalize_variable_values``' write: each average into its weight (the master where there is one), then
    the masters into their low-precision parameters."""
    torch._foreach_copy_([weight_of(state, p) for p, _ in pairs], [local(a) for _, a in pairs])
    masters = [(local(p), local(state[p][MASTER])) for p, _ in pairs if MASTER in dict.get(state, p, ())]
    if masters:
        torch._foreach_copy_([p for p, _ in masters], [m for _, m in masters])


def _signature(p: Tensor) -> tuple[int, int, torch.Size, torch.dtype]:
    return (p.data_ptr(), p._version, p.shape, p.dtype)


class MasterWeights:
    """The marks of the parameters that have masters, as the optimizer last wrote them."""

    def __init__(self) -> None:
        self._marks: dict[int, tuple[int, int, torch.Size, torch.dtype]] = {}  # id(p) -> p as last written

    def mark(self, state: dict[Any, dict[str, Tensor]], params: Sequence[Tensor]) -> None:
        """Remember each parameter with a master as the optimizer last wrote it."""
        self._marks = {id(p): _signature(local(p)) for p in params if MASTER in dict.get(state, p, ())}

    def stale(self, params: Sequence[Tensor]) -> bool:
        """Whether a parameter with a master changed since it was marked."""
        marks = self._marks
        return bool(marks) and any(_signature(local(p)) != marks.get(id(p)) for p in params if id(p) in marks)

    def refresh(self, state: dict[Any, dict[str, Tensor]], params: Sequence[Tensor]) -> None:
        """Apply the rule: a parameter changed since the last write is the truth."""
        marks = self._marks
        for p in params:
            own = dict.get(state, p)
            if not own or MASTER not in own or id(p) not in marks:
                continue
            lp = local(p)
            if _signature(lp) == marks[id(p)]:
                continue
            if p.dtype not in LOW_PRECISION:
                del own[MASTER]  # a float32 (or float64) parameter is its own master
            elif local(own[MASTER]).shape == lp.shape:
                local(own[MASTER]).copy_(lp)
            else:
                own[MASTER] = p.detach().to(torch.float32, copy=True)
            marks[id(p)] = _signature(lp)

    def absorb_version_bumps(self, state: dict[Any, dict[str, Tensor]], params: Sequence[Tensor]) -> None:
        """A compiled graph's runtime bumps the version of the parameters the step op declares it writes: for
        a parameter with a master whose only change is its version, keep the master wherever the parameter
        still holds the master's rounding (elsewhere it was written: it is the truth there)."""
        marks = self._marks
        if not marks:
            return
        for p in params:
            mark = marks.get(id(p))
            if mark is None:
                continue
            lp = local(p)
            sig = _signature(lp)
            if sig == mark or (sig[0], sig[2], sig[3]) != (mark[0], mark[2], mark[3]):
                continue
            master = local(dict.__getitem__(state, p)[MASTER])
            torch.where(lp == master.to(lp.dtype), master, lp.to(master.dtype), out=master)
            marks[id(p)] = sig


class TrackedState(defaultdict):
    """``optimizer.state``, counting the reads made through it.

    Every way to reach a state tensor from outside (``state[p]``, ``get``, ``values``, ``items``,
    iteration, copies) bumps :attr:`reads`; the layout re-reads the pointers of every state slot only
    after such a read, since only then can user code have given a slot new storage
    (``state[p]["momentum"].data = ...``). The optimizer's own per-step code reads the dict directly.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads = 0

    def _read(self) -> None:
        self.reads += 1

    def __getitem__(self, key: Any) -> Any:
        self._read()
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._read()  # a slot dict replaced from outside (ZeroRedundancyOptimizer's load_state_dict does)
        super().__setitem__(key, value)

    def get(self, key: Any, default: Any = None) -> Any:
        self._read()
        return super().get(key, default)

    def values(self) -> Any:
        self._read()
        return super().values()

    def items(self) -> Any:
        self._read()
        return super().items()

    def __iter__(self) -> Any:
        self._read()
        return super().__iter__()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._read()
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self._read()
        return super().pop(*args)

    def copy(self) -> Any:
        self._read()
        return super().copy()

    def __reduce__(self) -> Any:
        return (type(self), (self.default_factory,), None, None, iter(dict.items(self)))
