"""Beyond Keras: adaptive weight decay, adaptation exclusions, trust-ratio bounds, the transformer recipe."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

import torch_lamb
from torch_lamb import Lamb

LR, BETAS, EPS, WD = 0.01, (0.9, 0.999), 1e-6, 0.1


def _load_timm_lamb():
    """timm's ``optim/lamb.py`` without running ``timm/__init__`` (it imports torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    saved = {k: v for k, v in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    try:
        for k in saved:
            del sys.modules[k]
        for name, path in (("timm", root), ("timm.optim", root / "optim")):
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
        import timm.optim.lamb as timm_lamb

        return timm_lamb.Lamb
    except ImportError:  # a timm whose lamb.py needs more than torch
        return None
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


TIMM_LAMB = _load_timm_lamb()


def _params(dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (4, 6), (4,), (3, 3, 2)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _grads(n: int, like: list[torch.Tensor], seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in like] for _ in range(n)]


def _run(opt, params, grads) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


class _Recorder(Lamb):
    """Lamb that tracks its trust ratios (the public telemetry) and shows the last update's as floats."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.track_trust_ratios(True)

    @property
    def last(self) -> dict[str, float]:
        return {name: float(record.ratio) for name, record in self.last_trust_ratios().items()}


# ------------------------------------------------------------------ weight_decay_mode="adaptive"


@pytest.mark.skipif(TIMM_LAMB is None, reason="timm is not installed (pip install --no-deps timm)")
def test_adaptive_matches_timm():
    """timm ``Lamb(bias_correction=True, always_adapt=True, max_grad_norm=None)`` is the paper's update."""
    ours, theirs = _params(), _params()
    grads = _grads(25, ours)
    opt = Lamb(ours, learning_rate=LR, betas=BETAS, epsilon=EPS, weight_decay=WD, weight_decay_mode="adaptive")
    opt.exclude_from_weight_decay(var_list=[ours[1], ours[3]])  # the biases
    ref = TIMM_LAMB(
        [{"params": [theirs[i] for i in (0, 2, 4)]}, {"params": [theirs[1], theirs[3]], "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, bias_correction=True, always_adapt=True,
        max_grad_norm=None, foreach=False,
    )
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    # The test can tell the modes apart: Keras's decoupled decay lands far outside that tolerance.
    keras = _params()
    opt = Lamb(keras, learning_rate=LR, betas=BETAS, epsilon=EPS, weight_decay=WD)
    opt.exclude_from_weight_decay(var_list=[keras[1], keras[3]])
    _run(opt, keras, grads)
    assert (keras[0] - theirs[0]).abs().max() > 1e-3


def _optax_reference(params, grads, *, lr, b1, b2, eps, wd, decay):
    """optax ``lamb``: scale_by_adam -> add_decayed_weights -> scale_by_trust_ratio -> scale(-lr), float64."""
    ws = [p.detach().double().clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, gs in enumerate(grads, start=1):
        for i, (w, g) in enumerate(zip(ws, gs)):
            g = g.double()
            ms[i] = (1 - b1) * g + b1 * ms[i]
            vs[i] = (1 - b2) * g * g + b2 * vs[i]
            r = (ms[i] / (1 - b1**t)) / (torch.sqrt(vs[i] / (1 - b2**t)) + eps)
            u = r + wd * w if decay[i] else r
            w_norm, u_norm = torch.linalg.norm(w), torch.linalg.norm(u)
            ratio = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else torch.tensor(1.0, dtype=torch.float64)
            ws[i] = w - lr * ratio * u
    return ws


def test_adaptive_matches_optax_formula():
    params = _params(torch.float64)
    with torch.no_grad():
        params[3].zero_()  # a zero-initialised bias takes ratio 1 on its first step in both
    start = [p.detach().clone() for p in params]
    grads = _grads(30, params)
    opt = Lamb(params, learning_rate=LR, betas=BETAS, epsilon=EPS, weight_decay=WD, weight_decay_mode="adaptive")
    opt.exclude_from_weight_decay(var_list=[params[1]])
    _run(opt, params, grads)
    expected = _optax_reference(start, grads, lr=LR, b1=0.9, b2=0.999, eps=EPS, wd=WD,
                                decay=[True, False, True, True, True])
    for p, e in zip(params, expected):
        # Our scalars are rounded to float32 as Keras rounds them (lr, 1 - beta, beta ** t): ~1e-7.
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=2e-6)
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(params, start))
    assert moved > 0.1


def test_adaptive_without_decay_equals_decoupled():
    """With no weight decay the two modes are the same update (Keras == paper when wd is off)."""
    a, b = _params(), _params()
    grads = _grads(10, a)
    _run(Lamb(a, weight_decay_mode="adaptive"), a, grads)
    _run(Lamb(b), b, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_weight_decay_mode_per_group():
    a, b, c = _params(), _params(), _params()
    grads = _grads(8, a)
    opt = Lamb([{"params": a[:2]}, {"params": a[2:], "weight_decay_mode": "adaptive"}], weight_decay=WD)
    assert [g["weight_decay_mode"] for g in opt.param_groups] == ["decoupled", "adaptive"]
    _run(opt, a, grads)
    _run(Lamb(b, weight_decay=WD), b, grads)
    _run(Lamb(c, weight_decay=WD, weight_decay_mode="adaptive"), c, grads)
    for i in range(2):
        assert torch.equal(a[i], b[i])
    for i in range(2, 5):
        assert torch.equal(a[i], c[i])
    assert not torch.equal(b[2], c[2])


# ------------------------------------------------------------------ exclusion from layer adaptation


def _first_step_expected(w, g, *, lr, eps, ratio_one):
    """One Keras step from zero moments, float64: m = 0.1 g, v = 0.001 g^2."""
    w, g = w.double(), g.double()
    m, v = 0.1 * g, 0.001 * g * g
    u = (m / 0.1) / (torch.sqrt(v / 0.001) + eps)
    ratio = 1.0 if ratio_one else torch.linalg.norm(w) / torch.linalg.norm(u)
    return w - lr * ratio * u


def test_excluded_tensors_take_ratio_one():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _Recorder(model.named_parameters(), learning_rate=LR, epsilon=EPS)
    opt.exclude_from_layer_adaptation(var_names=["bias"])
    grads = dict(zip(start, _grads(1, list(start.values()))[0]))
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    assert opt.last["0.bias"] == 1.0 and opt.last["1.bias"] == 1.0
    assert opt.last["0.weight"] != 1.0 and opt.last["1.weight"] != 1.0
    for n, p in model.named_parameters():
        expected = _first_step_expected(start[n], grads[n], lr=LR, eps=EPS, ratio_one=n.endswith("bias"))
        torch.testing.assert_close(p.detach().double(), expected, rtol=2e-6, atol=1e-7)
    # An excluded bias moves by about lr per element (plain Adam), an adapted one by lr * ||w|| / ||u||.
    assert torch.allclose((model[0].bias - start["0.bias"]).abs(), torch.full((4,), LR), rtol=1e-3)


def test_adaptation_exclusion_by_identity_and_reset():
    params = _params()
    opt = _Recorder(params)
    opt.exclude_from_layer_adaptation(var_list=[params[0]])
    assert opt.param_groups[0]["exclude_from_layer_adaptation"] == [True, False, False, False, False]
    _run(opt, params, _grads(1, params))
    assert opt.last["0.0"] == 1.0 and opt.last["0.2"] != 1.0
    opt.exclude_from_layer_adaptation()  # each call replaces the previous exclusions, as in Keras
    assert opt.param_groups[0]["exclude_from_layer_adaptation"] == [False] * 5
    _run(opt, params, _grads(1, params))
    assert opt.last["0.0"] != 1.0
    with pytest.raises(ValueError, match="var_list"):
        opt.exclude_from_layer_adaptation(var_list=[torch.zeros(2)])
    with pytest.raises(ValueError, match="named parameters"):
        opt.exclude_from_layer_adaptation(var_names=["bias"])


def test_adaptation_and_decay_exclusions_are_independent():
    model = torch.nn.Linear(4, 3)
    opt = Lamb(model.named_parameters(), weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.exclude_from_layer_adaptation(var_names=["weight"])
    group = opt.param_groups[0]
    assert group["exclude_from_weight_decay"] == [False, True]
    assert group["exclude_from_layer_adaptation"] == [True, False]


def test_group_without_layer_adaptation():
    params = _params()
    opt = _Recorder([{"params": params[:2], "layer_adaptation": False}, {"params": params[2:]}])
    _run(opt, params, _grads(1, params))
    assert opt.last["0.0"] == 1.0 and opt.last["0.1"] == 1.0
    assert opt.last["1.0"] != 1.0


class _TinyRMSNorm(torch.nn.Module):  # a custom norm, recognised by its class name
    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_transformer_recipe():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8), torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
        _TinyRMSNorm(8), torch.nn.Linear(8, 10),
    )
    model[3].weight.requires_grad_(False)  # frozen parameters stay out
    groups = torch_lamb.transformer_recipe(model)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names[0] == ["0.weight", "1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight",
                        "1.linear1.weight", "1.linear2.weight"]
    assert names[1] == ["1.self_attn.in_proj_bias", "1.self_attn.out_proj.bias", "1.linear1.bias",
                        "1.linear2.bias", "1.norm1.weight", "1.norm1.bias", "1.norm2.weight", "1.norm2.bias",
                        "2.scale", "3.bias"]
    assert groups[1]["weight_decay"] is None and groups[1]["layer_adaptation"] is False

    opt = _Recorder(groups, learning_rate=LR, weight_decay=0.01)
    x = torch.randint(0, 10, (4, 5))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    norm_before = model[1].norm1.weight.detach().clone()
    opt.step()
    assert opt.last["1.norm1.weight"] == 1.0 and opt.last["2.scale"] == 1.0
    assert opt.param_groups[1]["weight_decay"] is None and opt.param_groups[0]["weight_decay"] == 0.01
    # No decay and ratio 1: a LayerNorm scale of ones moves by about lr per element (Adam's first step).
    moved = (model[1].norm1.weight - norm_before).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], LR), rtol=1e-3)
    keep_ratio = torch_lamb.transformer_recipe(model, exempt_options={"layer_adaptation": True})
    assert keep_ratio[1]["layer_adaptation"] is True


