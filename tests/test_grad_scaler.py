"""GradScaler's hand-off (torch_lamb.amp): ``scaler.step(opt)`` gives Lamb the scale and the verdict, and Lamb
unscales where it reads each gradient. Every result is compared, bit for bit, with GradScaler's ordinary path
(``unscale_`` pass, host read, then ``step()``), which an optimizer that does not declare the hand-off takes.
"""

from __future__ import annotations

import copy

import impls
import pytest
import torch

from torch_lamb import ExponentialDecay, Lamb
from torch_lamb.functional import f32


class OrdinaryPath(Lamb):
    """Lamb as GradScaler sees an optimizer without the hand-off (torch's protocol attribute, declared off)."""

    _step_supports_amp_scaling = False


CONFIGS = {
    "plain": {},
    "accumulation": {"gradient_accumulation_steps": 2},
    "clipnorm": {"clipnorm": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.05},
    "clipvalue": {"clipvalue": 1e-3},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 3},
    "skip_nonfinite": {"skip_nonfinite": True, "gradient_accumulation_steps": 2},
    "loss_scale_factor": {"loss_scale_factor": 3.0, "global_clipnorm": 0.05},
}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _snapshot(model: torch.nn.Module, opt: Lamb) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for p in model.parameters() for _, t in sorted(opt.state[p].items())]


def _train(cls: type[Lamb], impl: str, cfg: dict, *, dtype=torch.float32, unscale_first=False, steps=7,
           autocast=False, slices=False, resume_at=None) -> tuple[list[torch.Tensor], Lamb, torch.amp.GradScaler]:
    """Steps with GradScaler: a non-power-of-two scale (1000, growth 3: unscaling rounds), an inf at call 3
    (a skipped step and a backoff), growth every 2 good steps."""
    model = _model(dtype)
    named = list(model.named_parameters())

    def make():
        opt = cls(named, **{"learning_rate": 1e-2, "weight_decay": 0.01, **cfg}, implementation=impl)
        if slices:
            opt.set_trust_ratio_slices(var_names=["0.weight"], dim=0, sizes=[6, 10])
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_factor=3.0, backoff_factor=0.25,
                                      growth_interval=2)
        return opt, scaler

    opt, scaler = make()
    data = torch.Generator().manual_seed(1)
    for call in range(steps):
        if call == resume_at:
            saved = copy.deepcopy((opt.state_dict(), scaler.state_dict()))
            opt, scaler = make()
            opt.load_state_dict(saved[0])
            scaler.load_state_dict(saved[1])
        x = torch.randn(32, 8, generator=data).to(dtype)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = model(x).float().pow(2).mean() * (float("inf") if call == 3 else 1.0)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return _snapshot(model, opt), opt, scaler


def _assert_same(got, want) -> None:
    (a, opt_a, sc_a), (b, opt_b, sc_b) = got, want
    assert opt_a.iterations == opt_b.iterations and sc_a.get_scale() == sc_b.get_scale()
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i}: max {(x.float() - y.float()).abs().max()}"


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_hand_off_gives_the_ordinary_paths_bits(implementation, config, unscale_first) -> None:
    got = _train(Lamb, implementation, CONFIGS[config], unscale_first=unscale_first)
    want = _train(OrdinaryPath, implementation, CONFIGS[config], unscale_first=unscale_first)
    _assert_same(got, want)
    assert got[1].iterations == (3 if "gradient_accumulation_steps" in CONFIGS[config] else 6)  # call 3 skipped


@pytest.mark.parametrize("case", ["bfloat16", "bfloat16_master", "float64", "slices", "fp16_autocast", "resume"])
def test_the_hand_off_in_every_dtype_with_masters_slices_autocast_and_resume(implementation, case) -> None:
    dtype = {"bfloat16": torch.bfloat16, "bfloat16_master": torch.bfloat16, "float64": torch.float64}.get(
        case, torch.float32)
    if impls.refusal(implementation, dtype):
        pytest.skip(impls.refusal(implementation, dtype))
    kw = {"dtype": dtype, "slices": case == "slices", "autocast": case == "fp16_autocast"}
    cfg = {"master_weights": True} if case == "bfloat16_master" else {"use_ema": True}
    want = _train(OrdinaryPath, implementation, cfg, **kw)
    got = _train(Lamb, implementation, cfg, resume_at=5 if case == "resume" else None, **kw)
    _assert_same(got, want)


