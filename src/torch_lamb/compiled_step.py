"""``torch.compile(optimizer.step)``, also with ``fullgraph=True``: the step is one opaque op in the graph.

Dynamo drops Python attribute stores made in a traced frame (a traced ``step()`` would never advance
``iterations``, a schedule or the accumulation window), and the step is host logic anyway: the plan,
the cached layout, pointer checks, the C kernel. So under ``torch.compile`` :meth:`Lamb.step` records a
call to the custom op ``torch_lamb::step``. The op declares that it mutates the parameters it is given
(what the step writes that a graph can read), has no fake work, and at run time looks the optimizer up
by its key and runs its eager step. So the graph never breaks, a new learning rate is never traced into
it (no recompile), and the result is the eager one, bit for bit.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .optimizer import Lamb

__all__ = ["register", "run_in_graph"]

_OPTIMIZERS: dict[int, weakref.ref[Lamb]] = {}
_KEYS = itertools.count(1)


def register(opt: Lamb) -> int:
    """A key under which the op finds ``opt`` (made eagerly: a registration inside a traced frame would be lost)."""
    key = next(_KEYS)
    _OPTIMIZERS[key] = weakref.ref(opt, lambda _ref, key=key: _OPTIMIZERS.pop(key, None))
    return key


@torch.library.custom_op("torch_lamb::step", mutates_args=("params",))
def _step_op(params: list[Tensor], key: int) -> None:
    opt = _OPTIMIZERS[key]()
    if opt is None:  # pragma: no cover - a graph that outlived its optimizer
        raise RuntimeError("torch_lamb: the optimizer of this compiled step no longer exists.")
    opt._step(None)


@_step_op.register_fake
def _(params: list[Tensor], key: int) -> None:
    return None


def run_in_graph(opt: Lamb, params: list[Tensor]) -> None:
    """Inside a traced frame: record the optimizer's step as one op of the graph."""
    _step_op(params, opt._compile_key)
