"""Bodies of the gloo checks of per-slice trust ratios (run by tests/test_slices_distributed.py).

* :func:`fsdp_worker` (2 ranks): FSDP2 models with an expert bank (aligned Shard(0)) and a fused QKV
  (a shard boundary inside ``k``) equal the single-process run; all-reduce counts; telemetry.
* :func:`mesh_worker` (4 ranks, a 2x2 ``("dp", "tp")`` mesh): sliced and plain DTensors on every mix of
  placements equal plain tensors; all-reduce counts per mesh dim; then a DCP checkpoint for
  :func:`resume_worker` (2 ranks, FSDP2) and :func:`resume_single` (1 process).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import _dist_worker
import torch
import torch.distributed as dist
from _dist_worker import dcp_load, dcp_save, full
from torch import nn

from torch_lamb import ExponentialDecay, Lamb

TOL = dict(rtol=1e-5, atol=1e-6)


def init(rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90)
    )


def finish(rank: int, ok: str) -> None:
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{ok}.{rank}", "w") as f:
        f.write("ok")


@contextlib.contextmanager
def counting_all_reduce() -> Iterator[list[int]]:
    """Counts ``dist.all_reduce`` calls (the reducers look it up at call time); yields the growing list of the
    group sizes of the calls."""
    calls: list[int] = []
    orig = dist.all_reduce

    def counting(tensor, *a, **k):
        group = k.get("group", a[1] if len(a) > 1 else None)
        calls.append(dist.get_world_size(group))
        return orig(tensor, *a, **k)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = orig


# --------------------------------------------------------------------------- 1. FSDP2, 2 ranks


class Experts(nn.Module):
    def __init__(self, experts: int, d: int, out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(experts, d, out))
        self.register_buffer("coeff", torch.linspace(0.5, 1.5, experts))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        e = torch.einsum("bi,eio->beo", a, self.w)
        return (e * self.coeff[None, :, None]).sum(1)


class Net(nn.Module):
    """Dense layers, a LayerNorm, a fused QKV ``[3d, d]`` and an expert bank ``[E, d, 2]``."""

    def __init__(self, experts: int, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.experts = Experts(experts, d, 2)
        self.head = nn.Linear(2, 1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            # slices of very different norms: one ratio per slice differs from one per tensor
            self.experts.w.mul_(torch.arange(1, experts + 1, dtype=torch.float32)[:, None, None])
            self.qkv.weight.mul_(torch.tensor([0.3] * d + [1.0] * d + [3.0] * d)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        q, k, v = self.qkv(h).chunk(3, -1)
        return self.head(self.experts(torch.tanh(q * k) + v))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dist_worker.batch(step, rank, world, seed=200)


FSDP_CONFIGS = [
    dict(weight_decay=0.05, clipnorm=0.5, use_ema=True, gradient_accumulation_steps=2),
    dict(weight_decay=0.05, global_clipnorm=0.3, use_ema=True),
    dict(weight_decay=0.05, clipvalue=0.1, gradient_accumulation_steps=2),
    dict(weight_decay=0.01, max_trust_ratio=2.0),
]
STEPS = 6


def make_opt(m: nn.Module, cfg: dict, d: int, sliced: bool = True, implementation: str = "auto") -> Lamb:
    opt = Lamb(m.named_parameters(), learning_rate=0.01, implementation=implementation, **cfg)
    opt.exclude_from_weight_decay(var_names=["bias", r"^norm\."])
    opt.exclude_from_layer_adaptation(var_names=[r"^head\.bias$"])
    if sliced:
        opt.set_trust_ratio_slices(var_names=[r"^experts\.w$"], dim=0)
        opt.set_trust_ratio_slices(var_names=[r"^qkv\.weight$"], dim=0, sizes=[d, d, d], labels=["q", "k", "v"])
    opt.track_trust_ratios(True)
    return opt


def train(m: nn.Module, opt: Lamb, rank: int, world: int, calls: list[int] | None = None) -> list[int]:
    """STEPS micro-steps; the all-reduces of each ``opt.step()`` (forward and backward run outside the count)."""
    per_step = []
    for s in range(STEPS):
        x, y = batch(s, rank, world)
        nn.functional.mse_loss(m(x), y).backward()
        before = len(calls) if calls is not None else 0
        opt.step()
        per_step.append((len(calls) if calls is not None else 0) - before)
        opt.zero_grad()
    return per_step


def fsdp_model(experts: int, d: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = Net(experts, d)
    for sub in (m.inp, m.norm, m.qkv, m.experts, m.head):
        fully_shard(sub, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``torch.chunk``'s rows of each part (as DTensor and FSDP2 shard dim 0)."""
    idx = torch.arange(n).chunk(parts)
    out = [(int(c[0]), int(c[-1]) + 1) for c in idx]
    return out + [(n, n)] * (parts - len(out))


