"""``torch.compile(optimizer.step)`` runs the same step as eager (counters, schedules, accumulation, EMA)."""

from __future__ import annotations

import impls
import pytest
import torch

from torch_lamb import CosineDecay, Lamb


def _run(implementation: str, compiled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300))
    opt = Lamb([p], learning_rate=CosineDecay(0.01, 10), weight_decay=0.01, use_ema=True, ema_overwrite_frequency=3,
               gradient_accumulation_steps=2, global_clipnorm=1.0, implementation=implementation)
    step = torch.compile(opt.step) if compiled else opt.step
    for i in range(8):
        p.grad = torch.sin(torch.arange(300.0) * (i + 1)) * 0.1
        step()
    return p.detach().clone(), opt.state[p]["average"].clone(), opt.iterations


@pytest.mark.parametrize("implementation", ["foreach", "auto"])
def test_compiled_step_equals_eager(implementation):
    torch._dynamo.reset()
    eager, compiled = _run(implementation, False), _run(implementation, True)
    assert compiled[2] == eager[2] == 4  # dynamo drops attribute stores in traced frames: not in ours
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


FEATURES = {
    "schedule_ema_overwrite": {"learning_rate": CosineDecay(0.01, 20), "use_ema": True, "ema_overwrite_frequency": 3},
    "callables": {"learning_rate": lambda: 0.005, "beta_1": lambda: 0.8},
    "accumulation_loss_scale": {"gradient_accumulation_steps": 3, "loss_scale_factor": 64.0},
    "clipnorm": {"clipnorm": 0.1, "weight_decay": 0.05},
    "clipvalue": {"clipvalue": 0.01},
    "global_clipnorm_adaptive": {"global_clipnorm": 0.2, "weight_decay": 0.05, "weight_decay_mode": "adaptive"},
}


def _train(implementation: str, config: dict, compiled: bool, scheduler: bool = False, steps: int = 12):
    """A whole training step (forward, backward, step, zero_grad), compiled as one function or run eagerly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    opt = Lamb(model.parameters(), implementation=implementation, **config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s)) if scheduler else None

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = torch.compile(train_step) if compiled else train_step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen))
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()], opt.iterations


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_a_compiled_training_step_equals_eager_for_every_feature(feature):
    """Compiled and eager agree (here to the bit: the step runs eagerly under dynamo), with equal iterations."""
    cfg = FEATURES[feature]
    torch._dynamo.reset()
    eager, compiled = _train("foreach", cfg, False), _train("foreach", cfg, True)
    assert compiled[1] == eager[1] == 12 // cfg.get("gradient_accumulation_steps", 1)
    for a, b in zip(compiled[0], eager[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert not torch.equal(eager[0][0], _train("foreach", cfg, False, steps=0)[0][0])  # training moved it


def test_a_torch_scheduler_changing_lr_every_step_does_not_recompile():
    """100 steps of a LambdaLR that changes lr each step: one graph for the training step, and the same result
    as eager (a float lr traced into the graph would recompile on every new value)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = _train("auto", {"learning_rate": 0.01, "weight_decay": 0.01}, True, scheduler=True, steps=100)
    graphs = counters["stats"]["unique_graphs"]
    eager = _train("auto", {"learning_rate": 0.01, "weight_decay": 0.01}, False, scheduler=True, steps=100)
    assert compiled[1] == eager[1] == 100
    assert 1 <= graphs <= 2, graphs
    for a, b in zip(compiled[0], eager[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def _steps(implementation: str, config: dict, compile_options: dict | None, steps: int = 9,
           graphs_after: list[int] | None = None):
    """``steps`` calls of ``opt.step`` (compiled with ``compile_options``, or eager) on fixed gradients;
    ``graphs_after`` gets dynamo's graph count after each call."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((20, 3), (7,), (4, 5, 6))]
    opt = Lamb(ps, implementation=implementation, **config)
    opt.set_trust_ratio_slices([ps[2]], dim=0)
    step = torch.compile(opt.step, **compile_options) if compile_options is not None else opt.step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        step()
        if graphs_after is not None:
            graphs_after.append(counters["stats"]["unique_graphs"])
    return [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()], opt.iterations


@pytest.mark.parametrize("implementation", ["auto", "foreach", "compiled", "reference"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_fullgraph_compiled_step_equals_eager(implementation, feature):
    """torch.compile(opt.step, fullgraph=True): no graph break on any backend (the step is one op of the graph),
    the eager bits, the same iterations."""
    from torch._dynamo.utils import counters

    impls.skip_unless(implementation)
    torch._dynamo.reset()
    counters.clear()
    cfg = FEATURES[feature]
    graphs: list[int] = []
    got = _steps(implementation, cfg, {"fullgraph": True}, graphs_after=graphs)
    assert sum(counters["graph_break"].values()) == 0
    # one graph for the step (the compiled backend adds its phases' graphs at their first use), and no
    # graph after the first update's calls, whatever the schedule or the accumulation window
    warm = 1 + cfg.get("gradient_accumulation_steps", 1)
    assert graphs[-1] == graphs[warm - 1], graphs
    assert implementation == "compiled" or graphs[-1] == 1, graphs
    want = _steps(implementation, cfg, None)
    assert got[1] == want[1] == 9 // cfg.get("gradient_accumulation_steps", 1)
    for a, b in zip(got[0], want[0], strict=True):
        assert torch.equal(a, b)


def test_a_pickled_optimizer_compiles_its_own_step():
    import copy

    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(10))
    opt = Lamb([p], learning_rate=0.01)
    twin_p, twin = copy.deepcopy((p, opt))
    for param, o in ((p, opt), (twin_p, twin)):
        param.grad = torch.ones(10)
        torch.compile(o.step, fullgraph=True)()
    assert opt.iterations == twin.iterations == 1 and torch.equal(p.detach(), twin_p.detach())


def _clip_then_step(compiled: bool, dtype: torch.dtype = torch.float32, master: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(dtype)
    opt = Lamb(model.parameters(), learning_rate=0.1, master_weights=master, implementation="foreach")

    def train_step(x: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # edits the gradients in the same graph
        opt.step()

    step = torch.compile(train_step, fullgraph=True) if compiled else train_step
    for _ in range(6):
        model.zero_grad()
        model(torch.ones(2, 4, dtype=dtype)).sum().backward()
        step(torch.ones(1))
    state = opt.state[model.weight]
    return [model.weight.detach().clone(), state["momentum"].clone()] + (
        [state["master_weight"].clone()] if master else [])


def test_gradient_edits_earlier_in_the_graph_reach_the_step():
    """clip_grad_norm_ then step in one fullgraph function: the step sees the clipped gradients (the op takes
    them as inputs), as eager does."""
    torch._dynamo.reset()
    for a, b in zip(_clip_then_step(True), _clip_then_step(False), strict=True):
        assert torch.equal(a, b)


def test_master_weights_keep_their_precision_under_a_compiled_step():
    """The graph's runtime bumps the parameters' versions after the op: that is no write, so the float32
    masters are not re-made from the bfloat16 parameters (they were, losing their precision every step)."""
    torch._dynamo.reset()
    got, want = _clip_then_step(True, torch.bfloat16, True), _clip_then_step(False, torch.bfloat16, True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_step_op_is_never_recorded_into_a_cuda_graph():
    assert torch.Tag.cudagraph_unsafe in torch.ops.torch_lamb.step.default.tags
