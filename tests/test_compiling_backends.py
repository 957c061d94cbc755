"""The two compiling backends (``compiled``: inductor's C++ here; ``triton``: hand-written Triton kernels, run
here under Triton's interpreter) against the reference, and what they share: device-tensor scalars, a
first-use compile that fails without changing anything, the DTensor reduction between their passes.

Their own matrix rather than the ``implementation`` fixture: every new bucket shape or feature set compiles
(seconds), and the interpreter is slow. Keras parity covers them too (tests/test_keras_parity.py loops over
every available backend); what is specific to one of them is in tests/test_compiled.py and
tests/test_triton.py.
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


def _fail_compiled(monkeypatch) -> Exception:
    """Make the compiled backend's last graph fail to compile (an interrupt of the seconds-long compile)."""
    from torch_lamb.backends import compiled

    real = compiled.compiled_graph

    def interrupted(fn, features, signature):
        if fn.__name__ == "phase2":
            raise KeyboardInterrupt
        return real(fn, features, signature)

    monkeypatch.setattr(compiled, "compiled_graph", interrupted)
    return KeyboardInterrupt()


def _fail_triton(monkeypatch) -> Exception:
    """Make the Triton backend's last kernel fail at its launch (where Triton compiles it)."""
    from torch_lamb.backends import triton as backend

    real = backend.launch

    def failing(kernel, handle, grid, *args, **constants):
        if kernel is backend.kernels().lamb_pass2:
            raise RuntimeError("compilation failed")
        return real(kernel, handle, grid, *args, **constants)

    monkeypatch.setattr(backend, "launch", failing)
    return RuntimeError("compilation failed")


FAILURES = {"compiled": _fail_compiled, "triton": _fail_triton}
# The trust-ratio slices each takes: a later dim is strided, which the Triton kernels refuse.
SLICES = {"compiled": {"dim": 1, "sizes": [3, 5]}, "triton": {"dim": 0, "sizes": [1, 3]}}


@pytest.fixture(params=list(FAILURES))
def compiling(request: pytest.FixtureRequest) -> str:
    impls.skip_unless(request.param)
    return request.param


def _buckets(opt: Lamb) -> set[str]:
    return set(opt.backends().values())


@pytest.mark.parametrize("config", sorted(PIPELINE_CONFIGS))
def test_every_feature_matches_the_reference(compiling, config) -> None:
    """Parameters, every state tensor, iterations: rtol 1e-6 (the C kernel's bar), over tensors of 0 to 40,000
    elements (1 to 20 of the interpreter's chunks), with a gradient that comes and goes (a bucket without
    one), accumulation, the clip modes, EMA with overwrite, bounds, both decay modes."""
    got, opt = _run_optimizer(compiling, PIPELINE_CONFIGS[config])
    want, ref = _run_optimizer("reference", PIPELINE_CONFIGS[config])
    assert opt.iterations == ref.iterations
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    assert _buckets(opt) == {compiling}


def _train(impl: str, dtype: torch.dtype, slices: dict, steps: int = 5, **cfg) -> tuple[list[torch.Tensor], Lamb]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((33, 70), (9,), (4, 8, 8))]
    opt = Lamb([("a", ps[0]), ("b", ps[1]), ("bank", ps[2])], learning_rate=0.01, implementation=impl, **cfg)
    opt.set_trust_ratio_slices(var_names=["bank"], **slices)
    opt.track_trust_ratios(True)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps] + [t for p in ps for t in opt.state[p].values()], opt


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_slices_and_master_weights_match_foreach(compiling, dtype, master) -> None:
    """Low precision with float32 state (on triton, bfloat16 rounded to nearest even by the kernel itself),
    master weights and their copies, the EMA of rounded weights, slices as entries, float64 throughout."""
    if master and dtype == torch.float64:
        pytest.skip("master weights are for float16/bfloat16")
    cfg = {"weight_decay": 0.1, "use_ema": True, "master_weights": master, "gradient_accumulation_steps": 2}
    got, opt = _train(compiling, dtype, SLICES[compiling], **cfg)
    want, ref = _train("foreach", dtype, SLICES[compiling], **cfg)
    assert _buckets(opt) == {compiling}
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype
        if x.dtype in (torch.bfloat16, torch.float16):  # one step of the dtype: the float32 math rounds once
            torch.testing.assert_close(x.float(), y.float(), rtol=torch.finfo(x.dtype).eps, atol=1e-3)
        else:  # float64 too: the scalars arrive in float32, but the update's bits are float64's
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8 if x.dtype == torch.float64 else 1e-7)
    ratios, expected = opt.last_trust_ratios(), ref.last_trust_ratios()
    assert sorted(ratios) == sorted(expected) == ["a", "b", "bank[0]", "bank[1]"]
    for name in ratios:
        torch.testing.assert_close(ratios[name].ratio.float(), expected[name].ratio.float(), rtol=1e-5, atol=0)


def test_capturable_skip_nonfinite_decides_on_the_device(compiling) -> None:
    """Device-tensor scalars (the guard's masked ones) go through the same graphs or kernels as host ones:
    a NaN call changes nothing, and the run equals foreach's."""
    results = []
    for impl in (compiling, "foreach"):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1500, generator=g))
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


def test_a_compile_that_fails_changes_nothing(compiling, monkeypatch) -> None:
    """Every graph or kernel of an update compiles (on scratch) before any bucket is written: a compile that
    fails, or is interrupted, in the last pass leaves the moments, accumulators and weights as they were, and
    the retry applies the accumulation window once."""
    ps = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(9).bfloat16())]
    opt = Lamb(ps, learning_rate=0.01, implementation=compiling, gradient_accumulation_steps=2)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # a micro-step: accumulates
    before = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    with monkeypatch.context() as patch:
        error = FAILURES[compiling](patch)
        with pytest.raises(type(error)):
            opt.step()
    after = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and opt.iterations == 0
    opt.step()
    assert opt.iterations == 1
    assert torch.equal(opt.state[ps[0]]["gradient_accumulator"], torch.zeros(7, 3))


def test_compiled_refuses_a_gradient_of_another_dtype_before_any_bucket_is_written() -> None:
    """torch.compile refuses a parameter whose .grad has another dtype (``grad_dtype=None``); the first bucket
    must not have moved when the second one's graph refuses it."""
    impls.skip_unless("compiled")
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    for p in ps:
        p.grad_dtype = None
    opt = Lamb(ps, learning_rate=0.01, implementation="compiled")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()]
    ps[1].grad = torch.ones(7, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cannot take parameter '0.1': its .grad is torch.float32"):
        opt.step()
    after = [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and opt.iterations == 1


def test_fsdp2_matches_single_process(compiling, tmp_path) -> None:
    """2 gloo ranks: the reduction runs eagerly between the compiled passes, with every backend's collectives."""
    import _slice_dist_worker as w
    from test_slices_distributed import spawn

    spawn(w.fsdp_worker, 2, str(tmp_path / "ok"), compiling, True)