def fsdp_worker(rank: int, world: int, init_method: str, ok: str, implementation: str = "auto",
                quick: bool = False) -> None:
    """``implementation`` runs the sharded optimizer (the single-process one runs "auto"); ``quick``: one
    model size, the first two configs (a backend that compiles per bucket shape) and ``torch.compile(opt.step)``."""
    init(rank, world, init_method)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    counts: dict[tuple[int, int, int], list[int]] = {}
    # QKV rows 9 -> 5|4 and 15 -> 8|7: the boundary falls inside k; one expert: rank 1 holds none of the bank
    for experts, d in ((4, 3),) if quick else ((4, 3), (6, 5), (1, 3)):
        lo, hi = chunk_bounds(experts, world)[rank]
        for ci, cfg in enumerate(FSDP_CONFIGS[:2] if quick else FSDP_CONFIGS):
            ref = Net(experts, d)
            ropt = make_opt(ref, cfg, d)
            train(ref, ropt, 0, 1)
            want = ropt.last_trust_ratios()

            m = fsdp_model(experts, d, mesh)
            opt = make_opt(m, cfg, d, implementation=implementation)
            if quick:  # also through torch.compile: DTensor parameters keep the graph break to the eager step
                opt.step = torch.compile(opt.step)
            with counting_all_reduce() as calls:
                per_step = train(m, opt, rank, world, calls)
            assert all(size == world for size in calls), calls
            counts[(experts, d, ci)] = per_step
            # buckets: {inp, norm, qkv (shard boundary inside k: all slices on every rank), head} reduce their
            # ratios' sums over the mesh (1 all-reduce); the expert bank (aligned, its slices are local)
            # needs none; clipnorm / global_clipnorm sum each bucket's per-tensor squares (1 + 1).
            accum = cfg.get("gradient_accumulation_steps", 1)
            clip = "clipnorm" in cfg or "global_clipnorm" in cfg
            expected = [(1 + 2 * clip) if (s + 1) % accum == 0 else 0 for s in range(STEPS)]
            assert per_step == expected, (experts, d, cfg, per_step, expected)
            assert opt.iterations == ropt.iterations

            for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(full(p.detach()), q.detach(), **TOL, msg=lambda s, n=name: f"{n}: {s}")
                assert set(opt.state[p]) == set(ropt.state[q]), name
                for key in ropt.state[q]:
                    torch.testing.assert_close(full(opt.state[p][key]), ropt.state[q][key], **TOL,
                                               msg=lambda s, n=name, k=key: f"{n} {k}: {s}")

            # telemetry: every rank has all of qkv's slices (boundary inside k) and its own experts
            got = opt.last_trust_ratios()
            plain = ["inp.weight", "inp.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
            names = {*plain, "qkv.weight.q", "qkv.weight.k", "qkv.weight.v"}
            names |= {f"experts.w[{e}]" for e in range(lo, hi)}
            assert set(got) == names, (rank, sorted(got))
            assert len(want) == len(plain) + 3 + experts
            for name in names:
                for a, b in zip(got[name], want[name], strict=True):
                    torch.testing.assert_close(a.float(), b.float(), **TOL, msg=lambda s, n=name: f"{n}: {s}")
            assert float(got["head.bias"].ratio) == 1.0  # excluded from layer adaptation
            ratios = torch.stack([want[f"experts.w[{e}]"].ratio for e in range(experts)])
            assert experts == 1 or float(ratios.max() / ratios.min()) > 1.05, ratios  # the slices have own ratios
            qkv = torch.stack([want[f"qkv.weight.{x}"].ratio for x in "qkv"])
            assert float(qkv.max() / qkv.min()) > 1.05, qkv

            if ci == 0 and experts > 1:  # slicing changes the result: one ratio per tensor gives other weights
                whole = Net(experts, d)
                wopt = make_opt(whole, cfg, d, sliced=False)
                train(whole, wopt, 0, 1)
                assert "experts.w" in wopt.last_trust_ratios() and "experts.w[0]" not in wopt.last_trust_ratios()
                for attr in ("experts.w", "qkv.weight"):
                    a, b = ref.get_parameter(attr), whole.get_parameter(attr)
                    assert (a - b).abs().max() > 1e-3, attr
    # the collectives per step do not depend on the number of experts or of slices
    for ci in range(0 if quick else len(FSDP_CONFIGS)):
        assert counts[(4, 3, ci)] == counts[(6, 5, ci)] == counts[(1, 3, ci)]
    if implementation != "auto":  # the backend ran (not a fallback)
        assert set(opt.backends().values()) == {implementation}
    finish(rank, ok)


# --------------------------------------------------------------------------- 2. 2x2 mesh, 4 ranks


def mesh_specs(big: bool) -> list[tuple[str, tuple[int, ...], tuple[str, str] | None, dict | None]]:
    """(name, shape, placements on (dp, tp) as 'S<d>'/'R' (None: a plain tensor), slice spec)."""
    e1, e2, e3, d = (8, 10, 5, 5) if big else (4, 6, 3, 3)
    qkv = dict(dim=0, sizes=[d] * 3, labels=["q", "k", "v"])
    more = [  # big: more tensors too, in the same buckets
        ("p_ss2", (7, 2), ("S0", "S1"), None),
        ("bank_ss2", (2, 5, 3), ("S0", "S1"), dict(dim=0)),
        ("qkv_sr2", (21, 2), ("S0", "R"), dict(dim=0, sizes=[7, 7, 7])),
        ("bank_002", (7, 2, 2), ("S0", "S0"), dict(dim=0)),
    ] if big else []
    base = [
        ("p_ss", (5, 4), ("S0", "S1"), None),
        ("p_sr", (6, 3), ("S0", "R"), None),
        ("p_rs", (3, 6), ("R", "S1"), None),
        ("bank_ss", (e1, 3, 4), ("S0", "S1"), dict(dim=0)),  # aligned; tp shards dim 1: sums over tp
        ("bank_s2", (e2, 2, 5), ("S0", "S2"), dict(dim=0)),  # aligned; tp shards dim 2
        ("bank_00", (e3, 2, 2), ("S0", "S0"), dict(dim=0)),  # both mesh dims split the experts: no collective
        ("qkv_ss", (3 * d, d), ("S0", "S1"), qkv),  # 9 -> 5|4 (15 -> 8|7): boundary inside k
        ("qkv_sr", (15, 5), ("S0", "R"), dict(dim=0, sizes=[5, 5, 5])),  # 8|7: inside k, dp only
        ("pair_ss", (12, 4), ("S0", "S1"), dict(dim=0, sizes=[6, 6], labels=["a", "b"])),  # 6|6: aligned
        ("qkv_rs", (9, 4), ("R", "S1"), dict(dim=0, sizes=[3, 3, 3])),  # not sharded along the slice dim
        ("qkv_00", (9, 3), ("S0", "S0"), dict(dim=0, sizes=[3, 3, 3])),  # 5|4 then 3|2, 2|2: inside k and v
        # a replicated DTensor (whole, no collective) and a plain tensor share a bucket; the DTensor comes first:
        # in the other order the bucket takes the plain tensor's `dtensor=False`
        # (the known bug of test_plain_tensor_then_replicated_dtensor)
        ("p_rr", (5, 2), ("R", "R"), dict(dim=1)),
        ("plain", (4, 6), None, dict(dim=1, sizes=[2, 4])),
        ("bank_rs1", (4, 3), ("R", "S1"), dict(dim=0)),
    ]
    return [*more, *base]


# trust-ratio all-reduces per update, by bucket (entry mesh dims, tensor mesh dims):
#   (dp,tp),(dp,tp): p_ss, qkv_ss, qkv_00 -> 2;  (dp),(dp): p_sr, qkv_sr -> 1;  (tp),(tp): p_rs, qkv_rs, bank_rs1 -> 1;
#   (tp),(dp,tp): bank_ss, bank_s2, pair_ss -> 1;  -,(dp,tp): bank_00 -> 0;  -,-: plain, p_rr -> 0
MESH_TRUST = 5
# clip-norm all-reduces per update: one per sharded mesh dim of each bucket's tensors: 2 + 1 + 1 + 2 + 2 + 0
MESH_CLIP = 8


def placements(code: tuple[str, str]) -> list:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if c == "R" else Shard(int(c[1:])) for c in code]


