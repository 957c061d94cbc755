"""Lamb as a torch.optim optimizer: torch's conventions, checked inputs, checkpoints (in the spirit of
torch's own OptimizerInfo tests, written for Lamb; backends come from tests/impls.py)."""

from __future__ import annotations

import copy
import io
import pickle

import impls
import numpy as np
import pytest
import torch

import torch_lamb
from torch_lamb import CosineDecay, Lamb

CONFIGS = {  # one row per kind of configuration the generic tests run through
    "defaults": {},
    "decay_clipnorm": {"weight_decay": 0.1, "clipnorm": 0.5},
    "everything": {"weight_decay": 0.05, "global_clipnorm": 1.0, "use_ema": True, "ema_overwrite_frequency": 3,
                   "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2},
    "adaptive_bounds": {"weight_decay": 0.1, "weight_decay_mode": "adaptive", "max_trust_ratio": 2.0,
                        "clipvalue": 0.05},
    "schedule_callable_betas": {"learning_rate": CosineDecay(0.02, 20), "beta_1": lambda: 0.85,
                                "beta_2": np.float32(0.99)},
    "skip_nonfinite": {"skip_nonfinite": True, "use_ema": True},
}


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def _train(model: torch.nn.Module, opt: Lamb, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def _opt(model: torch.nn.Module, config: dict, **extra) -> Lamb:
    return Lamb(model.named_parameters(), **{"learning_rate": 0.02, **config, **extra})


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_dict_round_trip_loads_weights_only_and_resumes_exactly(config, implementation):
    ref_model, model = _model(), _model()
    ref = _opt(ref_model, CONFIGS[config], implementation=implementation)
    _train(ref_model, ref, 6)
    opt = _opt(model, CONFIGS[config], implementation=implementation)
    _train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain numbers only: no callables, no numpy scalars
    resumed_model = copy.deepcopy(model)
    resumed = _opt(resumed_model, CONFIGS[config], implementation=implementation)
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, 3, seed=2)
    _train(model, opt, 3, seed=2)
    assert torch.equal(_flat(resumed_model), _flat(model))
    assert resumed.iterations == opt.iterations and not torch.equal(_flat(model), _flat(_model()))


@pytest.mark.parametrize("config", ["everything", "schedule_callable_betas"])
def test_deepcopy_and_pickle_continue_identically(config):
    model = _model()
    opt = _opt(model, CONFIGS[config] if config != "schedule_callable_betas" else
               {k: v for k, v in CONFIGS[config].items() if k != "beta_1"})  # lambdas do not pickle
    _train(model, opt, 3)
    twins = []
    for clone in (copy.deepcopy, lambda pair: pickle.loads(pickle.dumps(pair))):
        m, o = clone((model, opt))  # the model and its optimizer together, so that parameters stay shared
        _train(m, o, 2, seed=3)
        twins.append(_flat(m))
    _train(model, opt, 2, seed=3)
    for flat in twins:
        assert torch.equal(flat, _flat(model))


def test_load_moves_state_to_the_parameters_dtype_and_keeps_float32_state_for_low_precision():
    src = _model()
    opt = Lamb(src.parameters())
    _train(src, opt, 2)
    for dtype, state_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        dst = _model(dtype=dtype)
        loaded = Lamb(dst.parameters())
        loaded.load_state_dict(opt.state_dict())
        assert all(t.dtype == state_dtype for p in dst.parameters() for t in loaded.state[p].values())
        _train(dst, loaded, 1)
        assert torch.isfinite(_flat(dst)).all()


def test_foreign_and_malformed_state_dicts_are_refused_and_change_nothing():
    model = _model()
    opt = Lamb(model.parameters())
    _train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    adamw = torch.optim.AdamW(_model().parameters())
    bad_slot = copy.deepcopy(before)
    bad_slot["state"][0]["momentum"] = 3.0
    wrong_shape = copy.deepcopy(before)
    wrong_shape["state"][1]["velocity"] = torch.zeros(7)
    for sd, match in ((adamw.state_dict(), "another optimizer"), (bad_slot, "floating-point tensor"),
                      (wrong_shape, "shape")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert torch.equal(opt.state_dict()["state"][0]["momentum"], before["state"][0]["momentum"])
    _train(_model(), adamw, 1)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(adamw.state_dict())


def test_extra_state_keys_are_kept_and_cleared_state_is_rebuilt():
    model = _model()
    opt = Lamb(model.parameters())
    _train(model, opt, 1)
    sd = opt.state_dict()
    sd["state"]["note"] = torch.tensor(1.0)  # not a parameter's: torch keeps such keys
    opt.load_state_dict(sd)
    assert torch.equal(opt.state_dict()["state"]["note"], torch.tensor(1.0))
    opt.state.clear()
    _train(model, opt, 1)
    assert all(torch.count_nonzero(opt.state[p]["momentum"]) > 0 for p in model.parameters())
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


# ------------------------------------------------------------------ torch.optim behaviour


def test_hooks_closure_and_zero_grad():
    model = _model()
    opt = Lamb(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (calls.append("sd_post"), sd)[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: (calls.append("load_pre"), sd)[1])
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    before = _flat(model)
    opt.step()  # zero gradients: a real step (the momentum still moves the weights)
    assert opt.iterations == 2 and not torch.equal(_flat(model), before)
    opt.zero_grad()
    opt.step()  # no gradients: a no-op
    assert opt.iterations == 2


def test_generators_duplicate_and_misspelt_groups():
    model = _model()
    opt = Lamb([{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 0.1}])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    before = _flat(model)
    _train(model, opt, 2)
    assert all(not torch.equal(a, b) for a, b in zip(_flat(model).split([30, 5, 10, 2]), before.split([30, 5, 10, 2])))
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters; Lamb keeps the first"):
        dup = Lamb([w, w], learning_rate=0.1)
    assert dup.param_groups[0]["params"] == [w]
    w.grad = torch.ones(3)
    dup.step()  # one update, as for the tensor listed once
    once = torch.nn.Parameter(torch.ones(3))
    once.grad = torch.ones(3)
    Lamb([once], learning_rate=0.1).step()
    assert torch.equal(w, once) and not torch.equal(w, torch.ones(3))
    with pytest.raises(ValueError, match="did you mean 'weight_decay'"):
        Lamb([{"params": model[0].parameters(), "weight_decy": 0.1}])


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_torch_momentum_schedulers_drive_betas(scheduler):
    model = _model()
    opt = Lamb(model.parameters(), learning_rate=0.01)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10) if scheduler == "OneCycleLR"
             else torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.05, step_size_up=3))
    seen = []
    for _ in range(4):
        _train(model, opt, 1)
        sched.step()
        seen.append((opt.param_groups[0]["beta_1"], opt.param_groups[0]["lr"]))
    _train(model, opt, 1)  # the scheduler's betas reached the update and both spellings agree
    group = opt.param_groups[0]
    assert group["betas"] == (group["beta_1"], group["beta_2"]) and len({b for b, _ in seen}) > 1


