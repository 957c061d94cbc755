"""torch_lamb.Lamb as a PyTorch optimizer: groups, aliases, state dicts, paths, validation."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import torch_lamb
from torch_lamb import Lamb

FULL = {
    "learning_rate": 0.05, "weight_decay": 0.1, "global_clipnorm": 0.8, "use_ema": True, "ema_momentum": 0.9,
    "ema_overwrite_frequency": 3, "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2,
}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)]


def _train(model, opt, batches, scale: bool = True):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        (opt.scale_loss(loss) if scale else loss).backward()
        opt.step()
        opt.zero_grad()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    "config",
    [{}, FULL, {**FULL, "gradient_accumulation_steps": None, "clipnorm": 0.1, "global_clipnorm": None},
     {"learning_rate": 0.01, "clipvalue": 0.01, "weight_decay": 0.3, "beta_1": 0.0}],
    ids=["defaults", "everything", "clipnorm", "clipvalue"],
)
def test_backend_equals_reference(config, implementation):
    models = [_model(), _model()]
    opts = [
        Lamb(m.named_parameters(), implementation=impl, **config)
        for m, impl in zip(models, [implementation, "reference"])
    ]
    for opt in opts:
        opt.exclude_from_weight_decay(var_names=["bias"])
    batches = _batches(12)
    for m, opt in zip(models, opts):
        _train(m, opt, batches)
    torch.testing.assert_close(_flat(models[0]), _flat(models[1]), rtol=1e-6, atol=1e-7)
    assert not torch.equal(_flat(models[0]), _flat(_model()))  # training moved the weights


def test_step_does_not_modify_gradients():
    model = _model()
    opt = Lamb(model.parameters(), clipvalue=1e-3, loss_scale_factor=2.0)
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


# ------------------------------------------------------------------ groups and aliases


def test_param_groups_equal_separate_optimizers():
    model = _model()
    first, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    opt = Lamb([{"params": first, "lr": 0.2, "weight_decay": 0.1, "betas": (0.8, 0.95)}, {"params": rest}],
               learning_rate=0.01, eps=1e-6)
    twin = _model()
    t_first, t_rest = list(twin[0].parameters()), [p for m in list(twin)[1:] for p in m.parameters()]
    opt_a = Lamb(t_first, learning_rate=0.2, weight_decay=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-6)
    opt_b = Lamb(t_rest, learning_rate=0.01, epsilon=1e-6)
    for x, y in _batches(5):
        for m, opts in ((model, [opt]), (twin, [opt_a, opt_b])):
            torch.nn.functional.mse_loss(m(x), y).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[1]["lr"] == 0.01


def test_torch_lr_scheduler_drives_group_lr():
    model, twin = _model(), _model()
    opt = Lamb(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manual = Lamb(twin.parameters(), learning_rate=0.1)
    for i, (x, y) in enumerate(_batches(6)):
        manual.learning_rate = 0.1 * 0.5 ** (i // 2)
        for m, o in ((model, opt), (twin, manual)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
        sched.step()
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_schedule_keeps_group_lr_current():
    w = torch.nn.Parameter(torch.ones(3))
    sched = torch_lamb.PiecewiseConstantDecay([1], [0.5, 0.25])
    opt = Lamb([w], learning_rate=sched)
    assert opt.learning_rate == 0.5
    seen = []
    for _ in range(3):
        w.grad = torch.ones(3)
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [0.5, 0.5, 0.25]
    with pytest.raises(TypeError, match="not settable"):
        opt.learning_rate = 0.1


def test_callable_and_tensor_betas():
    """Keras documents callable betas but crashes on them; here they work like the float values."""
    models = [_model(), _model(), _model()]
    opts = [
        Lamb(models[0].parameters(), learning_rate=0.05, beta_1=0.8, beta_2=0.99),
        Lamb(models[1].parameters(), learning_rate=0.05, beta_1=lambda: 0.8, beta_2=lambda: 0.99),
        Lamb(models[2].parameters(), learning_rate=0.05, beta_1=torch.tensor(0.8), beta_2=torch.tensor(0.99)),
    ]
    batches = _batches(4)
    for m, o in zip(models, opts):
        _train(m, o, batches)
    torch.testing.assert_close(_flat(models[0]), _flat(models[1]), rtol=0, atol=0)
    # float32 tensors round 1 - beta in float32 (as Keras does for tensors): equal to ~1 ulp
    torch.testing.assert_close(_flat(models[0]), _flat(models[2]), rtol=1e-6, atol=1e-7)


def test_names_and_config():
    a, b = Lamb([torch.nn.Parameter(torch.ones(1))]), Lamb([torch.nn.Parameter(torch.ones(1))])
    assert a.name.startswith("lamb") and a.name != b.name
    c = Lamb([torch.nn.Parameter(torch.ones(1))], name="mine", learning_rate=0.5, clipnorm=1.0)
    config = c.get_config()
    assert config["name"] == "mine" and config["learning_rate"] == 0.5 and config["clipnorm"] == 1.0
    assert config["epsilon"] == 1e-7 and config["beta_1"] == 0.9


def test_closure_is_called_and_returned():
    model = _model()
    opt = Lamb(model.parameters())
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = _flat(model)
    loss = opt.step(closure)
    assert loss.item() > 0 and not torch.equal(before, _flat(model))


def test_none_gradients_leave_parameter_alone_but_ema_covers_it():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), 5.0))
    opt = Lamb([used, unused], use_ema=True)
    used.grad = torch.ones(3)
    opt.step()
    assert torch.equal(unused.detach(), torch.full((2,), 5.0))
    assert torch.equal(opt.state[unused]["average"], torch.full((2,), 5.0))
    assert torch.equal(opt.state[unused]["momentum"], torch.zeros(2))


# ------------------------------------------------------------------ state dicts and pickling


@pytest.mark.parametrize("stop_after", [3, 4])  # 3: mid-accumulation window, 4: right after an update
def test_resume_from_state_dict_is_bit_exact(stop_after):
    config = {**FULL, "learning_rate": torch_lamb.CosineDecay(0.05, 10, warmup_target=0.1, warmup_steps=2)}
    batches = _batches(10)
    model = _model()
    opt = Lamb(model.named_parameters(), **config)
    opt.exclude_from_weight_decay(var_names=["bias"])
    _train(model, opt, batches)

    first = _model()
    opt1 = Lamb(first.named_parameters(), **config)
    opt1.exclude_from_weight_decay(var_names=["bias"])
    _train(first, opt1, batches[:stop_after])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = _model(seed=7)
    opt2 = Lamb(resumed.named_parameters(), **config)  # no exclusion call: it comes from the state dict
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.clock.calls == stop_after
    _train(resumed, opt2, batches[stop_after:])
    assert torch.equal(_flat(model), _flat(resumed))
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("momentum", "velocity", "average", "gradient_accumulator"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    assert opt.iterations == opt2.iterations


def test_state_dict_holds_counter_and_exclusions():
    model = _model()
    opt = Lamb(model.named_parameters(), weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert group["iterations"] == 2
    assert group["exclude_from_weight_decay"] == ["bias" in n for n in group["param_names"]]
    assert set(sd["state"][0]) == {"momentum", "velocity"}
    assert opt.param_groups[0]["iterations"] == 2  # shown in the live groups too (engines that copy groups keep it)


def test_pickle_round_trip_continues_identically():
    model = _model()
    opt = Lamb(model.parameters(), **FULL)
    _train(model, opt, _batches(3))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.clock.calls == 3 and clone.gradient_accumulation_steps == 2 and clone.use_ema
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, q in zip(params, [q for g in clone.param_groups for q in g["params"]]):
        assert torch.equal(opt.state[p]["velocity"], clone.state[q]["velocity"])
    copied = copy.deepcopy(opt)
    assert copied.iterations == opt.iterations


def test_load_state_dict_from_other_layout_raises_and_changes_nothing():
    model = _model()
    opt = Lamb(model.parameters())
    _train(model, opt, _batches(2))
    before = copy.deepcopy(opt.state_dict())
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.LayerNorm(9), torch.nn.Linear(9, 3))
    other_opt = Lamb(other.parameters())
    _train(other, other_opt, _batches(1))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    ema_opt = Lamb(model.parameters(), use_ema=True)
    with pytest.raises(ValueError, match="use_ema"):
        ema_opt.load_state_dict(opt.state_dict())
    after = opt.state_dict()
    assert after["param_groups"][0]["iterations"] == before["param_groups"][0]["iterations"]
    for k, v in before["state"].items():
        assert torch.equal(v["momentum"], after["state"][k]["momentum"])


# ------------------------------------------------------------------ validation


def _p():
    return [torch.nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"lr": float("nan")}, "learning_rate"),
        ({"epsilon": -1e-8}, "epsilon"),
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": -0.01}, "weight_decay"),
        ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "Only one of"),
        ({"clipnorm": 0.0}, "clipnorm"),
        ({"clipvalue": -1.0}, "clipvalue"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps"),
        ({"ema_momentum": 1.5}, "ema_momentum"),
        ({"use_ema": True, "ema_overwrite_frequency": 2.0}, "ema_overwrite_frequency"),
        ({"ema_overwrite_frequency": 0}, "ema_overwrite_frequency"),
        ({"loss_scale_factor": 0.0}, "loss_scale_factor"),
        ({"learning_rate": 0.1, "lr": 0.2}, "not both"),
        ({"epsilon": 1e-6, "eps": 1e-6}, "not both"),
        ({"beta_1": 0.8, "betas": (0.9, 0.99)}, "not both"),
        ({"implementation": "cuda-magic"}, "implementation"),
        ({"name": 3}, "name"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lamb(_p(), **kwargs)


def test_unknown_keyword_and_bad_params():
    with pytest.raises(TypeError, match="momentum"):
        Lamb(_p(), momentum=0.9)
    with pytest.raises(ValueError, match="complex"):
        Lamb([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="lr"):
        Lamb([{"params": _p(), "lr": -1.0}])
    with pytest.raises(ValueError, match="not both"):
        Lamb([{"params": _p(), "lr": 0.1, "learning_rate": 0.2}])


def test_exclusion_validation():
    opt = Lamb(_p())
    with pytest.raises(ValueError, match="named parameters"):
        opt.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(ValueError, match="var_list"):
        opt.exclude_from_weight_decay(var_list=[torch.ones(2)])
    named = Lamb([("w", torch.nn.Parameter(torch.ones(2)))])
    with pytest.raises(ValueError, match="regex"):
        named.exclude_from_weight_decay(var_names=["("])


def _snapshot(model, opt):
    return _flat(model).clone(), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snapshot):
    flat, sd = snapshot
    assert torch.equal(_flat(model), flat)
    now = opt.state_dict()
    assert now["param_groups"][0]["iterations"] == sd["param_groups"][0]["iterations"]
    for k, v in sd["state"].items():
        for key, t in v.items():
            assert torch.equal(now["state"][k][key], t)


def test_failed_steps_leave_everything_untouched():
    model = _model()
    opt = Lamb(model.parameters(), use_ema=True, gradient_accumulation_steps=2, weight_decay=0.1)
    _train(model, opt, _batches(3))
    snapshot = _snapshot(model, opt)

    opt.zero_grad()
    calls = opt.clock.calls
    assert opt.step(lambda: 3.0) == 3.0  # torch's convention: no gradients, a no-op (the closure still runs)
    _assert_unchanged(model, opt, snapshot)
    assert opt.clock.calls == calls

    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad = torch.ones_like(params[-1]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)

    params[-1].grad = torch.ones_like(params[-1])
    opt.param_groups[0]["beta_1"] = lambda: 1.5
    with pytest.raises(ValueError, match="beta_1"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)

    opt.param_groups[0]["beta_1"] = 0.9
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = lambda: -1.0
    opt.learning_rate = _NegativeAfterFirstCall()
    with pytest.raises(ValueError, match="learning_rate"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


class _NegativeAfterFirstCall(torch_lamb.LearningRateSchedule):
    calls = 0

    def __call__(self, step: int) -> float:
        self.calls += 1
        return 0.1 if self.calls == 1 else -1.0


def test_low_precision_parameters_use_float32_state_and_math():
    """Keras's bfloat16 Lamb makes a NaN/zero step (bfloat16(0.999) == 1); here the math is float32."""
    w16 = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    w32 = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opts = [Lamb([w16], learning_rate=0.1), Lamb([w32], learning_rate=0.1)]
    for w, opt in zip((w16, w32), opts):
        w.grad = torch.tensor([0.1, 0.0, 0.3], dtype=w.dtype)
        opt.step()
    assert opts[0].state[w16]["momentum"].dtype == torch.float32
    assert torch.isfinite(w16).all()
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))