MESH_CONFIGS = [
    dict(weight_decay=0.1, clipnorm=0.4, use_ema=True, gradient_accumulation_steps=2),
    dict(weight_decay=0.1, global_clipnorm=0.5, use_ema=True),
    dict(weight_decay=0.1),
]


def mesh_checks(rank: int, mesh) -> None:
    from torch.distributed.tensor import distribute_tensor

    results = {}
    for big in (False, True):
        specs = mesh_specs(big)
        g = torch.Generator().manual_seed(11)
        ws = [torch.randn(s, generator=g) * (1 + torch.arange(s[0]).reshape(-1, *[1] * (len(s) - 1)))
              for _, s, _, _ in specs]
        grads = [[torch.randn(s, generator=g) for _, s, _, _ in specs] for _ in range(4)]
        for ci, cfg in enumerate(MESH_CONFIGS):
            ref = [(n, w.clone().requires_grad_()) for (n, *_), w in zip(specs, ws, strict=True)]
            dts = [
                (n, nn.Parameter(w.clone() if pl is None else distribute_tensor(w, mesh, placements(pl))))
                for (n, _, pl, _), w in zip(specs, ws, strict=True)
            ]
            opts = []
            for params in (ref, dts):
                opt = Lamb(params, learning_rate=0.01, **cfg)
                opt.exclude_from_weight_decay(var_names=["^p_rr$"])
                for (_, p), (_, _, _, spec) in zip(params, specs, strict=True):
                    if spec is not None:
                        opt.set_trust_ratio_slices(var_list=[p], **spec)
                opt.track_trust_ratios(True)
                opts.append(opt)
            ropt, opt = opts
            per_step = []
            with counting_all_reduce() as calls:
                for gs in grads:
                    for (_, r), gr in zip(ref, gs, strict=True):
                        r.grad = gr.clone()
                    for (_, p), gr, (_, _, pl, _) in zip(dts, gs, specs, strict=True):
                        p.grad = gr.clone() if pl is None else distribute_tensor(gr, mesh, placements(pl))
                    ropt.step()
                    before = len(calls)
                    opt.step()
                    per_step.append(len(calls) - before)
            accum = cfg.get("gradient_accumulation_steps", 1)
            clip = "clipnorm" in cfg or "global_clipnorm" in cfg
            expected = [(MESH_TRUST + MESH_CLIP * clip) if (s + 1) % accum == 0 else 0 for s in range(len(grads))]
            assert per_step == expected, (big, cfg, per_step, expected)
            assert all(size == 2 for size in calls), calls  # every collective runs over one mesh dim of size 2
            results[(big, ci)] = per_step
            for (name, p), (_, r) in zip(dts, ref, strict=True):
                torch.testing.assert_close(full(p.detach()), r.detach(), **TOL, msg=lambda s, n=name: f"{n}: {s}")
                for key in ropt.state[r]:
                    torch.testing.assert_close(full(opt.state[p][key]), ropt.state[r][key], **TOL,
                                               msg=lambda s, n=name, k=key: f"{n} {k}: {s}")
            # telemetry: each rank's names are a subset of the reference's, with its values; together all
            got, want = opt.last_trust_ratios(), ropt.last_trust_ratios()
            assert set(got) <= set(want), sorted(set(got) - set(want))
            for name in got:
                for a, b in zip(got[name], want[name], strict=True):
                    torch.testing.assert_close(a.float(), b.float(), **TOL, msg=lambda s, n=name: f"{n}: {s}")
            seen: list = [None] * dist.get_world_size()
            dist.all_gather_object(seen, sorted(got))
            assert set().union(*seen) == set(want)
            e1 = next(shape[0] for n, shape, _, _ in specs if n == "bank_ss")
            assert len([n for n in want if n.startswith("bank_ss[")]) == e1
            assert {"qkv_ss.q", "qkv_ss.k", "qkv_ss.v", "qkv_00[0]", "qkv_00[2]"} <= set(got)  # not aligned: all
            for name in ("bank_ss", "bank_s2", "bank_00"):
                ratios = torch.stack([r.ratio for n, r in want.items() if n.startswith(name + "[")])
                assert float(ratios.max() / ratios.min()) > 1.05, (name, ratios)
    assert all(results[(False, ci)] == results[(True, ci)] for ci in range(len(MESH_CONFIGS)))


