"""Trust ratios per slice: a sliced tensor trains exactly as its slices would as parameters of their own."""

from __future__ import annotations

import copy
import pickle

import impls
import pytest
import torch

from torch_lamb import Lamb
from torch_lamb.backends import cpu_kernel

E, ROWS, COLS = 4, 6, 5  # an expert bank [E, ROWS, COLS]
SCALES = (1.0, 30.0, 0.02, 3.0)  # experts of very different sizes: their ratios differ a lot

# How a bank splits, and the same split done by hand (the parts trained as separate parameters).
SPLITS = {
    "per_index_dim0": ({"dim": 0}, lambda t: list(t.unbind(0)), lambda ps: torch.stack(ps, 0)),
    "sizes_dim0": ({"dim": 0, "sizes": [1, 2, 1], "labels": ["a", "b", "c"]},
                   lambda t: list(t.split([1, 2, 1], 0)), lambda ps: torch.cat(ps, 0)),
    "per_index_dim2": ({"dim": -1}, lambda t: list(t.unbind(2)), lambda ps: torch.stack(ps, 2)),
    "sizes_dim1": ({"dim": 1, "sizes": [2, 3, 1]}, lambda t: list(t.split([2, 3, 1], 1)), lambda ps: torch.cat(ps, 1)),
}
FEATURES = {
    "plain": {},
    "decay_ema_accumulation": {"weight_decay": 0.1, "use_ema": True, "ema_overwrite_frequency": 3,
                               "gradient_accumulation_steps": 2},
    "adaptive_bounds": {"weight_decay": 0.05, "weight_decay_mode": "adaptive", "min_trust_ratio": 0.5,
                        "max_trust_ratio": 4.0},
    "loss_scale_clipvalue": {"loss_scale_factor": 8.0, "clipvalue": 0.5, "weight_decay": 0.01},
    "global_clipnorm": {"global_clipnorm": 0.5, "use_ema": True},
}


def _bank(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, ROWS, COLS, generator=g) * torch.tensor(SCALES).view(E, 1, 1)
    return w.to(dtype)


def _grads(steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(E, ROWS, COLS, generator=g) * 0.1).to(dtype) for _ in range(steps)]


def _train_sliced(impl: str, split: str, cfg: dict, dtype=torch.float32, steps: int = 6, **kw):
    bank = torch.nn.Parameter(_bank(dtype))
    dense = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)).to(dtype))
    opt = Lamb([("experts", bank), ("dense", dense)], learning_rate=0.01, implementation=impl, **cfg, **kw)
    opt.set_trust_ratio_slices(var_names=["experts"], **SPLITS[split][0])
    for g in _grads(steps, dtype):
        bank.grad, dense.grad = g.clone(), g[0, :3, :4].clone()
        opt.step()
    return bank, dense, opt


def _train_parts(impl: str, split: str, cfg: dict, dtype=torch.float32, steps: int = 6, **kw):
    cut, _ = SPLITS[split][1], SPLITS[split][2]
    parts = [torch.nn.Parameter(t.clone()) for t in cut(_bank(dtype))]
    dense = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)).to(dtype))
    named = [(f"experts{k}", p) for k, p in enumerate(parts)] + [("dense", dense)]
    opt = Lamb(named, learning_rate=0.01, implementation=impl, **cfg, **kw)
    for g in _grads(steps, dtype):
        for p, gp in zip(parts, cut(g), strict=True):
            p.grad = gp.clone()
        dense.grad = g[0, :3, :4].clone()
        opt.step()
    return parts, dense, opt


def _contiguous_split(split: str) -> bool:
    return SPLITS[split][0]["dim"] == 0


def _kernel_takes(split: str) -> bool:
    """Slices along the last dim are single elements apart: the kernel refuses them (auto takes foreach)."""
    return split != "per_index_dim2"


