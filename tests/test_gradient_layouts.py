"""Gradients of any stride and dtype give the bits of their contiguous copies, on every backend.

A stride-0 gradient (``torch.autograd.grad(p.sum(), p)``) once made the CPU kernel read far past its
buffer (a segfault on a large parameter, garbage on a small one) and a transposed one was applied in
the wrong element order, so each backend runs in a subprocess of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import impls
import pytest

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch_lamb import Lamb

    torch.manual_seed(0)
    implementation = sys.argv[1]
    big = 1 << 20  # far past any buffer a misread stride-0 gradient could stay inside

    def odd_gradients(params):
        w_big, w, b, conv = params
        return [
            torch.tensor(0.25).expand(big),                      # stride 0, as autograd.grad(p.sum(), p) gives
            torch.randn(w.shape[1], w.shape[0]).t(),             # transposed
            torch.randn(b.shape[0] * 2)[::2],                    # every other element
            torch.randn(conv.shape).to(memory_format=torch.channels_last),
        ]

    def step_twice(params, gradients, cfg):
        opt = Lamb(params, learning_rate=0.05, implementation=implementation, **cfg)
        for grads in gradients:
            for p, g in zip(params, grads):
                if g.dtype != p.dtype:
                    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in params]

    configs = [{}, {"clipnorm": 0.5, "weight_decay": 0.1}, {"global_clipnorm": 0.3, "gradient_accumulation_steps": 2},
               {"skip_nonfinite": True, "loss_scale_factor": 4.0, "use_ema": True}]
    dtypes = [None, torch.float64, torch.bfloat16]  # the gradient's dtype (None: the parameter's)
    failures = []
    for cfg in configs:
        for grad_dtype in dtypes:
            init = [torch.randn(big), torch.randn(6, 5), torch.randn(5), torch.randn(2, 3, 4, 4)]
            grads = [odd_gradients(init) for _ in range(2)]
            if grad_dtype is not None:
                grads = [[g.to(grad_dtype) for g in gs] for gs in grads]
            got = step_twice([p.clone() for p in init], grads, cfg)
            want = step_twice([p.clone() for p in init], [[g.contiguous() for g in gs] for gs in grads], cfg)
            for i, (a, b) in enumerate(zip(got, want)):
                if not torch.equal(a, b):
                    failures.append(f"{cfg} grad dtype {grad_dtype}: parameter {i} differs by "
                                    f"{(a - b).abs().max().item():.3g}")
    print("\\n".join(failures) if failures else "ok")
    """
)


@pytest.mark.parametrize("implementation", impls.params())
def test_any_gradient_layout_gives_the_contiguous_bits(implementation: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the kernel's threaded path reads the same pointers
    done = subprocess.run([sys.executable, "-c", _SCRIPT, implementation], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, f"the subprocess died ({done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.strip() == "ok", done.stdout
