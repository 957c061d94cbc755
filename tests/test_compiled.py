"""The ``compiled`` backend (two phases under torch.compile, inductor's C++ here) against the reference.

Its own matrix rather than the ``implementation`` fixture: every new bucket shape or feature set compiles
(seconds). Keras parity covers it too (tests/test_keras_parity.py loops over every available backend).
"""

from __future__ import annotations

import os
import sys

import impls
import pytest
import torch

from torch_lamb import Lamb

sys.path.insert(0, os.path.dirname(__file__))
from test_cpu_kernel import PIPELINE_CONFIGS, _close, _run_optimizer


@pytest.fixture(autouse=True)
def _needs_compiler() -> None:
    impls.skip_unless("compiled")


@pytest.mark.parametrize("config", sorted(PIPELINE_CONFIGS))
def test_every_feature_matches_the_reference(config) -> None:
    """Parameters, every state tensor, iterations: rtol 1e-6 (the C kernel's bar), with gradients that come
    and go (a bucket without one), accumulation, clipping, EMA with overwrite, bounds, both decay modes."""
    got, opt = _run_optimizer("compiled", PIPELINE_CONFIGS[config])
    want, ref = _run_optimizer("reference", PIPELINE_CONFIGS[config])
    assert opt.iterations == ref.iterations
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    assert {b.backend.name for b in opt._layouts.layout.buckets} == {"compiled"}


def _train(impl: str, dtype: torch.dtype, steps: int = 5, **cfg) -> tuple[list[torch.Tensor], Lamb]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((33, 17), (9,), (4, 8, 8))]
    opt = Lamb([("a", ps[0]), ("b", ps[1]), ("bank", ps[2])], learning_rate=0.01, implementation=impl, **cfg)
    opt.set_trust_ratio_slices(var_names=["bank"], dim=1, sizes=[3, 5])
    opt.track_trust_ratios(True)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps] + [t for p in ps for t in opt.state[p].values()], opt


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_slices_and_master_weights_match_foreach(dtype, master) -> None:
    if master and dtype == torch.float64:
        pytest.skip("master weights are for float16/bfloat16")
    cfg = {"weight_decay": 0.1, "use_ema": True, "master_weights": master, "gradient_accumulation_steps": 2}
    got, opt = _train("compiled", dtype, **cfg)
    want, ref = _train("foreach", dtype, **cfg)
    for x, y in zip(got, want, strict=True):
        if x.dtype in (torch.bfloat16, torch.float16):  # one step of the dtype: the float32 math rounds once
            torch.testing.assert_close(x.float(), y.float(), rtol=torch.finfo(x.dtype).eps, atol=1e-3)
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    ratios, expected = opt.last_trust_ratios(), ref.last_trust_ratios()
    assert sorted(ratios) == sorted(expected) == ["a", "b", "bank[0]", "bank[1]"]
    for name in ratios:
        torch.testing.assert_close(ratios[name].ratio.float(), expected[name].ratio.float(), rtol=1e-5, atol=0)


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


def test_capturable_skip_nonfinite_decides_on_the_device() -> None:
    """Device-tensor scalars (the guard's masked ones) go through the same graphs: a NaN call changes nothing."""
    results = []
    for impl in ("compiled", "foreach"):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(50, generator=g))
        opt = Lamb([p], learning_rate=0.01, use_ema=True, skip_nonfinite=True, capturable=True, implementation=impl)
        for call in range(5):
            p.grad = torch.randn(p.shape, generator=g)
            if call == 2:
                p.grad[3] = float("nan")
            opt.step()
        assert int(opt.skipped_steps) == 1 and opt.iterations == 4
        results.append((p.detach().clone(), opt.state[p]["average"].clone()))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_fsdp2_with_the_compiled_backend_matches_single_process(tmp_path) -> None:
    """2 gloo ranks: the reduction runs eagerly between the compiled phases; the same collectives as ever."""
    import _slice_dist_worker as w
    from test_slices_distributed import spawn

    spawn(w.fsdp_worker, 2, str(tmp_path / "ok"), "compiled", True)


def test_a_compile_that_fails_changes_nothing(monkeypatch) -> None:
    """Every graph of an update compiles (on scratch zeros) before any bucket is written: an interrupt during
    the seconds-long first compile leaves the moments, accumulators and weights as they were."""
    from torch_lamb.backends import compiled

    ps = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(9).bfloat16())]
    opt = Lamb(ps, learning_rate=0.01, implementation="compiled", gradient_accumulation_steps=2)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # a micro-step: accumulates
    before = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    real = compiled._compiled

    def interrupted(fn, features, signature):
        if fn.__name__ == "phase2":
            raise KeyboardInterrupt
        return real(fn, features, signature)

    monkeypatch.setattr(compiled, "_compiled", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    after = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and opt.iterations == 0
    monkeypatch.setattr(compiled, "_compiled", real)
    opt.step()  # the retry applies the window once
    assert opt.iterations == 1
    assert torch.equal(opt.state[ps[0]]["gradient_accumulator"], torch.zeros(7, 3))


def test_under_auto_a_failed_compile_falls_back_to_foreach(monkeypatch) -> None:
    """"auto" (which takes "compiled" for CUDA buckets) never asked for a compiler: where the first-use compile
    fails, the bucket takes foreach, with one warning, and the step is foreach's."""
    from torch_lamb import backends
    from torch_lamb.backends import compiled

    attempts = []

    def broken(fn, features, signature):
        attempts.append(fn.__name__)
        raise RuntimeError("no working compiler")

    monkeypatch.setattr(backends, "AUTO_ORDER", ("compiled", "foreach"))  # as CUDA_AUTO_ORDER is on a GPU
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_failed", set())
    monkeypatch.setattr(compiled, "_compiled", broken)
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
        assert {b.backend.name for b in opt._layouts.layout.buckets} == {"foreach"}
        if impl == "auto":  # a rebuilt layout does not try the compile again
            opt.load_state_dict(opt.state_dict())
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            assert attempts == ["phase1"] and {b.backend.name for b in opt._layouts.layout.buckets} == {"foreach"}
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
    real = compiled._compiled
    seen = []

    def spy(fn, features, signature):
        seen.append(fn.__name__)
        if fn.__name__ == "grad_squares":
            raise KeyboardInterrupt
        return real(fn, features, signature)

    monkeypatch.setattr(compiled, "_compiled", spy)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert seen == ["phase1", "phase2", "grad_squares"]  # compiled in ready(), before clip_factors measured
    assert torch.equal(opt.state[p]["momentum"], torch.zeros(6, 5)) and opt.iterations == 0