def test_the_hand_off_reads_the_gradients_once_and_leaves_them_scaled() -> None:
    """No unscale_ pass writes the gradients: they hold what backward left (GradScaler's own check multiplies
    them by 1), where the ordinary path leaves them unscaled."""
    grads = {}
    for cls in (Lamb, OrdinaryPath):
        model = _model(torch.float32)
        opt = cls(model.parameters(), learning_rate=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(model(torch.ones(4, 8)).pow(2).mean()).backward()
        backward = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        grads[cls] = [p.grad for p in model.parameters()]
        assert all(torch.equal(g, b if cls is Lamb else b / 1024.0) for g, b in zip(grads[cls], backward))


def test_a_found_inf_changes_nothing_and_counts_no_call(implementation) -> None:
    model = _model(torch.float32)
    opt = Lamb(model.parameters(), learning_rate=1e-2, use_ema=True, gradient_accumulation_steps=2,
               implementation=implementation)
    scaler = torch.amp.GradScaler("cpu")
    before = _snapshot(model, opt)
    scaler.scale(model(torch.ones(4, 8)).sum() * float("nan")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.iterations == 0 and int(opt.clock.calls) == 0 and scaler.get_scale() == 2.0**15
    assert all(torch.equal(x, y) for x, y in zip(_snapshot(model, opt), before, strict=True))


CAPTURABLE_CONFIGS = {
    "plain": {},
    "clipnorm": {"clipnorm": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.05},
    "clipvalue": {"clipvalue": 1e-3},
    "ema": {"use_ema": True},
    "schedule_loss_scale": {"learning_rate": ExponentialDecay(0.02, 2, 0.5), "loss_scale_factor": 3.0},
}


@pytest.mark.parametrize("implementation", impls.params(capturable=True))
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@pytest.mark.parametrize("config", sorted(CAPTURABLE_CONFIGS))
def test_capturable_takes_the_verdict_on_the_device_with_the_ordinary_bits(implementation, config,
                                                                          unscale_first) -> None:
    """Under capturable the hand-off's verdict is a device-side veto (the call runs masked and counts nothing)
    and its 1/scale a device tensor: the ordinary path's bits, across the skipped call 3 and the scale updates."""
    got = _train(Lamb, implementation, {**copy.deepcopy(CAPTURABLE_CONFIGS[config]), "capturable": True},
                 unscale_first=unscale_first)
    want = _train(OrdinaryPath, implementation, {**copy.deepcopy(CAPTURABLE_CONFIGS[config]), "capturable": True},
                  unscale_first=unscale_first)
    _assert_same(got, want)
    assert got[1].iterations == 6 and int(got[1].clock.calls) == 6  # call 3 counted nowhere


def _scaled_step(opt: Lamb) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model_params = [p for g in opt.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.ones(4, 8)
    scaler.scale(_forward(model_params, x)).backward()
    backward = [p.grad.clone() for p in model_params]
    scaler.step(opt)
    return backward, [p.grad for p in model_params]


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w1, b1)), w2, b2).pow(2).mean()


@pytest.mark.parametrize("config", ["plain", "accumulation", "ema_overwrite", "skip_nonfinite", "callable_lr"])
def test_capturable_takes_the_hand_off_only_where_no_host_decision_counts_calls(config) -> None:
    """Where the host decides by call count (an accumulation window, an overwrite period, skip_nonfinite's count,
    a Python callable's learning rate), a vetoed call would put it out of step: GradScaler unscales first there."""
    cfg = {"plain": {}, "accumulation": {"gradient_accumulation_steps": 2},
           "ema_overwrite": {"use_ema": True, "ema_overwrite_frequency": 2}, "skip_nonfinite": {"skip_nonfinite": True},
           "callable_lr": {"learning_rate": lambda step: 0.01 / (1 + step)}}[config]
    opt = Lamb(list(_model(torch.float32).parameters()), capturable=True, implementation="foreach", **cfg)
    backward, after = _scaled_step(opt)
    handed = config == "plain"
    assert all(torch.equal(g, b if handed else b / 1024.0) for g, b in zip(after, backward))


def test_a_verdict_forced_on_a_capturable_step_that_cannot_take_it_raises_before_any_change() -> None:
    params = list(_model(torch.float32).parameters())
    opt = Lamb(params, capturable=True, implementation="foreach", gradient_accumulation_steps=2)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="counts calls on the host"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and int(opt.clock.calls) == 0


