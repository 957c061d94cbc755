"""``torch-lamb demo``: large-batch training on real data, LAMB vs AdamW vs SGD.

Trains a small MLP on scikit-learn's bundled handwritten digits (no download) for the same number of
epochs at every batch size, from small batches up to the full training set. Every optimizer's learning
rate follows one stated rule: square-root scaling with the batch size, linear warmup, then linear
decay to zero (as in the LAMB paper's recipe). The demo reports what it measured, nothing tuned.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["build_parser", "main"]

BASE_BATCH = 32
# Base learning rates at BASE_BATCH (fixed, common defaults; not tuned per batch size).
BASE_LR = {"lamb": 0.01, "adamw": 0.001, "sgd": 0.05}
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
DEFAULT_BATCHES = "8,32,128,512,full"
DEFAULT_EPOCHS = 100
QUICK_BATCHES = "32,full"
QUICK_EPOCHS = 15
SCALINGS = {"sqrt": lambda r: math.sqrt(r), "linear": lambda r: r}


def lr_rule(scaling: str = "sqrt") -> str:
    """The learning-rate rule in words."""
    factor = f"sqrt(batch / {BASE_BATCH})" if scaling == "sqrt" else f"(batch / {BASE_BATCH})"
    return (
        f"lr = base_lr * {factor}; linear warmup over the first {int(WARMUP_FRACTION * 100)}% of steps "
        "(at least 1), then linear decay to 0"
    )


LR_RULE = lr_rule("sqrt")


@dataclass
class RunResult:
    """One (optimizer, batch size) training run."""

    optimizer: str
    batch_size: int
    steps: int
    peak_lr: float
    final_train_loss: float
    test_accuracy: float
    wall_time_s: float
    epoch_losses: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    p = argparse.ArgumentParser(
        prog="torch-lamb demo",
        description=(
            "Train a small MLP on scikit-learn's bundled handwritten digits (8x8, 10 classes; no "
            "download) at growing batch sizes with torch_lamb.Lamb, torch.optim.AdamW and SGD "
            "(momentum 0.9), the same number of epochs for all. Learning-rate rule: "
            f"{LR_RULE} (--lr-scaling linear: base_lr * batch / {BASE_BATCH}). "
            f"Base learning rates at batch {BASE_BATCH}: "
            + ", ".join(f"{k} {v}" for k, v in BASE_LR.items())
            + f"; weight decay {WEIGHT_DECAY} (Lamb, AdamW). Prints a results table and writes "
            "results.csv, results.json and PNG plots into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="torch_lamb_demo", help="output folder for the table and plots")
    p.add_argument(
        "--batch-sizes", default=None,
        help=f"comma-separated batch sizes; 'full' is the whole training set (default {DEFAULT_BATCHES}; "
        f"--quick: {QUICK_BATCHES})",
    )
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default {DEFAULT_EPOCHS}; --quick: {QUICK_EPOCHS})")
    p.add_argument("--optimizers", default="lamb,adamw,sgd", help="comma-separated subset of lamb,adamw,sgd")
    p.add_argument("--lr-scaling", choices=sorted(SCALINGS), default="sqrt",
                   help="how the peak learning rate grows with the batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the shuffling")
    p.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda, cuda:1, ...; 'auto' picks cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: the model is tiny, extra threads only add sync overhead)")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in well under 30 s")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _load_digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1.0  # +1: several pixels are constant
    def to(a: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)
    return (to((x_tr - mean) / std, torch.float32), to(y_tr, torch.long),
            to((x_te - mean) / std, torch.float32), to(y_te, torch.long))


def _model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).to(device)


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "lamb":
        from . import Lamb

        return Lamb(model.named_parameters(), learning_rate=lr, weight_decay=WEIGHT_DECAY)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; choose from lamb, adamw, sgd.")


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup then linear decay; ``step`` counts from 0."""
    warmup = max(1, round(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _train(
    name: str, batch: int, epochs: int, data: tuple[torch.Tensor, ...], seed: int, device: torch.device,
    bar: Any, trust_log: dict[str, list[float]] | None, scaling: str = "sqrt",
) -> RunResult:
    x_tr, y_tr, x_te, y_te = data
    n = x_tr.shape[0]
    per_epoch = math.ceil(n / batch)
    total = per_epoch * epochs
    peak = BASE_LR[name] * SCALINGS[scaling](batch / BASE_BATCH)
    model = _model(seed, device)
    opt = _optimizer(name, model, peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
    if trust_log is not None:
        opt.track_trust_ratios(True)  # type: ignore[attr-defined]
        pending: list[torch.Tensor] = []
        names: list[str] = []
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed + 1)
    epoch_losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        model.train()
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if trust_log is not None:
                recs = opt.last_trust_ratios()  # type: ignore[attr-defined]
                names = list(recs)
                pending.append(torch.stack([r.ratio for r in recs.values()]))  # stays on device
            if bar is not None:
                bar.update(1)
        model.eval()
        with torch.no_grad():
            epoch_losses.append(loss_fn(model(x_tr), y_tr))  # full training-set loss, on device
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    losses = torch.stack(epoch_losses).tolist()
    wall = time.perf_counter() - start
    if trust_log is not None and pending:
        ratios = torch.stack(pending).cpu()  # one host sync for the whole run
        for j, pname in enumerate(names):
            trust_log[pname] = ratios[:, j].tolist()
    return RunResult(name, batch, total, peak, losses[-1], acc, wall, losses)


def _format_table(results: list[RunResult]) -> str:
    head = f"{'optimizer':<9} {'batch':>6} {'steps':>6} {'peak lr':>9} {'train loss':>11} {'test acc':>9} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.optimizer:<9} {r.batch_size:>6} {r.steps:>6} {r.peak_lr:>9.4g} {r.final_train_loss:>11.4f} "
            f"{r.test_accuracy:>9.4f} {r.wall_time_s:>7.2f}"
        )
    return "\n".join(lines)


def _plots(out: Path, results: list[RunResult], trust: dict[int, dict[str, list[float]]], n_train: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lamb": "tab:red", "adamw": "tab:blue", "sgd": "tab:green"}
    batches = sorted({r.batch_size for r in results})
    opts = list(dict.fromkeys(r.optimizer for r in results))
    written = []

    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3.0), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        for r in results:
            if r.batch_size == b:
                ax.plot(range(1, len(r.epoch_losses) + 1), r.epoch_losses, label=r.optimizer,
                        color=colors.get(r.optimizer))
        ax.set_yscale("log")
        ax.set_title(f"batch {b}" + (" (full)" if b == n_train else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training-set loss")
    axes[0][0].legend()
    fig.suptitle("Training loss per epoch (same epochs for every batch size)")
    fig.tight_layout()
    written.append(out / "loss_curves.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    def acc_panel(ax: Any) -> None:
        for o in opts:
            rs = sorted((r for r in results if r.optimizer == o), key=lambda r: r.batch_size)
            ax.plot([r.batch_size for r in rs], [r.test_accuracy for r in rs], "o-", label=o, color=colors.get(o))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("test accuracy")
        ax.axhline(0.1, color="gray", lw=0.8, ls=":", label="chance")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Test accuracy vs batch size")

    def trust_panel(ax: Any, b: int) -> None:
        for name, ratios in trust[b].items():
            ax.plot(range(1, len(ratios) + 1), ratios, label=name, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("update step")
        ax.set_ylabel("trust ratio ||w|| / ||u||")
        ax.set_title(f"Lamb per-layer trust ratios, batch {b}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    acc_panel(ax)
    fig.tight_layout()
    written.append(out / "accuracy_vs_batch.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    if trust:
        tb = sorted(trust)
        fig, axes = plt.subplots(1, len(tb), figsize=(5 * len(tb), 3.5), squeeze=False)
        for ax, b in zip(axes[0], tb):
            trust_panel(ax, b)
        fig.tight_layout()
        written.append(out / "trust_ratios.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        acc_panel(axes[0])
        trust_panel(axes[1], tb[-1])
        fig.tight_layout()
        written.append(out / "summary.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


def _parse_batches(text: str, n_train: int) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        b = n_train if part == "full" else int(part)
        if not 1 <= b <= n_train:
            raise SystemExit(f"--batch-sizes: {b} is outside [1, {n_train}] (the training-set size)")
        sizes.append(b)
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    args = build_parser().parse_args(argv)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships in the demo extra
        tqdm = None
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    opt_names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in opt_names:
        if o not in BASE_LR:
            raise SystemExit(f"--optimizers: unknown {o!r}; choose from lamb, adamw, sgd")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads or 1)

    data = _load_digits(args.seed, device)
    n_train = data[0].shape[0]
    batches = _parse_batches(args.batch_sizes or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES), n_train)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"torch-lamb demo: digits ({n_train} train / {data[2].shape[0]} test), MLP 64-128-128-10, "
          f"{epochs} epochs, device {device}, seed {args.seed}")
    print(f"learning-rate rule: {lr_rule(args.lr_scaling)}")
    print("base lr at batch 32: " + ", ".join(f"{o} {BASE_LR[o]}" for o in opt_names))
    total_steps = sum(math.ceil(n_train / b) * epochs for b in batches) * len(opt_names)
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True)
    results: list[RunResult] = []
    trust: dict[int, dict[str, list[float]]] = {}
    trust_batches = {batches[0], batches[-1]}
    for b in batches:
        for o in opt_names:
            if bar is not None:
                bar.set_postfix_str(f"{o} batch {b}")
            log = {} if (o == "lamb" and b in trust_batches) else None
            results.append(_train(o, b, epochs, data, args.seed, device, bar, log, args.lr_scaling))
            if log is not None:
                trust[b] = log
    if bar is not None:
        bar.close()

    print()
    print(_format_table(results))
    fields = ["optimizer", "batch_size", "steps", "peak_lr", "final_train_loss", "test_accuracy", "wall_time_s"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in results:
            w.writerow([getattr(r, k) for k in fields])
    meta = {
        "dataset": "sklearn.datasets.load_digits", "n_train": n_train, "n_test": int(data[2].shape[0]),
        "model": "MLP 64-128-128-10 (ReLU)", "epochs": epochs, "seed": args.seed, "device": str(device),
        "lr_rule": lr_rule(args.lr_scaling), "lr_scaling": args.lr_scaling, "base_batch": BASE_BATCH,
        "base_lr": {o: BASE_LR[o] for o in opt_names},
        "weight_decay": WEIGHT_DECAY, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "results": [asdict(r) for r in results],
        "lamb_trust_ratios": {str(b): v for b, v in trust.items()},
    }
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    pngs = _plots(out, results, trust, n_train)
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.json'}, " + ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
