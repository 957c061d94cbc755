"""Train with torch's ``ZeroRedundancyOptimizer`` (each rank steps its share of the parameters) and
torch_lamb.Lamb on CPU (gloo).

    torchrun --nproc-per-node 2 examples/zero_train.py

Every tensor stays whole on the rank that steps it, so the trust ratios need nothing; Lamb finds the
ZeroRedundancyOptimizer that built it and sums ``global_clipnorm``'s squared norm over its ranks (one
all-reduce per step). Exclusions set on ``zopt.optim`` survive ZeRO's copies of the param groups, the step
counter rides in them through ZeRO's own ``state_dict``/``load_state_dict``, and ``finalize_variable_values``
(called on every rank) hands each rank's averages to the others.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_lamb import Lamb


def build() -> tuple[nn.Module, DDP, ZeroRedundancyOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 1))
    zopt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Lamb, learning_rate=3e-3,
                                   weight_decay=0.01, global_clipnorm=1.0, use_ema=True, ema_momentum=0.9)
    # ZeRO takes tensors, not (name, tensor) pairs: select by identity (each rank's Lamb takes its share)
    zopt.optim.exclude_from_weight_decay(var_list=[p for n, p in model.named_parameters()
                                                   if n.endswith("bias") or n.startswith("2.")])
    return model, DDP(model), zopt


def train(ddp: DDP, zopt: ZeroRedundancyOptimizer, steps: range, rank: int) -> float:
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    loss = torch.zeros(())
    for step in steps:
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = nn.functional.mse_loss(ddp(x), torch.tanh(x @ w_true))
        loss.backward()
        zopt.step()
        zopt.zero_grad()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ddp, zopt = build()
    half = args.steps // 2
    train(ddp, zopt, range(half), rank)
    zopt.consolidate_state_dict(to=0)  # on every rank; rank 0 then holds the whole state
    path = os.path.join(tempfile.gettempdir(), "lamb_zero.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": zopt.state_dict()}, path)
    dist.barrier()
    resumed_model, resumed_ddp, resumed = build()
    blob = torch.load(path, weights_only=False)
    resumed_model.load_state_dict(blob["model"])
    resumed.load_state_dict(blob["optim"])
    loss = train(ddp, zopt, range(half, args.steps), rank)
    resumed_loss = train(resumed_ddp, resumed, range(half, args.steps), rank)
    zopt.optim.finalize_variable_values()  # every rank: the averages replace the weights everywhere
    if rank == 0:
        print(f"ZeroRedundancyOptimizer: {zopt.optim.iterations} updates, loss {loss:.4f}; resumed from step "
              f"{half}: loss {resumed_loss:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
