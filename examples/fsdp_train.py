"""Train a small transformer-like MLP with FSDP2 and torch_lamb.Lamb on CPU (gloo).

    torchrun --nproc-per-node 2 examples/fsdp_train.py

Parameters, gradients and all optimizer state (moments, EMA, accumulators) stay sharded; the
trust ratios use full-tensor norms from one all-reduce per norm kind per step. A DCP checkpoint is
written at the end (it can be loaded on any number of ranks).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from torch_lamb import Lamb


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Lamb(model.named_parameters(), learning_rate=3e-3, weight_decay=0.01, global_clipnorm=1.0,
               use_ema=True, gradient_accumulation_steps=2)
    opt.exclude_from_weight_decay(var_names=["bias", r"^2\."])
    g = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    for step in range(40):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w_true))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"micro-step {step + 1:3d}  updates {opt.iterations:3d}  loss {avg.item() / world:.4f}")
    path = os.environ.get("CKPT_DIR") or os.path.join(tempfile.gettempdir(), "lamb_fsdp_ckpt")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    if rank == 0:
        print(f"checkpoint: {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
