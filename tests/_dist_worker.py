"""Body of the 2-rank gloo checks (run by tests/test_distributed.py through torch.multiprocessing.spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from torch_lamb import Lamb


def model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(
        nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.Linear(3, 1)
    )  # (1,3) weight: empty shard
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def batch(step: int, rank: int, world: int, seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of step ``step``'s batch of 8 (the whole batch with ``world=1``)."""
    g = torch.Generator().manual_seed(seed + step)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)
    k = 8 // world
    return x[k * rank : k * rank + k], y[k * rank : k * rank + k]


CONFIGS = [
    dict(weight_decay=0.05, clipnorm=0.5, use_ema=True, gradient_accumulation_steps=2),
    dict(weight_decay=0.05, global_clipnorm=0.3, use_ema=True),
    dict(weight_decay=0.05, clipvalue=0.1, gradient_accumulation_steps=2),
]


def make_opt(m: nn.Module, cfg: dict) -> Lamb:
    cfg = dict(cfg)
    lr = cfg.pop("learning_rate", 0.01)
    opt = Lamb(m.named_parameters(), learning_rate=lr, **cfg)
    opt.exclude_from_weight_decay(var_names=["bias", r"^1\."])
    return opt


def run(m: nn.Module, opt: Lamb, steps: range, rank: int, world: int) -> None:
    for s in steps:
        x, y = batch(s, rank, world)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


DCP_CFG = dict(weight_decay=0.05, clipnorm=0.5, use_ema=True, gradient_accumulation_steps=2)


def dcp_opt(m: nn.Module) -> Lamb:
    """A scheduled learning rate: DCP's dummy zero-lr step would not be harmless with it."""
    from torch_lamb import ExponentialDecay

    return make_opt(m, {**DCP_CFG, "learning_rate": ExponentialDecay(0.01, 2, 0.5)})


