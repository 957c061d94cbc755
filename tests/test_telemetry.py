"""Trust-ratio telemetry: opt-in, independent of the checkpoint, right under accumulation."""

import copy
import pickle

import pytest
import torch
from torch import nn

from torch_lamb import Lamb
from torch_lamb.telemetry import TrustRatio, trust_ratio_table


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def test_ratios_equal_norm_quotient_recomputed_independently(implementation: str) -> None:
    model = _model()
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-7, 0.1
    opt = Lamb(model.named_parameters(), learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps,
               weight_decay=wd, implementation=implementation)
    opt.track_trust_ratios(True)
    assert opt.tracking_trust_ratios
    assert opt.last_trust_ratios() == {}
    _grads(model, 1)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
    opt.step()
    recs = opt.last_trust_ratios()
    assert list(recs) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        # First step: m_hat = g, v_hat = g^2; decoupled decay is applied to w before the norm.
        w = before[name] * (1 - wd * lr)
        g = grads[name]
        u = g / (g.abs() + eps)
        expected = w.norm() / u.norm()
        rec = recs[name]
        assert isinstance(rec, TrustRatio)
        assert rec.ratio.dim() == 0
        torch.testing.assert_close(rec.weight_norm.double(), w.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(rec.update_norm.double(), u.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(rec.ratio.double(), expected, rtol=1e-5, atol=0)
        # And the weights really moved by lr * ratio * u.
        torch.testing.assert_close(p.detach().double(), w - lr * expected * u, rtol=1e-5, atol=1e-7)
    table = trust_ratio_table(recs)
    assert table["0.weight"][0] == pytest.approx(float(recs["0.weight"].ratio))
    assert all(isinstance(v, float) for row in table.values() for v in row)


def test_off_by_default_and_no_recording_when_off() -> None:
    model = _model()
    opt = Lamb(model.parameters(), learning_rate=0.01)
    assert not opt.tracking_trust_ratios
    _grads(model, 1)
    opt.step()
    assert not opt.tracking_trust_ratios  # a step does not switch it on
    with pytest.raises(RuntimeError, match="track_trust_ratios"):
        opt.last_trust_ratios()
    with pytest.raises(ValueError, match="enabled"):
        opt.track_trust_ratios("yes")  # type: ignore[arg-type]
    # Unnamed parameters are named "<group>.<index>".
    opt.track_trust_ratios()
    _grads(model, 2)
    opt.step()
    assert list(opt.last_trust_ratios()) == ["0.0", "0.1", "0.2", "0.3"]
    opt.track_trust_ratios(False)
    with pytest.raises(RuntimeError):
        opt.last_trust_ratios()


def test_not_in_state_dict_and_checkpoint_unchanged() -> None:
    m1, m2 = _model(), _model()
    o1 = Lamb(m1.named_parameters(), learning_rate=0.01)
    o2 = Lamb(m2.named_parameters(), learning_rate=0.01)
    o1.track_trust_ratios(True)
    for s in range(3):
        _grads(m1, s)
        o1.step()
        _grads(m2, s)
        o2.step()
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert sd1["state"].keys() == sd2["state"].keys()
    for k in sd1["state"]:
        assert sd1["state"][k].keys() == sd2["state"][k].keys()
        for key in sd1["state"][k]:
            torch.testing.assert_close(sd1["state"][k][key], sd2["state"][k][key], rtol=0, atol=0)
    # Tracking does not change the arithmetic.
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    # Loading a state dict into a tracking optimizer keeps tracking (telemetry is not state).
    o1.load_state_dict(sd2)
    assert o1.tracking_trust_ratios
    # Pickled / deep-copied optimizers do not carry telemetry.
    assert not pickle.loads(pickle.dumps(o1)).tracking_trust_ratios
    assert not copy.deepcopy(o1).tracking_trust_ratios


def test_accumulation_micro_steps_keep_last_update() -> None:
    model = _model()
    opt = Lamb(model.named_parameters(), learning_rate=0.01, gradient_accumulation_steps=3)
    opt.track_trust_ratios(True)
    _grads(model, 0)
    opt.step()
    assert opt.last_trust_ratios() == {}  # no update yet
    _grads(model, 1)
    opt.step()
    assert opt.last_trust_ratios() == {}
    _grads(model, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()  # the update, with the mean of the three gradients
    first = {n: r.ratio.clone() for n, r in opt.last_trust_ratios().items()}
    moved = {n: (p.detach() - before[n]).norm() for n, p in model.named_parameters()}
    for name, r in opt.last_trust_ratios().items():
        # ||delta w|| = lr * ratio * ||u|| (no weight decay).
        torch.testing.assert_close(moved[name], 0.01 * r.ratio * r.update_norm, rtol=1e-4, atol=0)
        torch.testing.assert_close(r.weight_norm, before[name].norm(), rtol=1e-6, atol=0)
    for s in (3, 4):  # non-update micro-steps keep the values of the last update
        _grads(model, s)
        opt.step()
        for name, r in opt.last_trust_ratios().items():
            torch.testing.assert_close(r.ratio, first[name], rtol=0, atol=0)
    _grads(model, 5)
    opt.step()  # second update: new values
    second = {n: r.ratio for n, r in opt.last_trust_ratios().items()}
    assert any(not torch.equal(second[n], first[n]) for n in first)


def test_groups_are_all_reported_and_a_new_step_replaces_the_old() -> None:
    model = _model()
    params = list(model.parameters())
    opt = Lamb([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], learning_rate=0.01)
    opt.track_trust_ratios(True)
    _grads(model, 0)
    opt.step()
    assert list(opt.last_trust_ratios()) == ["0.0", "0.1", "1.0", "1.1"]
    # A step where only the first group has gradients reports only those.
    model.zero_grad(set_to_none=True)
    model[0](torch.randn(2, 5)).sum().backward()
    opt.step()
    assert list(opt.last_trust_ratios()) == ["0.0", "0.1"]