# --------------------------------------------------------------------------- 3. DCP: 4 ranks -> 2 -> 1


DCP_LAYOUT = {  # registration order is not alphabetical: a reordering of the group's params would show
    "qkv": ((9, 3), ("S0", "S1"), dict(dim=0, sizes=[3, 3, 3], labels=["q", "k", "v"])),
    "experts": ((6, 3, 2), ("S0", "S2"), dict(dim=0)),
    "dense": ((5, 4), ("S0", "R"), None),
    "bias": ((5,), ("R", "S0"), None),
    "bank": ((4, 2, 3), ("S0", "S0"), dict(dim=0)),
}
DCP_CFG = dict(weight_decay=0.05, clipnorm=0.5, use_ema=True, gradient_accumulation_steps=2)


class DcpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        for name, (shape, _, _) in DCP_LAYOUT.items():
            w = torch.randn(shape, generator=g) * (1 + torch.arange(shape[0])).reshape(-1, *[1] * (len(shape) - 1))
            self.register_parameter(name, nn.Parameter(w))


def dcp_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return {name: torch.randn(shape, generator=g) for name, (shape, _, _) in DCP_LAYOUT.items()}


# what a resumed optimizer is given before loading: other slices of the same parameters. DCP loads into the
# structure of that template, so the same parameters must be sliced (see test_dcp_slice_structure_must_match);
# the checkpoint's specs must replace these, or the resumed run would differ from the uninterrupted one.
OTHER_SLICES = {"qkv": dict(dim=0), "experts": dict(dim=1), "bank": dict(dim=2)}


