"""Run Keras's Lamb and torch_lamb's Lamb side by side on the same gradients."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")

from torch_lamb import Lamb

Grads = Sequence[np.ndarray | None]


@dataclass
class Trajectory:
    params: list[list[np.ndarray]] = field(default_factory=list)  # per call, per variable
    averages: list[list[np.ndarray]] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)


def make_problem(shapes: Sequence[tuple[int, ...]], steps: int, seed: int = 0, none_every: int = 0):
    """Initial values and a gradient sequence; every `none_every`-th call drops variable 1's grad."""
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = []
    for t in range(steps):
        row: list[np.ndarray | None] = [rng.normal(size=s).astype(np.float32) for s in shapes]
        if none_every and t % none_every == none_every - 1:
            row[1 % len(row)] = None
        grads.append(row)
    return init, grads


def run_keras(
    names: Sequence[str],
    init: Sequence[np.ndarray],
    grads: Sequence[Grads],
    exclude_names: Sequence[str] | None = None,
    exclude_index: Sequence[int] | None = None,
    **kwargs: Any,
) -> Trajectory:
    import keras

    variables = [keras.Variable(v, name=n, dtype="float32") for n, v in zip(names, init)]
    opt = keras.optimizers.Lamb(**kwargs)
    if exclude_names or exclude_index:
        opt.exclude_from_weight_decay(
            var_list=[variables[i] for i in exclude_index or ()], var_names=exclude_names
        )
    out = Trajectory()
    for row in grads:
        opt.apply([None if g is None else torch.tensor(g) for g in row], variables)
        out.params.append([keras.ops.convert_to_numpy(v).copy() for v in variables])
        if kwargs.get("use_ema"):  # Keras's public `variables` holds each average as "<opt>/<var>_average"
            by_path = {v.path: v for v in opt.variables}
            out.averages.append([keras.ops.convert_to_numpy(by_path[f"{opt.name}/{v.name}_average"]).copy()
                                 for v in variables])
        out.iterations.append(int(keras.ops.convert_to_numpy(opt.iterations)))
    return out


def run_torch(
    names: Sequence[str],
    init: Sequence[np.ndarray],
    grads: Sequence[Grads],
    exclude_names: Sequence[str] | None = None,
    exclude_index: Sequence[int] | None = None,
    **kwargs: Any,
) -> Trajectory:
    params = [torch.nn.Parameter(torch.tensor(v)) for v in init]
    opt = Lamb(list(zip(names, params)), **kwargs)
    if exclude_names or exclude_index:
        excluded = [params[i] for i in exclude_index or ()]
        opt.exclude_from_weight_decay(var_list=excluded, var_names=exclude_names)
    out = Trajectory()
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else torch.tensor(g)
        opt.step()
        out.params.append([p.detach().numpy().copy() for p in params])
        if kwargs.get("use_ema"):
            out.averages.append([opt.state[p]["average"].numpy().copy() for p in params])
        out.iterations.append(opt.iterations)
    return out


def assert_trajectories_close(a: Trajectory, b: Trajectory, rtol: float = 2e-5, atol: float = 1e-7) -> None:
    assert a.iterations == b.iterations
    for step, (pa, pb) in enumerate(zip(a.params, b.params)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"param {i} after call {step + 1}")
    assert len(a.averages) == len(b.averages)
    for step, (pa, pb) in enumerate(zip(a.averages, b.averages)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"EMA {i} after call {step + 1}")
