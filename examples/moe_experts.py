"""A mixture-of-experts layer trained with torch_lamb.Lamb and one trust ratio per expert.

An MoE layer keeps its experts in one parameter, ``[experts, dim, hidden]`` (and ``[experts, hidden,
dim]`` for the way back), so that one batched matmul runs them all. LAMB scales each tensor's step
by its trust ratio ``||w|| / ||update||``; for a bank that would be one ratio, so 64 experts sharing
it get one step size, whatever their own weights and gradients: an expert that sees many tokens
sets the step of one that sees few. ``opt.set_trust_ratio_slices(var_names=["experts"], dim=0)``
gives every expert its own ratio, exactly as if each were a separate parameter.

The task is synthetic: tokens come from one cluster per expert, and each cluster has its own
teacher network at its own output scale (0.25x to 4x), so the experts see different data and
different gradients, and their ratios differ.

    python examples/moe_experts.py --experts 8 --dim 16 --hidden 32 --steps 300
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from torch_lamb import Lamb


class MoE(nn.Module):
    """A router and two expert banks; top-k routing, the experts run as one grouped ``bmm``."""

    def __init__(self, experts: int, dim: int, hidden: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ParameterDict({
            "w_in": nn.Parameter(torch.randn(experts, dim, hidden) / dim**0.5),
            "w_out": nn.Parameter(torch.randn(experts, hidden, dim) / hidden**0.5),
        })

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [tokens, dim]`` -> (output ``[tokens, dim]``, tokens per expert)."""
        n, d = x.shape
        w_in, w_out = self.experts["w_in"], self.experts["w_out"]
        gates, chosen = self.router(x).softmax(-1).topk(self.top_k, dim=-1)  # [n, k]
        gates = gates / gates.sum(-1, keepdim=True)
        expert = chosen.reshape(-1)  # the expert of each (token, choice)
        token = torch.arange(n).repeat_interleave(self.top_k)
        onehot = F.one_hot(expert, w_in.shape[0])  # [n*k, experts]
        slot = (onehot.cumsum(0) - 1).gather(1, expert[:, None]).squeeze(1)  # its place in its expert's queue
        load = onehot.sum(0)
        # dispatch into one [experts, capacity, dim] buffer, run every expert at once, gather back
        buf = x.new_zeros(w_in.shape[0], int(load.max()), d).index_put((expert, slot), x[token])
        out = torch.bmm(F.gelu(torch.bmm(buf, w_in)), w_out)[expert, slot] * gates.reshape(-1, 1)
        return x.new_zeros(n, d).index_add(0, token, out), load


def make_data(n: int, experts: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens from ``experts`` clusters; cluster c's target is its own teacher, scaled by 0.25 ... 4."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(experts, dim, generator=g) * 3
    a, b = torch.randn(experts, dim, dim, generator=g), torch.randn(experts, dim, dim, generator=g) / dim**0.5
    scale = torch.logspace(-2, 2, experts, base=2.0)
    c = torch.randint(0, experts, (n,), generator=g)
    x = centers[c] + torch.randn(n, dim, generator=g)
    y = torch.tanh(torch.einsum("nd,nde->ne", x, a[c]) / dim**0.5)
    return x, torch.einsum("nd,nde->ne", y, b[c]) * scale[c, None]


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=16, help="token width")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of each expert")
    p.add_argument("--top-k", type=int, default=2, choices=[1, 2], help="experts per token")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = make_data(4096 + 1024, args.experts, args.dim, args.seed)
    x, y, x_val, y_val = x[:4096], y[:4096], x[4096:], y[4096:]
    model = MoE(args.experts, args.dim, args.hidden, args.top_k)
    opt = Lamb(model.named_parameters(), learning_rate=args.lr, weight_decay=0.01)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.set_trust_ratio_slices(var_names=["experts"], dim=0)  # one ratio per index along dim 0: per expert
    opt.track_trust_ratios(True)

    def val_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(model(x_val)[0], y_val).item()

    first = val_loss()
    print(f"step     0  validation loss {first:.4f}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    load = torch.zeros(args.experts, dtype=torch.long)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen)
        out, load = model(x[idx])
        loss = F.mse_loss(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            print(f"step {step:5d}  train loss {loss.item():.4f}  validation loss {val_loss():.4f}")

    last = val_loss()
    ratios = {n: float(r.ratio) for n, r in opt.last_trust_ratios().items()}
    print(f"validation loss: {first:.4f} -> {last:.4f} ({first / last:.1f}x lower)")
    print("trust ratios of the last step, per expert:")
    print(f"{'expert':>6}{'tokens':>8}{'w_in':>10}{'w_out':>10}")
    for k in range(args.experts):
        print(f"{k:>6}{int(load[k]):>8}{ratios[f'experts.w_in[{k}]']:>10.4f}{ratios[f'experts.w_out[{k}]']:>10.4f}")
    print(f"router: weight {ratios['router.weight']:.4f}, bias {ratios['router.bias']:.4f}")
    return {"first": first, "last": last, "ratios": ratios, "load": load.tolist()}


if __name__ == "__main__":
    main()