# ------------------------------------------------------------------ trust-ratio bounds


def test_trust_ratio_bounds():
    big = [torch.full((4, 4), 10.0, requires_grad=True), torch.zeros(4, requires_grad=True)]
    grads = [[torch.ones(4, 4), torch.ones(4)]]
    plain = _Recorder(big)
    _run(plain, big, grads)
    assert plain.last["0.0"] == pytest.approx(10.0, rel=1e-5)  # ||w|| / ||u|| with u ~ 1
    assert plain.last["0.1"] == 1.0  # zero weights: ratio 1 (Keras's zero-norm rule)

    w = [torch.full((4, 4), 10.0, requires_grad=True), torch.zeros(4, requires_grad=True)]
    capped = _Recorder(w, max_trust_ratio=0.5, learning_rate=0.01)
    _run(capped, w, grads)
    assert capped.last == {"0.0": 0.5, "0.1": 0.5}  # the bound applies after the zero-norm rule
    # The capped step is exactly lr * 0.5 * u, u = 1 / (1 + 1e-7) in float32.
    u = torch.tensor(1.0) / (torch.tensor(1.0) + 1e-7)
    assert torch.equal(w[0].detach(), torch.full((4, 4), 10.0) - (torch.tensor(0.5) * 0.01) * u)

    small = [torch.full((4, 4), 1e-3, requires_grad=True)]
    floored = _Recorder([{"params": small, "min_trust_ratio": 0.1}])
    _run(floored, small, [[torch.ones(4, 4)]])
    assert floored.last["0.0"] == pytest.approx(0.1)


