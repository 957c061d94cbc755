"""The ``triton`` backend against the reference, on CPU tensors under Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` where there is no CUDA device, so that the same kernels a
GPU compiles run here, program by program, on small shapes (its own matrix rather than the
``implementation`` fixture: the interpreter is slow). Keras parity covers it too (tests/test_keras_parity.py
loops over every available backend). One test compiles the kernels for an H200 (sm_90) without a GPU,
so that what the interpreter accepts is also what the compiler accepts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import impls
import pytest
import torch

from torch_lamb import Lamb

sys.path.insert(0, os.path.dirname(__file__))
from test_cpu_kernel import PIPELINE_CONFIGS, _close, _run_optimizer


@pytest.fixture(autouse=True)
def _needs_triton() -> None:
    impls.skip_unless("triton")


def _buckets(opt: Lamb) -> set[str]:
    return {b.backend.name for b in opt._layouts.layout.buckets}


@pytest.mark.parametrize("config", sorted(PIPELINE_CONFIGS))
def test_every_feature_matches_the_reference(config) -> None:
    """Parameters, every state tensor and iterations at rtol 1e-6 (the C kernel's bar), over tensors of 0 to
    40,000 elements (1 to 20 chunks of the interpreter's 2,048), with a gradient that comes and goes."""
    got, opt = _run_optimizer("triton", PIPELINE_CONFIGS[config])
    want, ref = _run_optimizer("reference", PIPELINE_CONFIGS[config])
    assert opt.iterations == ref.iterations
    for x, y in zip(got, want, strict=True):
        _close(x, y)
    assert _buckets(opt) == {"triton"}


def _train(impl: str, dtype: torch.dtype, steps: int = 5, **cfg) -> tuple[list[torch.Tensor], Lamb]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((33, 70), (9,), (4, 8, 8))]
    opt = Lamb([("a", ps[0]), ("b", ps[1]), ("bank", ps[2])], learning_rate=0.01, implementation=impl, **cfg)
    opt.set_trust_ratio_slices(var_names=["bank"], dim=0, sizes=[1, 3])  # slices along dim 0: contiguous entries
    opt.track_trust_ratios(True)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps] + [t for p in ps for t in opt.state[p].values()], opt


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_slices_and_master_weights_match_foreach(dtype, master) -> None:
    """Low precision with float32 state (bfloat16 rounded to nearest even by the kernel itself), master
    weights and their copies, the EMA of rounded weights, slices as entries, float64 throughout."""
    if master and dtype == torch.float64:
        pytest.skip("master weights are for float16/bfloat16")
    cfg = {"weight_decay": 0.1, "use_ema": True, "master_weights": master, "gradient_accumulation_steps": 2}
    got, opt = _train("triton", dtype, **cfg)
    want, ref = _train("foreach", dtype, **cfg)
    assert _buckets(opt) == {"triton"}
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype
        if x.dtype in (torch.bfloat16, torch.float16):  # one step of the dtype: the float32 math rounds once
            torch.testing.assert_close(x.float(), y.float(), rtol=torch.finfo(x.dtype).eps, atol=1e-3)
        elif x.dtype == torch.float64:  # the scalars reach the kernels in float32, as on "compiled"
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    ratios, expected = opt.last_trust_ratios(), ref.last_trust_ratios()
    assert sorted(ratios) == sorted(expected) == ["a", "b", "bank[0]", "bank[1]"]
    for name in ratios:
        torch.testing.assert_close(ratios[name].ratio.float(), expected[name].ratio.float(), rtol=1e-5, atol=0)


def test_bfloat16_rounds_to_nearest_even() -> None:
    """The update's float32 result becomes bfloat16 as torch rounds it (the interpreter's own cast truncates)."""
    p = torch.nn.Parameter(torch.linspace(-3, 3, 3001).bfloat16())
    q = torch.nn.Parameter(p.detach().clone())
    for param, impl in ((p, "triton"), (q, "reference")):
        opt = Lamb([param], learning_rate=0.3, implementation=impl)
        param.grad = torch.linspace(1, -1, 3001).bfloat16()
        opt.step()
    assert torch.equal(p.detach(), q.detach())