def dcp_opt(m: nn.Module, slices: dict[str, dict] | None = None) -> Lamb:
    opt = Lamb(m.named_parameters(), learning_rate=ExponentialDecay(0.01, 2, 0.5), **DCP_CFG)
    opt.exclude_from_weight_decay(var_names=["^bias$"])
    if slices is None:
        slices = {name: spec for name, (_, _, spec) in DCP_LAYOUT.items() if spec is not None}
    for name, spec in slices.items():
        opt.set_trust_ratio_slices(var_names=[f"^{name}$"], **spec)
    return opt


def dcp_run(m: nn.Module, opt: Lamb, steps: range) -> None:
    from torch.distributed.tensor import distribute_tensor

    for s in steps:
        grads = dcp_grads(s)
        for name, p in m.named_parameters():
            g = grads[name]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g
        opt.step()
        opt.zero_grad()


def dcp_result(m: nn.Module, opt: Lamb) -> list[torch.Tensor]:
    out = []
    for _, p in m.named_parameters():
        out.append(full(p.detach()).clone())
        out.extend(full(opt.state[p][k]).clone() for k in sorted(opt.state[p]))
    return out


def dcp_expected() -> tuple[list[torch.Tensor], list]:
    """The uninterrupted 6-step single-process run, and its group's slice specs."""
    m = DcpNet()
    opt = dcp_opt(m)
    dcp_run(m, opt, range(6))
    return dcp_result(m, opt), opt.param_groups[0]["trust_ratio_slices"]


def check_resumed(m: nn.Module, opt: Lamb, saved_slices: list) -> None:
    assert opt.param_groups[0]["trust_ratio_slices"] == saved_slices, opt.param_groups[0]["trust_ratio_slices"]
    assert opt.clock.calls == 3
    dcp_run(m, opt, range(3, 6))
    want, _ = dcp_expected()
    got = dcp_result(m, opt)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda s, i=i: f"tensor {i}: {s}")


def dcp_save_4(mesh, path: str) -> None:
    from torch.distributed.tensor import distribute_tensor

    m = DcpNet()
    for name, (_, pl, _) in DCP_LAYOUT.items():
        setattr(m, name, nn.Parameter(distribute_tensor(getattr(m, name).detach(), mesh, placements(pl))))
    opt = dcp_opt(m)
    dcp_run(m, opt, range(3))
    saved = opt.param_groups[0]["trust_ratio_slices"]
    _, want = dcp_expected()
    assert saved == want and sum(s is not None for s in saved) == 3
    dcp_save(m, opt, path)
    torch.save(saved, path + ".slices.pt")