def test_trust_bounds_do_not_override_exclusions():
    params = [torch.full((3,), 5.0, requires_grad=True)]
    opt = _Recorder(params, min_trust_ratio=2.0, max_trust_ratio=3.0)
    opt.exclude_from_layer_adaptation(var_list=params)
    _run(opt, params, [[torch.ones(3)]])
    assert opt.last["0.0"] == 1.0


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_decay_mode": "l2"}, "weight_decay_mode"),
        ({"weight_decay_mode": None}, "weight_decay_mode"),
        ({"min_trust_ratio": -0.1}, "min_trust_ratio"),
        ({"max_trust_ratio": float("inf")}, "max_trust_ratio"),
        ({"min_trust_ratio": 2.0, "max_trust_ratio": 1.0}, "min_trust_ratio` must be <="),
        ({"master_weights": 1}, "master_weights"),
        ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lamb(_params(), **kwargs)


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"weight_decay_mode": "paper"}, "weight_decay_mode"),
        ({"min_trust_ratio": 3.0}, "min_trust_ratio` must be <="),  # against the optimizer's max of 2
        ({"layer_adaptation": "no"}, "layer_adaptation"),
    ],
)
def test_group_validation_changes_nothing(group, match):
    params = _params()
    opt = Lamb(params[:2], max_trust_ratio=2.0)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params[2:], **group})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ state round trips


