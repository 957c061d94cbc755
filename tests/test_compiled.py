"""What is specific to the ``compiled`` backend (two phases under torch.compile, inductor's C++ here).

Every feature and dtype against the reference is in tests/test_compiling_backends.py (shared with
"triton"); Keras parity covers it too (tests/test_keras_parity.py loops over every available backend).
"""

from __future__ import annotations

import os
import sys

import impls
import pytest
import torch

from torch_lamb import Lamb

sys.path.insert(0, os.path.dirname(__file__))
from test_cpu_kernel import _close


@pytest.fixture(autouse=True)
def _needs_compiler() -> None:
    impls.skip_unless("compiled")


def test_a_changing_learning_rate_never_recompiles() -> None:
    """The scalars reach the graphs as one device vector: 100 steps of a LambdaLR compile each phase once."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 7, generator=g))
    opt = Lamb([p], learning_rate=0.01, weight_decay=0.01, implementation="compiled")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    graphs = counters["stats"]["unique_graphs"]
    ref = Lamb([q := torch.nn.Parameter(p.detach().clone())], learning_rate=0.01, weight_decay=0.01,
               implementation="reference")
    rsched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1.0 + s))
    ref.load_state_dict(opt.state_dict())
    rsched.load_state_dict(sched.state_dict())
    for _ in range(100):
        sched.step()
        rsched.step()
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert counters["stats"]["unique_graphs"] == graphs  # no graph compiled after the first step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 101)
    _close(p.detach(), q.detach())


def test_under_auto_a_failed_compile_falls_back_to_foreach(monkeypatch, request) -> None:
    """"auto" (which takes "compiled" for CUDA buckets) never asked for a compiler: where the first-use compile
    fails, the bucket takes foreach, with one warning, and the step is foreach's."""
    from torch_lamb import backends
    from torch_lamb.backends import compiled

    attempts = []

    def broken(fn, features, signature):
        attempts.append(fn.__name__)
        raise RuntimeError("no working compiler")

    monkeypatch.setattr(backends, "AUTO_ORDER", ("compiled", "foreach"))  # as CUDA_AUTO_ORDER is on a GPU
    backends.reset_fallbacks()
    request.addfinalizer(backends.reset_fallbacks)  # the process forgets this test's failed compile
    monkeypatch.setattr(compiled, "compiled_graph", broken)
    results = []
    for impl in ("auto", "foreach"):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(30, generator=g))
        opt = Lamb([p], learning_rate=0.01, weight_decay=0.01, implementation=impl)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g)
            if impl == "auto" and opt.iterations == 0:
                with pytest.warns(RuntimeWarning, match="'compiled' failed to compile.*foreach"):
                    opt.step()
            else:
                opt.step()
        assert set(opt.backends().values()) == {"foreach"}
        if impl == "auto":  # a rebuilt layout does not try the compile again
            opt.load_state_dict(opt.state_dict())
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            assert attempts == ["phase1"] and set(opt.backends().values()) == {"foreach"}
        else:
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)
    with pytest.raises(RuntimeError, match="no working compiler"):  # an explicit choice raises, every time
        q = torch.nn.Parameter(torch.randn(4))
        opt = Lamb([q], implementation="compiled")
        q.grad = torch.ones_like(q)
        opt.step()


def test_clipping_norms_compile_before_anything_is_measured(monkeypatch) -> None:
    """With clipnorm the norms' graph compiles in ready() too: an interrupt there changes nothing either."""
    from torch_lamb.backends import compiled

    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = Lamb([p], learning_rate=0.01, clipnorm=0.1, implementation="compiled")
    p.grad = torch.ones_like(p)
    real = compiled.compiled_graph
    seen = []

    def spy(fn, features, signature):
        seen.append(fn.__name__)
        if fn.__name__ == "grad_squares":
            raise KeyboardInterrupt
        return real(fn, features, signature)

    monkeypatch.setattr(compiled, "compiled_graph", spy)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert seen == ["phase1", "phase2", "grad_squares"]  # compiled in ready(), before clip_factors measured
    assert torch.equal(opt.state[p]["momentum"], torch.zeros(6, 5)) and opt.iterations == 0
