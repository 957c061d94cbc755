"""2-rank gloo runs of Lamb under sharding engines, against one process (run by tests/test_engines.py).

Each engine runs a list of jobs in one spawn. A job trains a small model whose shard boundaries fall inside
tensors (Linear(5, 6), LayerNorm(6), Linear(6, 3), Linear(3, 1), and a 1-element parameter in a group of its
own that one rank holds nothing of), gathers the full parameters after every step and compares them with one
process running the same Lamb on the full batch. It also counts the all-reduces Lamb issues per step, and,
for a resume job, saves and loads through the engine's own checkpoint calls and compares the continued run
with the uninterrupted one. A job that expects a refusal checks the error on every rank.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torch_lamb import Lamb

WORLD = 2
STEPS = 4


class Scale(nn.Module):
    """``x * s`` with a 1-element parameter: one rank holds none of it under every engine."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3), nn.Linear(3, 1), Scale())
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)


def _clean(name: str) -> str:
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


def groups(named: list[tuple[str, torch.Tensor]], job: dict) -> list[dict]:
    """Group 0: everything but the Scale; group 1: the Scale (its own options). A flat tensor holding both
    (FSDP1 wrapped at the root) goes to group 0."""
    out = [{"params": [], "param_names": []}, {"params": [], "param_names": [], **job.get("group1", {})}]
    for name, p in named:
        g = out[1] if _clean(name) in ("4.s", "4._flat_param") else out[0]
        g["params"].append(p)
        g["param_names"].append(name)
    return [g for g in out if g["params"]] if not job.get("keep_empty") else out


def lamb(named: list[tuple[str, torch.Tensor]], job: dict) -> Lamb:
    opt = Lamb(groups(named, job), **job.get("lamb", {}))
    _exclude(opt, job)
    return opt


def _exclude(opt: Lamb, job: dict) -> None:
    if "decay_names" in job:
        opt.exclude_from_weight_decay(var_names=job["decay_names"])
    if "adapt_names" in job:
        opt.exclude_from_layer_adaptation(var_names=job["adapt_names"])
    if "slices" in job:
        opt.set_trust_ratio_slices(**job["slices"])


def reference(job: dict) -> list[dict[str, torch.Tensor]]:
    """One process, the full batch: the parameters after every step."""
    m = model()
    opt = lamb(list(m.named_parameters()), job)
    out = []
    for step in range(job.get("steps", STEPS)):
        x, y = batch(step)
        if job.get("nan_at") == step:
            x = x.clone()
            x[0, 0] = float("nan")
        nn.functional.mse_loss(m(x), y).backward()
        if "pre_clip" in job:  # DeepSpeed's gradient_clipping, as torch forms it
            nn.utils.clip_grad_norm_(m.parameters(), job["pre_clip"])
        opt.step()
        opt.zero_grad()
        out.append({n: p.detach().clone() for n, p in m.named_parameters()})
    if job.get("finalize"):
        opt.finalize_variable_values()
        out.append({n: p.detach().clone() for n, p in m.named_parameters()})
    return out


# ----------------------------------------------------------------------------- engines