def _configured(params):
    opt = Lamb(
        [{"params": params[:3], "weight_decay_mode": "adaptive", "max_trust_ratio": 4.0},
         {"params": params[3:], "layer_adaptation": False}],
        weight_decay=0.05, min_trust_ratio=0.01,
    )
    opt.exclude_from_layer_adaptation(var_list=[params[1]])
    opt.exclude_from_weight_decay(var_list=[params[2]])
    return opt


def test_state_dict_round_trip_of_variant_options():
    a, b = _params(), _params()
    grads = _grads(12, a)
    opt_a = _configured(a)
    _run(opt_a, a, grads)

    opt_b = _configured(b)
    _run(opt_b, b, grads[:6])
    sd = opt_b.state_dict()
    assert sd["param_groups"][0]["exclude_from_layer_adaptation"] == [False, True, False]
    assert sd["param_groups"][0]["weight_decay_mode"] == "adaptive"
    # No variant options here: the state dict brings them back.
    fresh = Lamb([{"params": b[:3]}, {"params": b[3:]}], weight_decay=0.05)
    fresh.load_state_dict(sd)
    g0, g1 = fresh.param_groups
    assert (g0["weight_decay_mode"], g0["max_trust_ratio"], g0["min_trust_ratio"]) == ("adaptive", 4.0, 0.01)
    assert g0["exclude_from_layer_adaptation"] == [False, True, False] and g1["layer_adaptation"] is False
    _run(fresh, b, grads[6:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_old_state_dict_without_variant_keys_loads_with_defaults():
    params = _params()
    opt = Lamb(params)
    _run(opt, params, _grads(2, params))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for key in ("weight_decay_mode", "min_trust_ratio", "max_trust_ratio", "layer_adaptation",
                    "exclude_from_layer_adaptation"):
            del g[key]
    other = Lamb(params, weight_decay_mode="adaptive")
    other.load_state_dict(sd)
    assert other.param_groups[0]["weight_decay_mode"] == "adaptive"
    assert other.param_groups[0]["exclude_from_layer_adaptation"] == [False] * 5
    _run(other, params, _grads(1, params))


def test_pickle_and_config_keep_variant_options():
    params = _params()
    opt = _configured(params)
    _run(opt, params, _grads(2, params))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.param_groups[0]["exclude_from_layer_adaptation"] == [False, True, False]
    assert clone.param_groups[0]["weight_decay_mode"] == "adaptive"
    config = Lamb(_params(), weight_decay_mode="adaptive", max_trust_ratio=1.0, master_weights=True).get_config()
    assert (config["weight_decay_mode"], config["min_trust_ratio"], config["max_trust_ratio"]) == (
        "adaptive", None, 1.0)
    assert config["master_weights"] is True and config["skip_nonfinite"] is False
