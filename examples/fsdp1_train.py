"""Train with FSDP1 (``FullyShardedDataParallel``) and torch_lamb.Lamb on CPU (gloo).

    torchrun --nproc-per-node 2 examples/fsdp1_train.py              # use_orig_params=True
    torchrun --nproc-per-node 2 examples/fsdp1_train.py --flat       # use_orig_params=False (FlatParameters)

Lamb finds FSDP1's records of where each parameter's pieces are and sums their norms over FSDP's process
group (one all-reduce per bucket per step), so the trust ratios are those of the whole tensors. The optimizer
state is saved the FSDP1 way and loaded into a fresh model and optimizer, which continue exactly.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from torch_lamb import Lamb


def build(flat: bool) -> tuple[FSDP, Lamb]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 1))
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=not flat,
                   auto_wrap_policy=ModuleWrapPolicy({nn.Linear, nn.LayerNorm}))
    opt = Lamb(wrapped.named_parameters(), learning_rate=3e-3, weight_decay=0.01, global_clipnorm=1.0,
               use_ema=True)
    opt.exclude_from_weight_decay(var_names=["bias", r"\b2\."])  # by name: also inside FlatParameters
    return wrapped, opt


def train(model: FSDP, opt: Lamb, steps: range, rank: int) -> float:
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    loss = torch.zeros(())
    for step in steps:
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w_true))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def state_dict_config(model: FSDP):
    # offload_to_cpu=False: torch 2.13 on CPU tensors saves every state key with the last key's values otherwise
    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
                                FullOptimStateDictConfig(rank0_only=False, offload_to_cpu=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--flat", action="store_true", help="use_orig_params=False: FlatParameters")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build(args.flat)
    half = args.steps // 2
    loss = train(model, opt, range(half), rank)
    with state_dict_config(model):
        saved = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, opt)}
    path = os.path.join(tempfile.gettempdir(), f"lamb_fsdp1_{rank}.pt")
    torch.save(saved, path)
    resumed, resumed_opt = build(args.flat)
    blob = torch.load(path, weights_only=False)
    with state_dict_config(resumed):
        resumed.load_state_dict(blob["model"])
        resumed_opt.load_state_dict(FSDP.optim_state_dict_to_load(resumed, resumed_opt, blob["optim"]))
    loss = train(model, opt, range(half, args.steps), rank)
    resumed_loss = train(resumed, resumed_opt, range(half, args.steps), rank)
    if rank == 0:
        print(f"FSDP1 ({'FlatParameters' if args.flat else 'use_orig_params'}): {opt.iterations} updates, "
              f"loss {loss:.4f}; resumed from step {half}: loss {resumed_loss:.4f}")
    # FSDP1's modules sit in reference cycles: free them while the process group lives (torn down with the
    # interpreter after destroy_process_group(), gloo sometimes aborts the process on its way out)
    del model, opt, resumed, resumed_opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