def test_eps_and_betas_writes_are_live_and_conflicts_refused():
    models = [_model(), _model()]
    a, b = Lamb(models[0].parameters(), epsilon=1e-3), Lamb(models[1].parameters())
    b.param_groups[0]["eps"] = 1e-3
    for m, o in zip(models, (a, b)):
        _train(m, o, 2)
    assert torch.equal(_flat(models[0]), _flat(models[1])) and b.param_groups[0]["epsilon"] == 1e-3
    b.param_groups[0]["betas"] = (0.5, 0.9)
    b.param_groups[0]["beta_1"] = 0.6
    with pytest.raises(ValueError, match="both"):
        _train(models[1], b, 1)


@pytest.mark.parametrize("lr", [torch.tensor(0.01), torch.tensor([0.01]), torch.tensor(0.01, dtype=torch.float64)])
def test_tensor_learning_rates(lr):
    models = [_model(), _model()]
    opts = [Lamb(models[0].parameters(), lr=lr), Lamb(models[1].parameters(), lr=0.01)]
    for m, o in zip(models, opts):
        _train(m, o, 2)
    torch.testing.assert_close(_flat(models[0]), _flat(models[1]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_matches_the_reference_in_every_dtype(implementation, dtype):
    if reason := impls.refusal(implementation, dtype):
        pytest.skip(reason)
    config = {"weight_decay": 0.05, "use_ema": True, "clipnorm": 1.0}
    models = [_model(dtype=dtype), _model(dtype=dtype)]
    opts = [Lamb(m.parameters(), learning_rate=0.01, implementation=i, **config)
            for m, i in zip(models, (implementation, "reference"))]
    for m, o in zip(models, opts):
        _train(m, o, 4)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(_flat(models[0]), _flat(models[1]), rtol=tol, atol=tol)
    assert not torch.equal(_flat(models[0]), _flat(_model(dtype=dtype)))


# ------------------------------------------------------------------ extreme values


def test_norms_do_not_overflow_for_huge_finite_values(implementation):
    """Squares of weights near 1e30 and sums of squares of gradients near 1e18 overflow float32: the
    norms, the clipping and the trust ratio must stay finite and agree with the reference."""
    results = []
    for impl in (implementation, "reference"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40_000) * 1e30)
        opt = Lamb([p], learning_rate=0.01, weight_decay=0.01, clipnorm=1e35, skip_nonfinite=True, implementation=impl)
        opt.track_trust_ratios(True)
        for _ in range(2):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e18
            opt.step()
        record = next(iter(opt.last_trust_ratios().values()))
        assert int(opt.skipped_steps) == 0 and torch.isfinite(p).all() and 1e29 < float(record.ratio) < 1e31
        results.append((p.detach().clone(), float(record.ratio)))
    scale = float(results[1][0].abs().max())  # elements near 0 cancel: an absolute floor at the tensor's scale
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5 * scale)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_gradients_whose_squares_overflow_are_skipped_not_turned_into_nan(implementation):
    p = torch.nn.Parameter(torch.randn(1000))
    opt = Lamb([p], skip_nonfinite=True, loss_scale_factor=4.0, implementation=implementation)
    before = p.detach().clone()
    p.grad = torch.full_like(p, 1e20)  # finite, but (1e20 / 4) squared overflows float32: v would be inf
    opt.step()
    assert torch.equal(p, before) and int(opt.skipped_steps) == 1
    p.grad = torch.full_like(p, 1e20)
    opt.loss_scale_factor = 1e4  # unscaled, 1e16: fine
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, before) and int(opt.skipped_steps) == 1


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "device"])
def test_skipped_call_with_zero_epsilon_changes_nothing(implementation, capturable):
    if capturable and implementation not in impls.available(capturable=True):
        pytest.skip(f"{implementation} does not take capturable=True")
    p = torch.nn.Parameter(torch.randn(10))
    opt = Lamb([p], epsilon=0.0, skip_nonfinite=True, capturable=capturable, implementation=implementation)
    before = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    opt.step()  # the first call, skipped: m = v = 0 would give 0/0
    assert torch.equal(p, before) and int(opt.skipped_steps) == 1