# ------------------------------------------------------------------ the cached bucket layout


def _layout_scenario(impl: str, rebuild_every_step: bool = False) -> list[torch.Tensor]:
    """Eight steps with a structural change before most: the cached layout must follow every one."""
    from torch_lamb.layout import LayoutCache

    LayoutCache.reuse = not rebuild_every_step
    try:
        return _layout_steps(impl)
    finally:
        LayoutCache.reuse = True


def _layout_steps(impl: str) -> list[torch.Tensor]:
    model = _model()
    opt = Lamb(model.named_parameters(), implementation=impl, use_ema=True, learning_rate=0.02)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(5)
    snapshot = None
    for step in range(8):
        if step == 1:  # new storage for a parameter (as `p.data = ...` does), non-contiguous at that
            params[0].data = (params[0].detach().t().contiguous() * 1.5).t()
        if step == 2:  # contiguous again (the kernel's again), and a parameter without a gradient
            params[0].data = params[0].detach().contiguous()
            params[1].requires_grad_(False)
        if step == 3:
            params[1].requires_grad_(True)
        if step == 4:
            opt.param_groups[0]["weight_decay"] = 0.2  # decay switched on after construction
            snapshot = copy.deepcopy(opt.state_dict())
        if step == 5:
            opt.exclude_from_weight_decay(var_names=["bias"])
        if step == 6:  # back to an earlier state, in the same optimizer (new state tensors)
            opt.load_state_dict(snapshot)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1 if p.requires_grad else None
        opt.step()
    return [p.detach().clone() for p in params] + [opt.state[p]["average"] for p in params]


