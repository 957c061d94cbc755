"""Train with DeepSpeed ZeRO (stage 1, 2 or 3) and torch_lamb.Lamb as the client optimizer, on CPU (gloo).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed_train.py --stage 2

Lamb reads DeepSpeed's records of where each parameter's piece sits in its flat fp32 partition and sums their
norms over the data-parallel group (one all-reduce per partition per step), so the trust ratios are those of
the whole tensors. DeepSpeed clips by the global norm itself (``gradient_clipping``), accumulates gradients
and scales fp16 losses; ``global_clipnorm`` on Lamb takes DeepSpeed's norm. Checkpoints go through
``engine.save_checkpoint`` / ``engine.load_checkpoint``.
"""

from __future__ import annotations

import argparse
import tempfile

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from torch_lamb import Lamb


def build(stage: int) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 1))
    opt = Lamb(model.named_parameters(), learning_rate=3e-3, weight_decay=0.01, weight_decay_mode="adaptive",
               global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=10)
    opt.exclude_from_weight_decay(var_names=["bias", r"^2\."])
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def train(engine: deepspeed.DeepSpeedEngine, steps: range, rank: int) -> float:
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    loss = torch.zeros(())
    for step in steps:
        for micro in range(2):  # DeepSpeed accumulates: Lamb steps once per 2 micro-batches
            x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1000 * step + 10 * micro + rank))
            loss = nn.functional.mse_loss(engine(x), torch.tanh(x @ w_true))
            engine.backward(loss)
            engine.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    engine = build(args.stage)
    half = args.steps // 2
    train(engine, range(half), rank)
    folder = [tempfile.mkdtemp(prefix="lamb_ds_") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    engine.save_checkpoint(folder[0], tag="half")
    resumed = build(args.stage)
    resumed.load_checkpoint(folder[0], tag="half")
    loss = train(engine, range(half, args.steps), rank)
    resumed_loss = train(resumed, range(half, args.steps), rank)
    if rank == 0:
        print(f"DeepSpeed ZeRO-{args.stage}: {engine.optimizer.optimizer.iterations} Lamb updates, loss {loss:.4f}; "
              f"resumed from step {half}: loss {resumed_loss:.4f}")


if __name__ == "__main__":
    main()