def _half(step: int, rank: int, job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    if job.get("nan_at") == step:
        x = x.clone()
        x[0, 0] = float("nan")
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


class Run:
    """One rank's engine, model and Lamb; ``step(i)`` trains, ``full()`` gathers the parameters (a collective)."""

    def __init__(self, engine: str, rank: int, job: dict) -> None:
        self.engine, self.rank, self.job = engine, rank, job
        getattr(self, "_" + engine.rstrip("0123456789").removesuffix("_orig").removesuffix("_flat"))()

    # FSDP1 -----------------------------------------------------------------
    def _fsdp1(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        kw: dict[str, Any] = {"device_id": torch.device("cpu"), "use_orig_params": self.engine == "fsdp1_orig"}
        if self.engine == "fsdp1_flat":  # one FlatParameter per layer: the Scale's can go to a group of its own
            kw["auto_wrap_policy"] = ModuleWrapPolicy({nn.Linear, nn.LayerNorm, Scale})
        self.model = FSDP(model(), **kw)
        self.opt = lamb(list(self.model.named_parameters()), self.job)
        self.forward = self.model

    def _fsdp1_full(self) -> dict[str, torch.Tensor]:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            return {_clean(k): v.detach().clone() for k, v in self.model.state_dict().items()}

    # torch's ZeroRedundancyOptimizer ----------------------------------------
    def _zero(self) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.module = model()
        self.model = DDP(self.module)
        named = list(self.module.named_parameters())
        self.opt = ZeroRedundancyOptimizer(groups(named, self.job), optimizer_class=Lamb, **self.job.get("lamb", {}))
        _exclude(self.opt.optim, self.job)  # by name: each rank's share of a group keeps its parameters' names
        self.forward = self.model

    def _zero_full(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    # DeepSpeed ----------------------------------------------------------------
    def _ds(self) -> None:
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        import deepspeed.comm.torch

        # (its CPU backend would compile a shared-memory op with g++ for minutes; gloo's collectives are the test)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        stage = int(self.engine[-1])
        accum = self.job.get("accum", 1)
        config = {"train_micro_batch_size_per_gpu": 4 // accum, "gradient_accumulation_steps": accum,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0, "steps_per_print": 10**9, **self.job.get("ds", {})}
        if stage == 3 and self.job.get("sub_groups"):
            config["zero_optimization"]["sub_group_size"] = self.job["sub_groups"]
        m = model()
        client = lamb(list(m.named_parameters()), self.job)
        self.engine_obj, _, _, _ = deepspeed.initialize(model=m, optimizer=client, config=config)
        self.opt, self.model, self.forward = client, self.engine_obj.module, self.engine_obj

    def _ds_full(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = list(self.model.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.engine == "ds3" else (
            contextlib.nullcontext())
        with gather:
            return {n: p.detach().clone().float() for n, p in self.model.named_parameters()}

    # -------------------------------------------------------------------------
    def step(self, i: int) -> None:
        x, y = _half(i, self.rank, self.job)
        if self.engine.startswith("ds"):  # DeepSpeed's accumulation: micro-batches, one client step at the boundary
            for xs, ys in zip(x.chunk(self.job.get("accum", 1)), y.chunk(self.job.get("accum", 1))):
                self.engine_obj.backward(nn.functional.mse_loss(self.forward(xs), ys))
                self.engine_obj.step()
        else:
            loss = nn.functional.mse_loss(self.forward(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()

    def full(self) -> dict[str, torch.Tensor]:
        return getattr(self, "_" + self.engine.rstrip("0123456789").removesuffix("_orig").removesuffix("_flat")
                       + "_full")()

    def lamb_optimizer(self) -> Lamb:
        return self.opt.optim if self.engine == "zero" else self.opt

    def finalize(self) -> None:
        self.lamb_optimizer().finalize_variable_values()

    # checkpoints, the engine's own way ----------------------------------------
    def save(self, folder: str) -> None:
        if self.engine.startswith("ds"):
            self.engine_obj.save_checkpoint(folder, tag="t")
        elif self.engine == "zero":
            self.opt.consolidate_state_dict(to=0)
            if self.rank == 0:
                torch.save({"model": self.module.state_dict(), "optim": self.opt.state_dict()},
                           os.path.join(folder, "zero.pt"))
        else:
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # offload_to_cpu=False: with True, torch (2.13, CPU tensors) saves every state key with the last key's
            # values under use_orig_params=True (its gathered buffer is reused and .cpu() does not copy)
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(rank0_only=False),
                                      FullOptimStateDictConfig(rank0_only=False, offload_to_cpu=False)):
                blob = {"model": self.model.state_dict(), "optim": FSDP.optim_state_dict(self.model, self.opt)}
            torch.save(blob, os.path.join(folder, f"fsdp_{self.rank}.pt"))
        dist.barrier()

    def load(self, folder: str) -> None:
        if self.engine.startswith("ds"):
            self.engine_obj.load_checkpoint(folder, tag="t")
        elif self.engine == "zero":
            blob = torch.load(os.path.join(folder, "zero.pt"), weights_only=False)
            self.module.load_state_dict(blob["model"])
            self.opt.load_state_dict(blob["optim"])
        else:
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            blob = torch.load(os.path.join(folder, f"fsdp_{self.rank}.pt"), weights_only=False)
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(rank0_only=False),
                                      FullOptimStateDictConfig(rank0_only=False, offload_to_cpu=False)):
                self.model.load_state_dict(blob["model"])
                self.opt.load_state_dict(FSDP.optim_state_dict_to_load(self.model, self.opt, blob["optim"]))
        dist.barrier()


@contextlib.contextmanager
def counting(opt: Lamb):
    """Count the all-reduces issued inside ``opt.step`` (the engine's own collectives are not Lamb's)."""
    calls: list[int] = []
    real_all_reduce, real_step = dist.all_reduce, opt.step
    inside = [False]

    def all_reduce(*args: Any, **kwargs: Any) -> Any:
        if inside[0]:
            calls.append(1)
        return real_all_reduce(*args, **kwargs)

    def step(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False

    dist.all_reduce = all_reduce
    opt.step = step  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        dist.all_reduce = real_all_reduce
        del opt.step


def run_job(engine: str, rank: int, job: dict) -> dict:
    """One job on this rank: the per-step differences (rank 0), the all-reduce counts, or the error."""
    out: dict[str, Any] = {}
    try:
        run = Run(engine, rank, job)
        with counting(run.lamb_optimizer()) as calls:
            diffs, counts = [], []
            want = reference(job) if rank == 0 else None
            steps = job.get("steps", STEPS)
            for i in range(steps):
                before = len(calls)
                run.step(i)
                counts.append(len(calls) - before)
                full = run.full()
                if want is not None:
                    diffs.append(_diff(full, want[i]))
            if job.get("finalize"):
                run.finalize()
                full = run.full()
                if want is not None:
                    diffs.append(_diff(full, want[-1]))
        out.update(diffs=diffs, counts=counts, iterations=run.lamb_optimizer().iterations)
        if job.get("resume"):
            out["resume"] = _resume(engine, rank, job)
    except Exception as err:  # a refusal must come on every rank: the test checks each rank's message
        out["error"] = f"{type(err).__name__}: {err}"
        out["trace"] = traceback.format_exc()[-3000:]
    return out


def _diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest |got - want| in units of assert_close's allowance (rtol 1e-5, atol 1e-6): at most 1 passes."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    return max(float(((got[k] - want[k]).abs() / (1e-6 + 1e-5 * want[k].abs())).max()) for k in want)


def _resume(engine: str, rank: int, job: dict) -> float:
    """Train 2 steps, save the engine's way, build everything afresh, load, train 2 more: the largest difference
    from the 4-step run."""
    steps = job.get("steps", STEPS)
    whole = Run(engine, rank, job)
    for i in range(steps):
        whole.step(i)
    want = whole.full()
    first = Run(engine, rank, job)
    for i in range(steps // 2):
        first.step(i)
    folder = tempfile.mkdtemp(prefix="lamb_engine_") if rank == 0 else None
    shared = [folder]
    dist.broadcast_object_list(shared, src=0)
    first.save(shared[0])
    second = Run(engine, rank, job)
    second.load(shared[0])
    for i in range(steps // 2, steps):
        second.step(i)
    got = second.full()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def worker(rank: int, port: int, engine: str, jobs: list[dict], out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = [run_job(engine, rank, job) for job in jobs]
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        gc.collect()  # the jobs' engines sit in reference cycles: free them (and what holds the group) now
        dist.destroy_process_group()