# ------------------------------------------------------------------ bad input: a clear error, nothing changed

BAD_CONSTRUCTOR = [
    ({"learning_rate": -1.0}, "learning_rate"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": 1e39}, "learning_rate"), ({"learning_rate": torch.tensor(True)}, "learning_rate"),
    ({"learning_rate": "0.1"}, "learning_rate"), ({"beta_1": 1.0}, "beta_1"), ({"beta_1": -0.1}, "beta_1"),
    ({"beta_2": 0.99999999}, "beta_2"), ({"betas": (None, 0.9)}, "beta_1"), ({"betas": (0.9,)}, "betas"),
    ({"epsilon": -1e-8}, "epsilon"), ({"epsilon": 1e39}, "epsilon"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"), ({"clipnorm": 0.0}, "clipnorm"),
    ({"clipnorm": 1e-46}, "clipnorm"), ({"clipvalue": -1.0}, "clipvalue"), ({"global_clipnorm": 1e-50}, "global"),
    ({"clipnorm": 1.0, "clipvalue": 1.0}, "Only one"), ({"loss_scale_factor": 1e-46}, "loss_scale_factor"),
    ({"loss_scale_factor": 0.0}, "loss_scale_factor"), ({"use_ema": 1}, "use_ema"),
    ({"ema_momentum": 1.5}, "ema_momentum"), ({"ema_overwrite_frequency": 0}, "ema_overwrite"),
    ({"ema_overwrite_frequency": 2.0}, "ema_overwrite"), ({"gradient_accumulation_steps": 1}, "accumulation"),
    ({"gradient_accumulation_steps": True}, "accumulation"), ({"name": 3}, "name"),
    ({"implementation": ""}, "implementation"), ({"implementation": 0}, "implementation"),
    ({"implementation": False}, "implementation"), ({"implementation": "cuda"}, "implementation"),
    ({"fused": True, "foreach": True}, "both"), ({"foreach": "yes"}, "foreach"),
    ({"weight_decay_mode": "l2"}, "weight_decay_mode"), ({"min_trust_ratio": -1.0}, "min_trust_ratio"),
    ({"min_trust_ratio": 2.0, "max_trust_ratio": 1.0}, "min_trust_ratio"), ({"master_weights": "yes"}, "master"),
    ({"skip_nonfinite": 1}, "skip_nonfinite"), ({"capturable": None}, "capturable"),
    ({"lr": 0.1, "learning_rate": 0.2}, "not both"), ({"eps": 1e-3, "epsilon": 1e-4}, "not both"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_CONSTRUCTOR, ids=[str(k) for k, _ in BAD_CONSTRUCTOR])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lamb(_model().parameters(), **kwargs)


BAD_EDITS = [  # (what is edited after construction, the error's words)
    (lambda o: o.param_groups[0].__setitem__("epsilon", float("nan")), "epsilon"),
    (lambda o: o.param_groups[0].__setitem__("eps", -1.0), "epsilon"),
    (lambda o: o.param_groups[0].__setitem__("weight_decay", -0.1), "weight_decay"),
    (lambda o: o.param_groups[0].__setitem__("weight_decay_mode", "l2"), "weight_decay_mode"),
    (lambda o: o.param_groups[0].__setitem__("layer_adaptation", "no"), "layer_adaptation"),
    (lambda o: o.param_groups[0].__setitem__("lr", -0.1), "lr"),
    (lambda o: o.param_groups[0].__setitem__("lr", 1e39), "lr"),
    (lambda o: o.param_groups[0].__setitem__("beta_2", 0.99999999), "beta_2"),
    (lambda o: o.param_groups[0].__setitem__("betas", (0.9, 1.0)), "beta_2"),
    (lambda o: o.param_groups[0].__setitem__("betas", 0.9), "betas"),
    (lambda o: o.param_groups[0].__setitem__("min_trust_ratio", -1.0), "min_trust_ratio"),
    (lambda o: setattr(o, "clipnorm", -1.0), "clipnorm"),
    (lambda o: setattr(o, "clipvalue", 1.0), "Only one"),
    (lambda o: setattr(o, "loss_scale_factor", 0.0), "loss_scale_factor"),
    (lambda o: setattr(o, "ema_momentum", 2.0), "ema_momentum"),
    (lambda o: setattr(o, "gradient_accumulation_steps", 1), "accumulation"),
    (lambda o: setattr(o, "use_ema", "yes"), "use_ema"),
    (lambda o: setattr(o, "implementation", "magic"), "implementation"),
]


@pytest.mark.parametrize("index", range(len(BAD_EDITS)))
def test_bad_edits_are_refused_before_anything_changes(index):
    edit, match = BAD_EDITS[index]
    model = _model()
    opt = Lamb(model.parameters(), clipnorm=1.0, weight_decay=0.1, use_ema=True)
    _train(model, opt, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy((_flat(model), opt.state_dict()["state"], opt.iterations))
    with pytest.raises(ValueError, match=match):  # an attribute refuses when it is set, a group at the step
        edit(opt)
        opt.step()
    after = (_flat(model), opt.state_dict()["state"], opt.iterations)
    assert torch.equal(before[0], after[0]) and before[2] == after[2]
    for pid, slots in before[1].items():
        assert all(torch.equal(t, after[1][pid][k]) for k, t in slots.items())


def test_bad_gradients_and_parameters_raise_before_anything_changes():
    model = _model()
    opt = Lamb(model.parameters(), weight_decay=0.1)
    _train(model, opt, 1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    twin = copy.deepcopy((model, opt))
    for p in twin[0].parameters():  # a deep copy of a Parameter has no gradient
        p.grad = torch.ones_like(p)
    params[2].grad.data = params[2].grad.data.double()  # torch's setter refuses it; .data does not
    opt.step()  # the gradient is used in its parameter's dtype (the kernel never reads it as float32)
    twin[1].step()
    assert torch.equal(_flat(model), _flat(twin[0])) and opt.iterations == 2
    before = _flat(model)
    params[2].grad = torch.ones_like(params[2])
    params[2].grad.data = torch.ones(7)  # a gradient of another shape raises before anything changes
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert torch.equal(_flat(model), before) and opt.iterations == 2
    base = torch.zeros(20)
    views = [torch.nn.Parameter(base[:12]), torch.nn.Parameter(base[8:])]
    for v in views:
        v.grad = torch.ones_like(v)
    with pytest.raises(ValueError, match="share memory"):
        Lamb(views).step()
    assert not base.any()


def test_use_ema_switched_on_later_starts_the_average_at_the_weights():
    model = _model()
    opt = Lamb(model.parameters())
    _train(model, opt, 2)
    opt.use_ema = True
    _train(model, opt, 1)
    averages = torch.cat([opt.state[p]["average"].flatten() for p in model.parameters()])
    assert (averages - _flat(model)).abs().max() < 0.05 and averages.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda: CosineDecay("0.1", 10), lambda: CosineDecay(0.1, 10, alpha=float("nan")),
    lambda: CosineDecay(0.1, 10, warmup_steps=-1), lambda: torch_lamb.ExponentialDecay(0.1, 10, decay_rate=None),
    lambda: torch_lamb.PolynomialDecay(0.1, 10, cycle="yes"),
], ids=["initial_learning_rate", "alpha", "warmup_steps", "decay_rate", "cycle"])
def test_schedules_check_their_arguments_when_made(make):
    with pytest.raises(ValueError, match=r"must be"):
        make()


def test_fused_on_meta_raises_torchs_runtime_error_naming_the_parameter_and_changes_nothing():
    p = torch.nn.Parameter(torch.empty(4, device="meta"))
    p.grad = torch.ones_like(p)
    opt = Lamb([p], fused=True)
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors of "
                                           r"supported devices: \['cpu'\]\. Received: parameter '0.0' on meta"):
        opt.step()
    assert opt.iterations == 0


def test_an_optimizer_wide_option_in_every_group_is_the_optimizers_and_a_disagreement_is_refused_by_name():
    """torch's tests and ZeroRedundancyOptimizer put constructor options in each group: one value in every
    group is the optimizer's; groups that differ, or a group without it, are refused naming the option."""
    options = {"use_ema": True, "ema_momentum": 0.9, "clipnorm": 0.5, "gradient_accumulation_steps": 2}
    results = []
    for in_groups in (False, True):
        model = _model()
        halves = [list(model[0].parameters()), list(model[2].parameters())]
        if in_groups:
            opt = Lamb([{"params": halves[0], **options}, {"params": halves[1], **options, "weight_decay": 0.0}],
                       learning_rate=0.01)
        else:
            opt = Lamb([{"params": halves[0]}, {"params": halves[1], "weight_decay": 0.0}], learning_rate=0.01,
                       **options)
        assert (opt.use_ema, opt.ema_momentum, opt.clipnorm) == (True, 0.9, 0.5)
        _train(model, opt, 4)
        results.append(torch.cat([_flat(model), *[opt.state[p]["average"].flatten() for p in model.parameters()]]))
    assert torch.equal(results[0], results[1])
    model = _model()
    with pytest.raises(ValueError, match=r"`clipnorm` is an optimizer-wide option: the param groups may carry it "
                                         r"only with one value. Received: clipnorm=0.5, clipnorm=1.0 in param groups"):
        Lamb([{"params": model[0].parameters(), "clipnorm": 0.5}, {"params": model[2].parameters(), "clipnorm": 1.0}])
    with pytest.raises(ValueError, match=r"`use_ema` is an optimizer-wide option.*use_ema=False"):
        Lamb([{"params": model[0].parameters(), "use_ema": True}, {"params": model[2].parameters()}])
    opt = Lamb([{"params": model[0].parameters(), "clipnorm": 0.5}])
    with pytest.raises(ValueError, match=r"`clipnorm` is an optimizer-wide option"):
        opt.add_param_group({"params": model[2].parameters(), "clipnorm": 2.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kw", [{"lr": torch.tensor(0.1, device="meta")},
                                {"lr": lambda: torch.tensor(0.1, device="meta")},
                                {"beta_1": torch.tensor(0.9, device="meta")},
                                {"weight_decay": torch.tensor(0.1, device="meta")}],
                         ids=["lr", "lr_callable", "beta_1", "weight_decay"])
def test_a_meta_tensor_hyperparameter_is_refused_naming_it(kw):
    """A meta tensor has no value: refused by name (it raised torch's "Tensor.item() cannot be called")."""
    model = _model()
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"`{name if name != 'lr' else '(learning_rate|lr)'}` must be .*meta"):
        opt = Lamb(model.parameters(), **kw)
        _train(model, opt, 1)


def test_a_parameter_that_overlaps_itself_or_state_of_another_dtype_is_refused_before_any_write(implementation):
    """An expanded view (stride 0) would be written more than once; a slot whose ``.data`` was given another
    dtype would fail halfway through the step. Both are refused, naming the tensor, and nothing moves."""
    q = torch.nn.Parameter(torch.randn(5))
    expanded = torch.nn.Parameter(torch.randn(4).expand(3, 4))
    opt = Lamb([q, expanded], implementation=implementation)
    q.grad, expanded.grad = torch.ones(5), torch.ones(3, 4)
    before = q.detach().clone()
    with pytest.raises(ValueError, match=r"Parameter '0.1' \(shape \(3, 4\), strides \(0, 1\)\) has elements"):
        opt.step()
    assert torch.equal(q, before) and opt.iterations == 0

    ps = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6))]
    opt = Lamb(ps, implementation=implementation)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[ps[1]]["momentum"].data = opt.state[ps[1]]["momentum"].data.double()
    before = [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()]
    with pytest.raises(ValueError, match=r"State 'momentum' of parameter '0.1' is torch.float64; Lamb keeps "
                                         r"torch.float32 state"):
        opt.step()
    after = [p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and opt.iterations == 1