@pytest.mark.parametrize("impl", ["auto", "foreach"])
def test_cached_layout_follows_structural_changes(impl):
    got, want = _layout_scenario(impl), _layout_scenario(impl, rebuild_every_step=True)
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    reference = _layout_scenario("reference", rebuild_every_step=True)
    for x, y in zip(got, reference, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_layout_is_reused_while_nothing_changes(monkeypatch):
    from torch_lamb import layout

    builds = []
    real = layout.build
    monkeypatch.setattr(layout, "build", lambda *args: builds.append(1) or real(*args))
    model = _model()
    opt = Lamb(model.parameters())
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(builds) == 1
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # new gradient tensors: the layout holds
    opt.step()
    assert len(builds) == 1
    next(model.parameters()).grad = None
    opt.step()
    assert len(builds) == 2


# ------------------------------------------------------------------ choosing a backend


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, "auto"), ({"implementation": None}, "auto"), ({"fused": True}, "fused"), ({"foreach": True}, "foreach"),
    ({"foreach": False}, "reference"), ({"fused": False}, "foreach"), ({"fused": False, "foreach": False}, "reference"),
    ({"implementation": "foreach", "foreach": True}, "foreach"),
])
def test_implementation_and_torch_spellings(kwargs, expected):
    assert Lamb(_model().parameters(), **kwargs).implementation == expected


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fused": True, "foreach": True}, "both"), ({"implementation": ""}, "implementation"),
    ({"implementation": 0}, "implementation"), ({"implementation": False}, "implementation"),
    ({"implementation": "reference", "fused": True}, "contradicts"), ({"foreach": 1}, "bool"),
])
def test_implementation_spellings_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lamb(_model().parameters(), **kwargs)


def test_an_edited_implementation_is_checked_before_anything_changes():
    model = _model()
    opt = Lamb(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = _flat(model)
    with pytest.raises(ValueError, match="implementation"):  # refused when set: the config stays as it was
        opt.implementation = "cuda-magic"
    assert opt.implementation == "auto" and torch.equal(_flat(model), before) and opt.iterations == 0
    opt.implementation = "reference"
    opt.step()
    assert not torch.equal(_flat(model), before) and set(opt.backends().values()) == {"reference"}


def test_a_parameter_replaced_in_its_group_is_the_one_updated(implementation):
    """Another tensor put into a group in place (same count, same shapes) must be the one that moves."""
    model = _model()
    opt = Lamb(model.parameters(), implementation=implementation)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    old = opt.param_groups[0]["params"][0]
    new = torch.nn.Parameter(old.detach().clone())
    opt.param_groups[0]["params"][0] = new
    opt.state[new] = opt.state.pop(old)
    before_old, before_new = old.detach().clone(), new.detach().clone()
    new.grad = torch.ones_like(new)
    opt.step()
    assert torch.equal(old, before_old) and not torch.equal(new, before_new)