def _check_equal(impl: str, split: str, got: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Bit for bit on the reference backend; rtol 1e-6 elsewhere, 1e-5 for strided slices (dim > 0), whose
    norms the torch ops sum in another order than those of a contiguous tensor (1 ulp per step)."""
    want = SPLITS[split][2]([p.detach() for p in parts])
    if impl == "reference":
        assert torch.equal(got.detach(), want), (got.detach() - want).abs().max()
    else:
        rtol = 1e-6 if _contiguous_split(split) else 1e-5
        torch.testing.assert_close(got.detach(), want, rtol=rtol, atol=rtol / 10)


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_a_sliced_tensor_trains_as_its_slices_would_as_parameters(implementation, split, features) -> None:
    """Bit for bit on the reference backend, rtol 1e-6 on the others; the state too."""
    impl = implementation
    if impl == "fused" and not _kernel_takes(split):
        impl = "foreach"  # slices one element wide: the kernel refuses them (tested below), auto takes foreach
    cfg = FEATURES[features]
    bank, dense, opt = _train_sliced("auto" if impl != implementation else impl, split, cfg)
    parts, pdense, popt = _train_parts(impl, split, cfg)
    _check_equal(implementation, split, bank, parts)
    _check_equal(implementation, "sizes_dim0", dense.unsqueeze(0), [pdense.unsqueeze(0)])
    for key in opt.state[bank]:
        _check_equal(implementation, split, opt.state[bank][key], [popt.state[p][key] for p in parts])
    assert opt.iterations == popt.iterations


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", ["per_index_dim0", "sizes_dim1"])
def test_low_precision_with_master_weights(implementation, split, dtype) -> None:
    reason = impls.refusal(implementation, dtype)
    if reason:
        pytest.skip(reason)
    strided = implementation == "fused" and not _kernel_takes(split)
    cfg = {"weight_decay": 0.1, "use_ema": True, "master_weights": True, "gradient_accumulation_steps": 2}
    bank, _, opt = _train_sliced("auto" if strided else implementation, split, cfg, dtype)
    parts, _, popt = _train_parts("foreach" if strided else implementation, split, cfg, dtype)
    _check_equal(implementation, split, bank, parts)
    masters = [popt.state[p]["master_weight"] for p in parts]
    _check_equal(implementation, split, opt.state[bank]["master_weight"], masters)


def test_per_slice_ratios_differ_from_one_ratio_for_the_tensor(implementation) -> None:
    """The check that slicing is not ignored: one ratio per expert moves the bank differently."""
    bank, _, _ = _train_sliced(implementation, "per_index_dim0", {}, steps=2)
    whole = torch.nn.Parameter(_bank())
    wopt = Lamb([whole], learning_rate=0.01, implementation=implementation)
    for g in _grads(2):
        whole.grad = g.clone()
        wopt.step()
    assert (bank.detach() - whole.detach()).abs().max() > 1e-3


def test_exclusions_and_layer_adaptation_off_apply_to_every_slice(implementation) -> None:
    """Excluded from adaptation, every slice takes ratio 1: the bank equals an unsliced excluded bank."""
    bank, _, opt = _train_sliced(implementation, "per_index_dim0", {"weight_decay": 0.1})
    opt.track_trust_ratios(True)
    opt.exclude_from_layer_adaptation(var_names=["experts"])
    opt.exclude_from_weight_decay(var_names=["experts"])
    bank.grad = torch.ones_like(bank)
    opt.step()
    ratios = opt.last_trust_ratios()
    assert [float(ratios[f"experts[{k}]"].ratio) for k in range(E)] == [1.0] * E
    assert float(ratios["dense"].ratio) != 1.0


@pytest.mark.parametrize("split", ["per_index_dim0", "sizes_dim1"])
def test_clipnorm_stays_per_tensor(implementation, split) -> None:
    """clipnorm scales the whole bank by its own norm (as Keras), then each slice takes its ratio."""
    strided = implementation == "fused" and not _kernel_takes(split)
    impl = "foreach" if strided else implementation
    bank, _, _ = _train_sliced("auto" if strided else impl, split, {"clipnorm": 0.3}, steps=3)
    cut = SPLITS[split][1]
    parts = [torch.nn.Parameter(t.clone()) for t in cut(_bank())]
    dense = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    popt = Lamb([*parts, dense], learning_rate=0.01, implementation=impl)
    for g in _grads(3):
        factor = 0.3 / max(float(torch.linalg.vector_norm(g.double())), 0.3)  # the bank's own norm
        for p, gp in zip(parts, cut(g), strict=True):
            p.grad = gp * factor
        dg = g[0, :3, :4]
        dense.grad = dg * (0.3 / max(float(torch.linalg.vector_norm(dg.double())), 0.3))
        popt.step()
    torch.testing.assert_close(bank.detach(), SPLITS[split][2]([p.detach() for p in parts]), rtol=1e-6, atol=1e-7)


def test_fused_takes_foreach_for_slices_one_element_wide() -> None:
    if "fused" not in impls.available():
        pytest.skip("no CPU kernel")
    fused = _train_sliced("fused", "per_index_dim2", {}, steps=2)[0].detach()
    foreach = _train_sliced("foreach", "per_index_dim2", {}, steps=2)[0].detach()
    assert not torch.equal(fused, _bank(torch.float32))
    assert torch.equal(fused, foreach)


@pytest.mark.parametrize("split", ["per_index_dim0", "sizes_dim1"])
def test_slices_run_in_the_kernel(monkeypatch, split) -> None:
    """Along dim 0 a slice is one contiguous run; along dim 1 it is one run per outer index, each tagged
    with its slot, so that the kernel sums one ratio per slice (no Python loop over slices)."""
    if "fused" not in impls.available():
        pytest.skip("no CPU kernel")
    ran: list[tuple[str, int, int]] = []
    real = cpu_kernel.call_kernel
    monkeypatch.setattr(cpu_kernel, "call_kernel", lambda name, b, kernel=None: (
        ran.append((name, b.n, b.slots if b.group else b.n)), real(name, b, kernel)))
    _train_sliced("auto", split, {"global_clipnorm": 1.0, "gradient_accumulation_steps": 2}, steps=4)
    slots = 1 + (E if split == "per_index_dim0" else 3)  # the dense tensor and the slices
    runs = slots if split == "per_index_dim0" else 1 + 3 * E  # dim 1 of [E, ...]: one run per expert and slice
    assert [r for r in ran if r[0] == "lamb_fused"] == [("lamb_fused", runs, slots)] * 2
    assert [r for r in ran if r[0] == "lamb_grad_sums"] == [("lamb_grad_sums", runs, slots)] * 2
    assert [r for r in ran if r[0] == "lamb_accumulate"] == [("lamb_accumulate", runs, slots)] * 2


def test_telemetry_names_one_ratio_per_slice() -> None:
    for split, names in (("per_index_dim0", [f"experts[{k}]" for k in range(E)]),
                         ("sizes_dim0", ["experts.a", "experts.b", "experts.c"])):
        bank, dense, opt = _train_sliced("auto", split, {}, steps=1)
        opt.track_trust_ratios(True)
        bank.grad, dense.grad = torch.ones_like(bank), torch.ones_like(dense)
        w_before = SPLITS[split][1](bank.detach().clone())
        opt.step()
        records = opt.last_trust_ratios()
        assert sorted(records) == sorted([*names, "dense"])
        # each slice's ratio is its own ||w|| / ||u||, recomputed here from its weights before the step
        for name, w in zip(names, w_before, strict=True):
            torch.testing.assert_close(records[name].weight_norm, torch.linalg.vector_norm(w), rtol=1e-6, atol=0)
            torch.testing.assert_close(records[name].ratio, records[name].weight_norm / records[name].update_norm)
        assert len({round(float(records[n].ratio), 6) for n in names}) == len(names)


def test_hf_callback_logs_one_ratio_per_slice() -> None:
    pytest.importorskip("transformers")
    from torch_lamb.integrations.huggingface import LambCallback

    bank, dense, opt = _train_sliced("auto", "per_index_dim0", {}, steps=1)
    cb = LambCallback(opt, log_trust_ratios=True)
    cb.on_train_begin(None, None, None)
    bank.grad, dense.grad = torch.ones_like(bank), torch.ones_like(dense)
    opt.step()
    logs: dict[str, float] = {}
    cb.on_log(None, None, None, logs=logs)
    assert sorted(logs) == sorted([f"trust_ratio/experts[{k}]" for k in range(E)] + ["trust_ratio/dense"])
    assert logs["trust_ratio/experts[1]"] == pytest.approx(float(opt.last_trust_ratios()["experts[1]"].ratio))


def test_a_group_option_equals_the_method_and_dim_none_undoes_it() -> None:
    _, _, ref = _train_sliced("auto", "sizes_dim0", {}, steps=3)
    ref_bank = ref.param_groups[0]["params"][0]
    bank = torch.nn.Parameter(_bank())
    dense = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    opt = Lamb([{"params": [("experts", bank)], "trust_ratio_slices": SPLITS["sizes_dim0"][0]},
                {"params": [("dense", dense)]}], learning_rate=0.01)
    for g in _grads(3):
        bank.grad, dense.grad = g.clone(), g[0, :3, :4].clone()
        opt.step()
    assert torch.equal(bank.detach(), ref_bank.detach())
    assert opt.param_groups[0]["trust_ratio_slices"] == [(0, (1, 2, 1), ("a", "b", "c"))]
    assert opt.param_groups[1]["trust_ratio_slices"] == [None]
    opt.set_trust_ratio_slices([bank], dim=None)
    assert opt.param_groups[0]["trust_ratio_slices"] == [None]
    opt.track_trust_ratios(True)
    bank.grad, dense.grad = torch.ones_like(bank), torch.ones_like(dense)
    opt.step()
    assert sorted(opt.last_trust_ratios()) == ["dense", "experts"]


def test_state_dict_and_pickle_keep_the_slices_and_resume_exactly() -> None:
    grads = _grads(6)
    bank, dense, opt = _train_sliced("auto", "sizes_dim0", {"use_ema": True}, steps=0)
    for g in grads[:3]:
        bank.grad, dense.grad = g.clone(), g[0, :3, :4].clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin_bank, twin_dense = torch.nn.Parameter(bank.detach().clone()), torch.nn.Parameter(dense.detach().clone())
    twin = Lamb([("experts", twin_bank), ("dense", twin_dense)], learning_rate=0.01, use_ema=True)
    twin.load_state_dict(saved)  # the slices come from the checkpoint
    assert twin.param_groups[0]["trust_ratio_slices"] == opt.param_groups[0]["trust_ratio_slices"]
    pickled_bank, pickled_dense, pickled = pickle.loads(pickle.dumps((bank, dense, opt)))
    for g in grads[3:]:
        for b, d, o in ((bank, dense, opt), (twin_bank, twin_dense, twin), (pickled_bank, pickled_dense, pickled)):
            b.grad, d.grad = g.clone(), g[0, :3, :4].clone()
            o.step()
    assert torch.equal(twin_bank.detach(), bank.detach())
    assert torch.equal(pickled_bank.detach(), bank.detach())
    assert pickled.param_groups[0]["trust_ratio_slices"][0][2] == ("a", "b", "c")


BAD_SLICES = [
    ({"dim": 3}, "`dim` must be in \\[-3, 3\\) for parameter 'experts' of shape \\(4, 6, 5\\); received dim=3"),
    ({"dim": -4}, "`dim` must be in \\[-3, 3\\)"),
    ({"dim": 0.0}, "`dim` must be an int"),
    ({"dim": True}, "`dim` must be an int"),
    ({"dim": 0, "sizes": [1, 2]}, "`sizes` must sum to the size of dim 0 of parameter 'experts' \\(4, shape"),
    ({"dim": 0, "sizes": [2, 2.0]}, "`sizes` must be a non-empty list of positive ints"),
    ({"dim": 0, "sizes": [4, 0]}, "`sizes` must be a non-empty list of positive ints"),
    ({"dim": 0, "sizes": []}, "`sizes` must be a non-empty list"),
    ({"dim": 0, "sizes": "4"}, "`sizes` must be a non-empty list"),
    ({"dim": 0, "labels": ["a", "b"]}, "`labels` must name each of the 4 slices"),
    ({"dim": 0, "sizes": [2, 2], "labels": ["a", "a"]}, "`labels` must name each of the 2 slices"),
    ({"dim": 0, "sizes": [2, 2], "labels": ["a", ""]}, "`labels` must be a list of non-empty strings"),
    ({"dim": None, "sizes": [2, 2]}, "`sizes` and `labels` need a `dim`"),
]


@pytest.mark.parametrize("spec, message", BAD_SLICES, ids=[str(i) for i in range(len(BAD_SLICES))])
def test_bad_slices_raise_at_the_call_and_change_nothing(spec, message) -> None:
    _, _, opt = _train_sliced("auto", "per_index_dim0", {}, steps=1)
    before = copy.deepcopy(opt.param_groups[0]["trust_ratio_slices"])
    with pytest.raises(ValueError, match=message):
        opt.set_trust_ratio_slices(var_names=["experts|dense"], **spec)  # dense would take it: checked first
    assert opt.param_groups[0]["trust_ratio_slices"] == before


def test_bad_selections_and_group_options_raise() -> None:
    bank, dense, opt = _train_sliced("auto", "per_index_dim0", {}, steps=0)
    with pytest.raises(ValueError, match="give the parameters to slice"):
        opt.set_trust_ratio_slices(dim=0)
    with pytest.raises(ValueError, match="select no parameter"):
        opt.set_trust_ratio_slices(var_names=["nothing_is_named_so"], dim=0)
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        opt.set_trust_ratio_slices([torch.zeros(2)], dim=0)
    with pytest.raises(ValueError, match="0-dimensional"):
        Lamb([{"params": [torch.nn.Parameter(torch.tensor(1.0))], "trust_ratio_slices": 0}])
    with pytest.raises(ValueError, match="lists 1 specs for 2 parameters"):
        Lamb([{"params": [bank, dense], "trust_ratio_slices": [0]}])
    with pytest.raises(ValueError, match="a dict with 'dim'"):
        Lamb([{"params": [bank], "trust_ratio_slices": {"sizes": [4]}}])
    with pytest.raises(ValueError, match=r"dim 0 of parameter '0\.0' has size 0"):
        Lamb([{"params": [torch.nn.Parameter(torch.zeros(0, 3))], "trust_ratio_slices": 0}])


def test_a_bad_checkpoint_spec_raises_before_loading() -> None:
    _, _, opt = _train_sliced("auto", "per_index_dim0", {}, steps=1)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["trust_ratio_slices"] = [{"dim": 0, "sizes": [5], "labels": None}, None]
    other_bank = torch.nn.Parameter(_bank())
    other = Lamb([("experts", other_bank), ("dense", torch.nn.Parameter(torch.zeros(3, 4)))])
    with pytest.raises(ValueError, match="`sizes` must sum to the size of dim 0"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["trust_ratio_slices"] == [None, None]
    assert other.state[other_bank]["momentum"].abs().sum() == 0


@pytest.mark.parametrize("split", ["per_index_dim0", "sizes_dim1"])
def test_huge_slices_are_summed_again_in_double(implementation, split) -> None:
    """A slice whose float32 sums of squares overflow (weights near 1e30) is re-summed in double, run by run
    in the kernel: its ratio stays finite and equals the reference's; the other slices are unaffected."""
    impl = implementation
    results = []
    for backend in (impl, "reference"):
        bank = torch.nn.Parameter(_bank() * torch.tensor([1e30, 1.0, 1.0, 1.0]).view(E, 1, 1))
        opt = Lamb([("experts", bank)], learning_rate=0.01, weight_decay=0.01, implementation=backend)
        opt.set_trust_ratio_slices([bank], **SPLITS[split][0])
        opt.track_trust_ratios(True)
        for g in _grads(2):
            bank.grad = g.clone()
            opt.step()
        results.append((bank.detach().clone(), {n: float(r.ratio) for n, r in opt.last_trust_ratios().items()}))
    (got, got_ratios), (want, want_ratios) = results
    assert all(torch.isfinite(torch.tensor(list(got_ratios.values()))))
    assert got_ratios == pytest.approx(want_ratios, rel=1e-5)
    if split == "per_index_dim0":
        assert 1e29 < got_ratios["experts[0]"] < 1e31
    scale = want.abs().amax(dim=(1, 2), keepdim=True)  # per expert: elements near 0 cancel at 1e30
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-5, atol=1e-6)


