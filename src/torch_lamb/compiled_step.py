"""``torch.compile(optimizer.step)``, also with ``fullgraph=True``: the step is one opaque op in the graph.

Dynamo drops Python attribute stores made in a traced frame (a traced ``step()`` would never advance
``iterations``, a schedule or the accumulation window), and the step is host logic anyway: the plan,
the cached layout, pointer checks, the C kernel. So under ``torch.compile`` :meth:`Lamb.step` records a
call to the custom op ``torch_lamb::step``. The op declares that it mutates the parameters it is given
(what the step writes that a graph can read) and reads the gradients it is given (so gradient edits made
earlier in the same graph, such as ``clip_grad_norm_``, reach it), has no fake work, and at run time looks
the optimizer up by its key and runs its eager step on those gradients. So the graph never breaks, a new
learning rate is never traced into it (no recompile), and the result is the eager one, bit for bit.

The graph's runtime may bump the version counter of the parameters the op declares it writes; with
master weights, a parameter's version change otherwise means "the user wrote it". The op therefore
takes such a bump as no write wherever the parameter still holds its master's rounding. It is tagged
``cudagraph_unsafe``, so a CUDA-graph mode never records one step's kernels and replays them. DTensor
parameters keep the plain graph break (the op has no sharding rule).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "run_in_graph"]

StepFn = Callable[[list[Tensor], list["Tensor | None"]], Any]
"""The eager step a graph's op runs: ``fn(params as the graph hands them, their gradients)``."""

_STEPS: dict[int, weakref.WeakMethod] = {}
_KEYS = itertools.count(1)


def register(step: StepFn) -> int:
    """A key under which the op finds the bound method ``step`` (made eagerly: a registration inside a traced
    frame would be lost). Held weakly: a graph never keeps an optimizer alive."""
    for dead in [k for k, ref in _STEPS.items() if ref() is None]:  # optimizers gone since the last one
        del _STEPS[dead]
    key = next(_KEYS)
    _STEPS[key] = weakref.WeakMethod(step)  # type: ignore[arg-type]
    return key


_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("torch_lamb::step", mutates_args=("params",), tags=_TAGS)
def _step_op(params: list[Tensor], grads: list[Tensor | None], key: int) -> None:
    ref = _STEPS.get(key)
    step = ref() if ref is not None else None
    if step is None:  # pragma: no cover - a graph that outlived its optimizer
        raise RuntimeError("torch_lamb: the optimizer of this compiled step no longer exists.")
    step(params, list(grads))


@_step_op.register_fake
def _(params: list[Tensor], grads: list[Tensor | None], key: int) -> None:
    return None


def run_in_graph(key: int, params: list[Tensor]) -> None:
    """Inside a traced frame: record the step registered under ``key`` as one op of the graph."""
    _step_op(params, [p.grad for p in params], key)