@pytest.mark.parametrize("implementation", impls.params(capturable=True))
def test_a_captured_step_replays_the_veto_and_the_scale(implementation) -> None:
    """One ``step()`` recorded with GradScaler's two tensors (test_capturable's Graph refuses any host read),
    replayed with new gradients, scales and verdicts written into the same tensors: each replay gives the
    bits of the ordinary path (unscale, then step only where nothing was found)."""
    from test_capturable import Graph

    calls = [(1024.0, 0.0), (1024.0, 1.0), (256.0, 0.0), (3000.0, 0.0), (3000.0, 1.0), (750.0, 0.0)]
    data = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=data) * 100 for p in _model(torch.float32).parameters()]
             for _ in range(len(calls) + 1)]
    replayed = list(_model(torch.float32).parameters())
    opt = Lamb(replayed, learning_rate=ExponentialDecay(0.02, 2, 0.5), capturable=True, use_ema=True,
               implementation=implementation)
    for p, g in zip(replayed, grads[0]):
        p.grad = g.clone()
    opt.grad_scale, opt.found_inf = torch.full((), 512.0), torch.zeros(())
    opt.step()  # eager: the layout is built, the counters move to the device
    with Graph() as graph:
        opt.step()  # recorded with the scale 512 and nothing found: call 2 of the eager run below
    for (scale, found), call_grads in zip(calls, grads[1:]):
        for p, g in zip(replayed, call_grads):
            p.grad.copy_(g)
        opt.grad_scale.fill_(scale)
        opt.found_inf.fill_(found)
        graph.replay()
    ordinary = list(_model(torch.float32).parameters())
    ref = OrdinaryPath(ordinary, learning_rate=ExponentialDecay(0.02, 2, 0.5), capturable=True, use_ema=True,
                       implementation=implementation)
    for (scale, found), call_grads in zip([(512.0, 0.0), (512.0, 0.0), *calls], [grads[0], grads[0], *grads[1:]]):
        if found:
            continue
        for p, g in zip(ordinary, call_grads):
            p.grad = g * f32(1.0 / scale)  # unscale_: float32 1/scale times g, in g's dtype
        ref.step()
    want = [p.detach().clone() for p in ordinary] + [t for p in ordinary for _, t in sorted(ref.state[p].items())]
    got = [p.detach().clone() for p in replayed] + [t for p in replayed for _, t in sorted(opt.state[p].items())]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert opt.iterations == ref.iterations == 6
@pytest.mark.parametrize("compiling", ["compiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_compiling_backends_unscale_in_their_first_pass(compiling, dtype) -> None:
    impls.skip_unless(compiling)
    cfg = {"global_clipnorm": 0.05, "gradient_accumulation_steps": 2, "loss_scale_factor": 2.0}
    _assert_same(_train(Lamb, compiling, cfg, dtype=dtype, steps=6),
                 _train(OrdinaryPath, compiling, cfg, dtype=dtype, steps=6))


@pytest.mark.parametrize("compiling", ["compiled", "triton"])
def test_the_compiling_backends_take_the_device_side_veto(compiling) -> None:
    """Their scalar vector carries the device 1/scale, and the masked scalars of a vetoed call."""
    impls.skip_unless(compiling)
    cfg = {"global_clipnorm": 0.05, "use_ema": True, "capturable": True}
    _assert_same(_train(Lamb, compiling, cfg, steps=5), _train(OrdinaryPath, compiling, cfg, steps=5))


def test_float16_parameters_are_unscaled_in_float32(implementation) -> None:
    """unscale_ refuses float16 gradients (they would underflow); the hand-off unscales them in float32, as a
    loss_scale_factor of the same power of two divides them: the same bits."""
    results = []
    for handed_over in (True, False):
        model = _model(torch.float16)
        opt = Lamb(model.parameters(), learning_rate=1e-2, implementation=implementation,
                   loss_scale_factor=None if handed_over else 2.0**14)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=100)
        for _ in range(3):
            loss = model(torch.ones(4, 8, dtype=torch.float16)).float().pow(2).mean() * 2.0**14
            if handed_over:
                loss = scaler.scale(loss / 2.0**14)
            loss.backward()
            if handed_over:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        results.append(_snapshot(model, opt))
    for x, y in zip(*results, strict=True):  # the kernel's loss-scaled code sums in another order: a last bit
        torch.testing.assert_close(x, y, rtol=0 if implementation != "fused" else 1e-3, atol=0)
    assert not torch.equal(results[0][0], _model(torch.float16)[0].weight)


def test_a_torch_compiled_step_takes_the_hand_off() -> None:
    """``opt.step = torch.compile(opt.step)``: the graph's op runs the eager step, which reads the scale and the
    verdict GradScaler set for the call."""
    results = []
    for cls, compiled in ((Lamb, True), (OrdinaryPath, False)):
        model = _model(torch.float32)
        opt = cls(model.parameters(), learning_rate=1e-2)
        if compiled:
            opt.step = torch.compile(opt.step)
        scaler = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
        data = torch.Generator().manual_seed(1)
        for call in range(5):
            loss = model(torch.randn(16, 8, generator=data)).pow(2).mean() * (float("inf") if call == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append((_snapshot(model, opt), opt.iterations))
    assert results[0][1] == results[1][1] == 4
    assert all(torch.equal(x, y) for x, y in zip(results[0][0], results[1][0], strict=True))
