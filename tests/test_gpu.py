"""GPU checks (skipped without CUDA; benchmarks/gpu_check.sh runs them on a lent GPU machine).

Every backend that takes CUDA tensors against the CPU reference, for the Keras features; capturable steps
with no host sync, and captured in a CUDA graph; the fullgraph compiled step; bfloat16 with master weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from torch_lamb import Lamb
from torch_lamb.schedules import CosineDecay

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CONFIGS = {
    "plain": {},
    "decay_ema_accumulation": {"weight_decay": 0.05, "use_ema": True, "gradient_accumulation_steps": 2},
    "global_clip_loss_scale": {"global_clipnorm": 0.5, "loss_scale_factor": 8.0},
    "adaptive_bounds_clipnorm": {"weight_decay": 0.1, "weight_decay_mode": "adaptive", "max_trust_ratio": 2.0,
                                 "clipnorm": 0.1},
}
SHAPES = [(300, 7), (5,), (64, 64), (4, 8, 8)]
CUDA_IMPLS = ["foreach", "compiled", "triton"]  # the backends that take device-tensor scalars on CUDA


def _run(device: str, impl: str, cfg: dict, dtype=torch.float32, steps: int = 6, **kw):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in SHAPES]
    opt = Lamb(ps, learning_rate=0.01, implementation=impl, **cfg, **kw)
    opt.set_trust_ratio_slices([ps[3]], dim=0)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(device, dtype)
        opt.step()
    return [p.detach().float().cpu() for p in ps], opt


@pytest.mark.parametrize("impl", [*CUDA_IMPLS, "reference"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_cuda_matches_the_cpu_reference(impl, config):
    got, _ = _run("cuda", impl, CONFIGS[config])
    want, _ = _run("cpu", "reference", CONFIGS[config])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_capturable_skip_nonfinite_never_syncs(impl):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=g).cuda())
    opt = Lamb([p], learning_rate=0.01, use_ema=True, skip_nonfinite=True, capturable=True, implementation=impl)
    p.grad = torch.randn_like(p)
    opt.step()  # the first step builds the layout (and compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.skipped_steps) == 0


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_fullgraph_compiled_step_on_cuda_equals_eager(impl):
    results = []
    for compiled in (False, True):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(500, generator=g).cuda())
        opt = Lamb([p], learning_rate=0.01, weight_decay=0.01, implementation=impl)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(4):
            p.grad = torch.randn(500, generator=g).cuda()
            step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_bfloat16_with_master_weights_matches_the_cpu_kernel_path(impl):
    got, _ = _run("cuda", impl, {"weight_decay": 0.05}, dtype=torch.bfloat16, master_weights=True)
    want, _ = _run("cpu", "foreach", {"weight_decay": 0.05}, dtype=torch.bfloat16, master_weights=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-2)


GRAPHED = {"learning_rate": CosineDecay(0.05, 8, alpha=0.1, warmup_target=0.08, warmup_steps=3), "weight_decay": 0.05,
           "use_ema": True, "ema_momentum": 0.9, "global_clipnorm": 1.0, "loss_scale_factor": 4.0}


def _graph_run(impl: str, guard: bool, captured: bool, warmup: int = 3, replays: int = 6):
    """``warmup`` eager capturable steps, then ``replays`` steps: replays of one captured step, or eager ones."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).cuda()) for s in SHAPES]
    grads = [[(torch.randn(s, generator=g) * 0.1).cuda() for s in SHAPES] for _ in range(warmup + replays)]
    opt = Lamb(ps, implementation=impl, capturable=True, skip_nonfinite=guard, **copy.deepcopy(GRAPHED))
    opt.set_trust_ratio_slices([ps[3]], dim=0)
    for p in ps:
        p.grad = torch.zeros_like(p)  # static gradients: the graph reads these tensors
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's docs prescribe
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call_grads in grads[:warmup]:
            torch._foreach_copy_([p.grad for p in ps], call_grads)
            opt.step()  # builds the layout and the state, compiles, makes the device counters
    torch.cuda.current_stream().wait_stream(side)
    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()  # recorded, not run: each replay is one step
    for call_grads in grads[warmup:]:
        torch._foreach_copy_([p.grad for p in ps], call_grads)
        if captured:
            graph.replay()
        else:
            opt.step()
    torch.cuda.synchronize()
    return [t.detach().float().cpu() for p in ps for t in (p, *opt.state[p].values())], opt


@pytest.mark.parametrize("guard", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_a_captured_cuda_graph_replays_the_eager_steps(impl, guard):
    """capturable=True: one ``opt.step()`` captured in a CUDA graph and replayed N times equals N eager steps (the
    schedule, bias correction and EMA weight advance on the device); the device counters count the replays."""
    got, opt = _graph_run(impl, guard, captured=True)
    want, ref = _graph_run(impl, guard, captured=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert opt.iterations == ref.iterations == 9
    assert opt.state_dict()["param_groups"][0]["iterations"] == 9


def test_auto_takes_compiled_for_cuda_buckets():
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    opt = Lamb([p], learning_rate=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.backends().values()) == {"compiled"}
