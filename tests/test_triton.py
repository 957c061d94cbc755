"""What is specific to the ``triton`` backend, on CPU tensors under Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` where there is no GPU device, so that the same kernels a GPU
compiles run here, program by program, on small shapes. Every feature and dtype against the reference is in
tests/test_compiling_backends.py (shared with "compiled"). One test here compiles the kernels for an H200
(sm_90) without a GPU, so that what the interpreter accepts is also what the compiler accepts.
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
from test_cpu_kernel import _close


@pytest.fixture(autouse=True)
def _needs_triton() -> None:
    impls.skip_unless("triton")


def _buckets(opt: Lamb) -> set[str]:
    return set(opt.backends().values())


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