def mesh_worker(rank: int, world: int, init_method: str, ok: str, tmp: str) -> None:
    init(rank, world, init_method)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh_checks(rank, mesh)
    dcp_save_4(mesh, os.path.join(tmp, "four"))
    finish(rank, ok)


def resume_worker(rank: int, world: int, init_method: str, ok: str, tmp: str) -> None:
    """The 4-rank checkpoint on 2 ranks (FSDP2 Shard(0)), into an optimizer given other slices (OTHER_SLICES)."""
    init(rank, world, init_method)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    m = DcpNet()
    fully_shard(m, mesh=mesh)
    resume_from_four(m, tmp)
    finish(rank, ok)


def resume_single(tmp: str) -> None:
    resume_from_four(DcpNet(), tmp)


def resume_from_four(m: nn.Module, tmp: str) -> None:
    """Load the 4-rank checkpoint into an optimizer given other slices (the checkpoint's win), and finish."""
    opt = dcp_opt(m, OTHER_SLICES)
    path = os.path.join(tmp, "four")
    saved = torch.load(path + ".slices.pt")
    assert opt.param_groups[0]["trust_ratio_slices"] != saved
    dcp_load(m, opt, path)
    check_resumed(m, opt, saved)



# --------------------------------------------------------------------------- former bugs


def mixed_bucket_worker(rank: int, world: int, init_method: str, ok: str, implementation: str) -> None:
    """A plain tensor, then a fully replicated DTensor, in one optimizer: both have no reducer, so they share a
    bucket, whose ``dtensor`` flag is the first one's (False): the DTensor's gradient is not unwrapped (foreach
    raises "mixed torch.Tensor and DTensor", the CPU kernel crashes the process)."""
    init(rank, world, init_method)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    wa, wb, ga, gb = (torch.randn(s, generator=g) for s in ((4, 3), (5, 2), (4, 3), (5, 2)))
    a, b = nn.Parameter(wa.clone()), nn.Parameter(distribute_tensor(wb, mesh, [Replicate()]))
    ra, rb = nn.Parameter(wa.clone()), nn.Parameter(wb.clone())
    opt = Lamb([a, b], learning_rate=0.01, implementation=implementation)
    ropt = Lamb([ra, rb], learning_rate=0.01, implementation=implementation)
    a.grad, b.grad = ga.clone(), distribute_tensor(gb, mesh, [Replicate()])
    ra.grad, rb.grad = ga.clone(), gb.clone()
    opt.step()
    ropt.step()
    torch.testing.assert_close(a.detach(), ra.detach(), **TOL)
    torch.testing.assert_close(full(b.detach()), rb.detach(), **TOL)
    finish(rank, ok)


def dcp_round_trip(tmp: str, save_slices: bool, load_slices: bool, drop_key: bool = False,
                   partial: bool = False) -> list:
    """One process: save a Lamb (sliced or not) with DCP, load it into a fresh one (sliced or not); returns the
    loaded group's ``trust_ratio_slices``. ``drop_key``: the checkpoint lacks the key (written before slices)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make(sliced: bool) -> tuple[nn.Module, Lamb]:
        m = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2))
        opt = Lamb(m.named_parameters(), learning_rate=0.01)
        if sliced:
            opt.set_trust_ratio_slices(var_names=[r"^0\.weight$"], dim=0, sizes=[2, 4])
        m(torch.randn(4, 3)).sum().backward()
        opt.step()
        return m, opt

    m, opt = make(save_slices)
    sd = {"optim": get_optimizer_state_dict(m, opt)}
    if drop_key:
        for group in sd["optim"]["param_groups"]:
            group.pop("trust_ratio_slices")
    dcp.save(sd, checkpoint_id=tmp)
    m, opt = make(load_slices)
    sd = {"optim": get_optimizer_state_dict(m, opt)}
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True) if partial else None
    dcp.load(sd, checkpoint_id=tmp, planner=planner)
    set_optimizer_state_dict(m, opt, sd["optim"])
    return opt.param_groups[0]["trust_ratio_slices"]
