"""A plain PyTorch training loop with torch_lamb.Lamb: gradient accumulation, EMA weights,
trust-ratio logging and ``finalize_variable_values()`` at the end.

    python examples/plain_loop.py --steps 200 --accum 4
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from torch_lamb import Lamb


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression task from a fixed random teacher network (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w1, w2 = torch.randn(16, 32, generator=g), torch.randn(32, 1, generator=g)
    return x, torch.tanh(x @ w1) @ w2 / 4


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=200, help="optimizer updates (each of --accum micro-batches)")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per update (gradient accumulation)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = make_data(5120, args.seed)
    x, y, x_val, y_val = x[:4096], y[:4096], x[4096:], y[4096:]
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    opt = Lamb(
        model.named_parameters(),  # names are used by exclude_from_weight_decay and the trust-ratio log
        learning_rate=args.lr,
        weight_decay=0.01,
        gradient_accumulation_steps=args.accum,  # Lamb applies the mean gradient every `accum` calls
        use_ema=True,
        ema_momentum=0.99,
    )
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.track_trust_ratios(True)
    loss_fn = nn.MSELoss()

    def val_loss() -> float:
        with torch.no_grad():
            return loss_fn(model(x_val), y_val).item()

    first = val_loss()
    gen = torch.Generator().manual_seed(args.seed + 2)
    for update in range(1, args.steps + 1):
        for _ in range(args.accum):
            idx = torch.randint(0, x.shape[0], (args.micro_batch,), generator=gen)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # accumulates; the last micro-batch of each window updates the weights
        if update % args.log_every == 0 or update == args.steps:
            ratios = {n: round(float(r.ratio), 4) for n, r in opt.last_trust_ratios().items()}
            print(f"update {opt.iterations:5d}  train loss {loss.item():.5f}  trust ratios {ratios}")

    raw = val_loss()
    opt.finalize_variable_values()  # the parameters become their exponential moving averages
    ema = val_loss()
    print(f"validation loss: start {first:.5f}, raw weights {raw:.5f}, EMA weights {ema:.5f}")
    return {"first": first, "raw": raw, "ema": ema, "iterations": float(opt.iterations)}


if __name__ == "__main__":
    main()