def dcp_save(m: nn.Module, opt: Lamb, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
    dcp.save(sd, checkpoint_id=path)


def dcp_load(m: nn.Module, opt: Lamb, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    before = [full(p.detach()).clone() for p in m.parameters()]
    sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
    # the template call must not step: no counter, EMA or parameter change
    assert opt.clock.calls == 0
    for p, b in zip(m.parameters(), before, strict=False):
        assert torch.equal(full(p.detach()), b)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(m, sd["model"])
    set_optimizer_state_dict(m, opt, sd["optim"])


def single_process_dcp(tmp: str) -> list[torch.Tensor]:
    """Uninterrupted 6 steps; a 3-step checkpoint at tmp/one; returns the final params and EMA."""
    ref = model()
    opt = dcp_opt(ref)
    run(ref, opt, range(3), 0, 1)
    dcp_save(ref, opt, os.path.join(tmp, "one"))
    run(ref, opt, range(3, 6), 0, 1)
    return [p.detach().clone() for p in ref.parameters()] + [
        opt.state[p]["average"] for p in ref.parameters()
    ]


def resume_single(tmp: str) -> list[torch.Tensor]:
    """Load the 2-rank checkpoint tmp/two in one process and finish the run."""
    m = model()
    opt = dcp_opt(m)
    dcp_load(m, opt, os.path.join(tmp, "two"))
    assert opt.clock.calls == 3
    run(m, opt, range(3, 6), 0, 1)
    return [p.detach().clone() for p in m.parameters()] + [opt.state[p]["average"] for p in m.parameters()]


def sharded(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = model()
    for layer in m:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def dcp_checks(rank: int, world: int, mesh, tmp: str, expected: list[torch.Tensor]) -> None:
    # 2 ranks: 3 steps, save (for the 2 -> 1 check done by the parent)
    m = sharded(mesh)
    opt = dcp_opt(m)
    run(m, opt, range(3), rank, world)
    dcp_save(m, opt, os.path.join(tmp, "two"))
    # 1 -> 2: resume the single-process checkpoint on 2 ranks
    m = sharded(mesh)
    opt = dcp_opt(m)
    dcp_load(m, opt, os.path.join(tmp, "one"))
    assert opt.clock.calls == 3 and opt.iterations == 1
    run(m, opt, range(3, 6), rank, world)
    got = [full(p.detach()) for p in m.parameters()] + [full(opt.state[p]["average"]) for p in m.parameters()]
    for g, e in zip(got, expected, strict=False):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def placement_checks(world: int) -> None:
    """Plain tensors, Replicate, tensor-parallel Shard(1) and 2-D meshes in one optimizer; Partial raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (4, 6), (3, 5), (1, 4), (6,)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    m1 = init_device_mesh("cpu", (world,))
    m2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))  # Replicate over 2 ranks on "dp"
    m3 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    for clip in ({"clipnorm": 0.4}, {"global_clipnorm": 0.5}):  # global: plain and sharded buckets mixed
        ref = [w.clone().requires_grad_() for w in ws]
        ropt = Lamb(ref, learning_rate=0.01, weight_decay=0.1, use_ema=True, **clip)
        layouts = [
            (m1, [Shard(1)]),
            (m2, [Replicate(), Shard(0)]),
            (m3, [Replicate(), Shard(1)]),
            (m3, [Shard(0), Shard(0)]),
            None,
        ]
        dts = [
            w.clone() if lay is None else distribute_tensor(w, lay[0], lay[1])
            for w, lay in zip(ws, layouts, strict=False)
        ]
        dts = [nn.Parameter(t) for t in dts]
        opt = Lamb(dts, learning_rate=0.01, weight_decay=0.1, use_ema=True, **clip)
        for gs in grads:
            for r, gr in zip(ref, gs, strict=False):
                r.grad = gr.clone()
            for d, gr, lay in zip(dts, gs, layouts, strict=False):
                d.grad = gr.clone() if lay is None else distribute_tensor(gr, lay[0], lay[1])
            ropt.step()
            opt.step()
        for d, r in zip(dts, ref, strict=False):
            torch.testing.assert_close(full(d.detach()), r.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                full(opt.state[d]["average"]), ropt.state[r]["average"], rtol=1e-5, atol=1e-6
            )
    bad = nn.Parameter(torch.distributed.tensor.DTensor.from_local(ws[0], m1, [Partial()]))
    bopt = Lamb([bad], learning_rate=0.01)
    bad.grad = torch.distributed.tensor.DTensor.from_local(ws[0], m1, [Partial()])
    try:
        bopt.step()
    except ValueError as err:
        assert "Shard and Replicate" in str(err)
    else:
        raise AssertionError("a Partial parameter must raise")


def worker(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    steps = 4
    for cfg in CONFIGS:
        ref = model()
        ropt = make_opt(ref, cfg)
        run(ref, ropt, range(steps), 0, 1)  # whole batch = concatenation of the ranks' batches

        sh = model()
        for layer in sh:
            fully_shard(layer, mesh=mesh)
        fully_shard(sh, mesh=mesh)
        sopt = make_opt(sh, cfg)
        calls = []
        orig = dist.all_reduce

        def counting(*a, calls=calls, orig=orig, **k):
            calls.append(1)
            return orig(*a, **k)

        dist.all_reduce = counting
        try:
            run(sh, sopt, range(steps), rank, world)
        finally:
            dist.all_reduce = orig
        kinds = 1 + (1 if ("clipnorm" in cfg or "global_clipnorm" in cfg) else 0)
        n_updates = steps // cfg.get("gradient_accumulation_steps", 1)
        n_clips = n_updates * (kinds - 1)
        # one bucket -> one all-reduce per norm kind per update step, whatever the number of tensors
        assert len(calls) == n_updates + n_clips, (cfg, len(calls))
        for (name, p), q in zip(sh.named_parameters(), ref.parameters(), strict=False):
            fp = full(p.detach())
            assert torch.allclose(fp, q.detach(), rtol=1e-5, atol=1e-6), (
                cfg,
                name,
                (fp - q).abs().max().item(),
                q.abs().max().item(),
            )
            for key in ropt.state[q]:
                torch.testing.assert_close(full(sopt.state[p][key]), ropt.state[q][key], rtol=1e-5, atol=1e-6)
        assert sopt.iterations == ropt.iterations

    # DDP equals single process on the concatenated batch
    cfg = CONFIGS[0]
    ref = model()
    ropt = make_opt(ref, cfg)
    run(ref, ropt, range(steps), 0, 1)
    ddp = nn.parallel.DistributedDataParallel(model())
    dopt = Lamb(ddp.parameters(), learning_rate=0.01, **{**cfg, "weight_decay": 0.05})
    dopt.exclude_from_weight_decay(
        var_list=[p for n, p in ddp.named_parameters() if "bias" in n or ".1." in n]
    )
    run(ddp, dopt, range(steps), rank, world)
    for p, q in zip(ddp.module.parameters(), ref.parameters(), strict=False):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    placement_checks(world)
    tmp = os.environ["DIST_TMP"]
    dcp_checks(rank, world, mesh, tmp, torch.load(os.path.join(tmp, "expected.pt")))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        open(os.environ["DIST_OK"], "w").write("ok")