def test_norms_whose_squares_overflow_float32() -> None:
    """Weights of 1e20: their squared sum overflows float32, so the ratio is formed from float64 norms, as on
    the reference (float64 partial sums: no re-sum needed)."""
    results = []
    for impl in ("triton", "reference"):
        p = torch.nn.Parameter(torch.full((3000,), 1e20))
        r = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(0)))
        opt = Lamb([p, r], learning_rate=0.01, implementation=impl)
        opt.track_trust_ratios(True)
        p.grad, r.grad = torch.ones_like(p), torch.ones_like(r)
        opt.step()
        stats = opt.last_trust_ratios()
        results.append((p.detach().clone(), r.detach().clone(), [s.weight_norm.double() for s in stats.values()]))
    (p1, r1, n1), (p2, r2, n2) = results
    assert torch.isfinite(p1).all() and torch.isfinite(torch.stack(n1)).all()
    _close(p1, p2)
    _close(r1, r2)
    torch.testing.assert_close(torch.stack(n1), torch.stack(n2), rtol=1e-6, atol=0)


def test_a_strided_slice_is_refused_with_the_reason() -> None:
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = Lamb([("w", p)], implementation="triton")
    opt.set_trust_ratio_slices(var_names=["w"], dim=1, sizes=[2, 4])
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"'w\[0\]'.*contiguous tensors"):
        opt.step()
    assert opt.iterations == 0 and torch.equal(opt.state[p]["momentum"], torch.zeros(4, 6))


def test_auto_never_takes_triton_for_cpu_tensors() -> None:
    p = torch.nn.Parameter(torch.randn(10))
    opt = Lamb([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert "triton" not in _buckets(opt)


def test_capturable_skip_nonfinite_decides_on_the_device() -> None:
    """Device-tensor scalars (the guard's masked ones) go through the same kernels: a NaN call changes nothing."""
    results = []
    for impl in ("triton", "foreach"):
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


def test_a_kernel_that_fails_to_compile_changes_nothing(monkeypatch) -> None:
    """Every kernel of an update runs once on a scratch bucket before any bucket is written: a compile error
    (or an interrupt) in the last pass leaves the moments, accumulators and weights as they were."""
    from torch_lamb.backends import triton as backend

    ps = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(9).bfloat16())]
    opt = Lamb(ps, learning_rate=0.01, implementation="triton", gradient_accumulation_steps=2)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # a micro-step: accumulates
    before = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    real = backend.launch

    def failing(kernel, handle, grid, *args, **constants):
        if kernel is backend.kernels().lamb_pass2:
            raise RuntimeError("compilation failed")
        return real(kernel, handle, grid, *args, **constants)

    monkeypatch.setattr(backend, "launch", failing)
    with pytest.raises(RuntimeError, match="compilation failed"):
        opt.step()
    after = [t.clone() for p in ps for t in opt.state[p].values()] + [p.detach().clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and opt.iterations == 0
    monkeypatch.setattr(backend, "launch", real)
    opt.step()  # the retry applies the window once
    assert opt.iterations == 1
    assert torch.equal(opt.state[ps[0]]["gradient_accumulator"], torch.zeros(7, 3))


def test_fsdp2_with_the_triton_backend_matches_single_process(tmp_path) -> None:
    """2 gloo ranks: the shards' sums are reduced between the passes, with the collectives of every backend."""
    import _slice_dist_worker as w
    from test_slices_distributed import spawn

    spawn(w.fsdp_worker, 2, str(tmp_path / "ok"), "triton", True)


def test_the_kernels_compile_for_an_h200() -> None:
    """Triton's compiler (its ptxas included) lowers every kernel to a cubin for sm_90 without a GPU, in every
    dtype and clip mode, with contraction off, IEEE division and square root, and 128-bit loads and stores
    where the bucket is aligned; in a process of its own, without the interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "_triton_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["entry_sums"] + ["lamb_pass1", "lamb_pass2"] * 7