def test_checkpoints_without_slices_keep_the_live_ones_and_group_specs_are_normalised() -> None:
    bank, dense, opt = _train_sliced("auto", "per_index_dim0", {}, steps=1)
    sd = copy.deepcopy(opt.state_dict())
    live = opt.param_groups[0]["trust_ratio_slices"]
    del sd["param_groups"][0]["trust_ratio_slices"]  # saved before trust-ratio slices existed
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["trust_ratio_slices"] == live == [(0, None, None), None]
    sd["param_groups"][0]["trust_ratio_slices"] = {"dim": 1}  # a group-level spec: one per parameter, checked
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["trust_ratio_slices"] == [(1, None, None), (1, None, None)]
    opt.track_trust_ratios(True)
    bank.grad, dense.grad = torch.ones_like(bank), torch.ones_like(dense)
    opt.step()
    assert sorted(opt.last_trust_ratios()) == sorted([f"experts[{k}]" for k in range(ROWS)]
                                                     + [f"dense[{k}]" for k in range(4)])
    saved = opt.state_dict()["param_groups"][0]["trust_ratio_slices"]
    saved[0] = None  # the state dict holds copies
    assert opt.param_groups[0]["trust_ratio_slices"][0] == (1, None, None)


@pytest.mark.parametrize("edit, message", [
    (5, "`dim` must be in \\[-3, 3\\) for parameter 'experts'"),
    ([0], "lists 1 specs for 2 parameters"),
    ([0, 0, 0], "lists 3 specs for 2 parameters"),
    ([{"dim": 0, "sizes": [3]}, None], "`sizes` must sum to the size of dim 0 of parameter 'experts'"),
])
def test_an_edited_group_is_checked_at_the_next_step_before_any_change(edit, message) -> None:
    bank, dense, opt = _train_sliced("auto", "per_index_dim0", {}, steps=1)
    before = [bank.detach().clone(), opt.state[bank]["momentum"].clone()]
    opt.param_groups[0]["trust_ratio_slices"] = edit
    bank.grad, dense.grad = torch.ones_like(bank), torch.ones_like(dense)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(bank.detach(), before[0]) and torch.equal(opt.state[bank]["momentum"], before[1])
    assert opt.iterations == 1


def test_labels_and_sizes_must_be_lists_not_strings() -> None:
    _, _, opt = _train_sliced("auto", "per_index_dim0", {}, steps=0)
    with pytest.raises(ValueError, match="`labels` must be a list of non-empty strings"):
        opt.set_trust_ratio_slices(var_names=["experts"], dim=0, sizes=[2, 2], labels="ab")


def test_slices_the_kernel_refuses_do_not_take_other_tensors_with_them(monkeypatch) -> None:
    """Slices one element wide go to foreach in a bucket of their own: the dense tensor stays in the kernel."""
    if "fused" not in impls.available():
        pytest.skip("no CPU kernel")
    ran: list[tuple[str, int]] = []
    real = cpu_kernel.call_kernel
    monkeypatch.setattr(cpu_kernel, "call_kernel",
                        lambda name, b, kernel=None: (ran.append((name, b.n)), real(name, b, kernel)))
    _train_sliced("auto", "per_index_dim2", {}, steps=2)
    assert ran == [("lamb_fused", 1)] * 2  # the dense tensor alone


def test_a_checkpoint_with_slices_loads_with_weights_only(tmp_path) -> None:
    """The specs are plain tuples: torch.load(weights_only=True) takes them, and they come back as saved."""
    bank, dense, opt = _train_sliced("auto", "sizes_dim0", {}, steps=1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["trust_ratio_slices"] == [(0, (1, 2, 1), ("a", "b", "c")), None]
    twin = Lamb([("experts", torch.nn.Parameter(bank.detach().clone())),
                 ("dense", torch.nn.Parameter(dense.detach().clone()))], learning_rate=0.01)
    twin.load_state_dict(loaded)
    assert twin.param_groups[0]["trust_ratio_slices"] == opt.param_groups[0]["trust_ratio_slices"]
