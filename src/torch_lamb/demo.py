"""``torch-lamb demo``: what LAMB is for. Large batches on Fashion-MNIST, LAMB against AdamW, measured.

Protocol (``docs/demo.md`` has the measured results and how to read them):

* **Data:** Fashion-MNIST; 50,000 of the training images train, the other 10,000 validate (the split
  is fixed); the 10,000 test images are reported and never used to choose anything. Without the
  data, scikit-learn's 8x8 digits stand in (they show no large-batch effect).
* **Model and budget:** an MLP 784-128-128-10 (ReLU), the same number of epochs at every batch size.
* **Rule:** ``lr = base_lr * sqrt(batch / 128)``, linear warmup over the first 10% of the steps, then
  linear decay to 0. No weight decay, the same betas (0.9, 0.999) and epsilon (1e-6): Lamb and
  AdamW differ only by the trust ratio. The base lrs are chosen on validation at batch 128 (the
  default run picks them from a grid; ``--quick`` uses the values that selection gave on our machine).
* **Fair tuning:** at the largest batch, each optimizer also gets an lr grid around the rule's
  value (1/4x to 4x), the best picked on validation and reported on test.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .bench import plural

__all__ = ["build_parser", "main"]

BASE_BATCH = 128
QUICK_TIME = "45 s on 2 idle cores, up to 2 minutes on a busy machine"  # measured: docs/demo.md, Timings
# Base learning rates at BASE_BATCH: what the default run's selection on validation picked on our
# machine (--quick uses them as they are; the default run selects again from BASE_GRID).
BASE_LR = {"lamb": 0.01, "adamw": 0.003, "sgd": 0.03}
BASE_GRID = {"lamb": (0.001, 0.003, 0.01, 0.03), "adamw": (0.001, 0.003, 0.01, 0.03),
             "sgd": (0.01, 0.03, 0.1, 0.3)}
BETAS, EPS = (0.9, 0.999), 1e-6
WARMUP_FRACTION = 0.1
OPTIMIZERS = ("lamb", "adamw", "sgd")
MODES: dict[str, dict[str, Any]] = {
    "quick": {"batches": (512, 8192), "epochs": 10, "seeds": 1, "grid": (0.5, 1.0, 2.0), "select": False},
    "default": {"batches": (128, 512, 2048, 8192), "epochs": 10, "seeds": 1,
                "grid": (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0), "select": True},
    "full": {"batches": (128, 512, 2048, 8192, 16384), "epochs": 10, "seeds": 3,
             "grid": (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0), "select": True},
}
MAX_BATCH = 50_000  # the Fashion-MNIST training split
DIGITS_EPOCHS = 100  # the fallback's budget: on 1,149 images, 10 epochs would be 10 full-batch steps
LABEL = {"lamb": "Lamb", "adamw": "AdamW", "sgd": "SGD"}
STYLE = {"lamb": {"color": "tab:red", "marker": "o", "ls": "-"},
         "adamw": {"color": "tab:blue", "marker": "s", "ls": "--"},
         "sgd": {"color": "tab:green", "marker": "^", "ls": ":"}}


def lr_rule(warmup: float = WARMUP_FRACTION) -> str:
    """The learning-rate rule in words."""
    return (f"lr = base_lr * sqrt(batch / {BASE_BATCH}); linear warmup over the first "
            f"{100 * warmup:g}% of steps (at least 1), then linear decay to 0")


LR_RULE = lr_rule()


@dataclass
class RunResult:
    """One training run."""

    phase: str  # "base" (base-lr selection at BASE_BATCH), "rule", "grid" (the tuning panel)
    optimizer: str
    batch_size: int
    seed: int
    lr_multiplier: float
    peak_lr: float
    steps: int
    final_train_loss: float
    val_accuracy: float
    test_accuracy: float
    diverged: bool
    wall_time_s: float
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_val_loss: list[float] = field(default_factory=list)
    trust_ratios: dict[str, list[float]] | None = None


# ----------------------------------------------------------------------------- argument checks


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2, as argparse) and no abbreviated options."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 128,8192")
    out = []
    for p in parts:
        if not p:
            continue
        try:
            b = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{p!r} is not an integer") from None
        if not 1 <= b <= MAX_BATCH:
            raise argparse.ArgumentTypeError(f"{b} is outside [1, {MAX_BATCH}] (the training split)")
        out.append(b)
    return tuple(sorted(set(out)))


def _float_list(text: str) -> tuple[float, ...]:
    try:
        vals = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0.5,1,2") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, e.g. 0.5,1,2")
    return tuple(sorted(set(vals)))


def _optimizers(text: str) -> tuple[str, ...]:
    names = [o.strip().lower() for o in text.split(",") if o.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name at least one of {', '.join(OPTIMIZERS)}")
    for o in names:
        if o not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    return tuple(dict.fromkeys(names))


def _base_lrs(text: str) -> dict[str, float]:
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, val = part.partition("=")
        try:
            lr = float(val)
        except ValueError:
            lr = -1.0
        if not sep or name.strip().lower() not in OPTIMIZERS or not (math.isfinite(lr) and lr > 0):
            raise argparse.ArgumentTypeError(f"{part!r}: write NAME=LR, e.g. lamb=0.01,adamw=0.003")
        out[name.strip().lower()] = lr
    if not out:
        raise argparse.ArgumentTypeError("write NAME=LR, e.g. lamb=0.01,adamw=0.003")
    return out


def _parsed(text: str, kind: type, what: str) -> Any:
    """``kind(text)``, or argparse's error naming what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _fraction(text: str) -> float:
    v = _parsed(text, float, "a number")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 1)")
    return v


def _positive(text: str) -> int:
    v = _parsed(text, int, "an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) has no usable CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the demo runs on cpu, cuda or mps")
    return str(dev)


def _out_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
        probe = path
    else:
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable ({probe})")
    return path


def _data_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    d, q, f = MODES["default"], MODES["quick"], MODES["full"]
    p = _Parser(
        prog="torch-lamb demo",
        description=(
            "Train an MLP 784-128-128-10 on Fashion-MNIST at growing batch sizes with torch_lamb.Lamb and "
            "torch.optim.AdamW (SGD with momentum 0.9 optional), the same epochs for all. Learning-rate "
            f"rule: {LR_RULE}. No weight decay; the same betas and epsilon. Base lrs are chosen on a "
            "validation split at batch 128; at the largest batch each optimizer also gets an lr grid "
            "(picked on validation, reported on test). Prints a table and writes results.csv, "
            "results.json and PNG plots (matplotlib; --no-plots skips them) into --out. Without "
            "Fashion-MNIST it falls back to scikit-learn's digits."
        ),
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"batches {_listed(q['batches'])}, {q['epochs']} epochs, lr grid {_listed(q['grid'])}, "
                      f"fixed base lrs: {QUICK_TIME}")
    mode.add_argument("--full", action="store_true",
                      help=f"batches {_listed(f['batches'])}, {f['seeds']} seeds, base-lr selection on each seed")
    p.add_argument("--out", type=_out_dir, default=Path("torch_lamb_demo"),
                   help="output folder, created if needed (default: torch_lamb_demo)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B,B,...",
                   help=f"batch sizes (default: {_listed(d['batches'])}; --full adds {f['batches'][-1]})")
    p.add_argument("--epochs", type=_positive, default=None,
                   help=f"epochs per run (default: {d['epochs']}; {DIGITS_EPOCHS} on the digits fallback)")
    p.add_argument("--seeds", type=_positive, default=None,
                   help=f"seeds per configuration (default: {d['seeds']}; --full: {f['seeds']})")
    p.add_argument("--optimizers", type=_optimizers, default=("lamb", "adamw"), metavar="NAMES",
                   help="comma-separated subset of lamb,adamw,sgd (default: lamb,adamw)")
    p.add_argument("--base-lr", type=_base_lrs, default=None, metavar="NAME=LR,...",
                   help=f"base lrs at batch {BASE_BATCH}, skipping their selection (--quick uses "
                   + ", ".join(f"{k}={v}" for k, v in BASE_LR.items()) + ")")
    p.add_argument("--lr-grid", type=_float_list, default=None, metavar="X,X,...",
                   help=f"multipliers of the rule's lr tried at the largest batch (default: {_listed(d['grid'])}; "
                   f"--quick: {_listed(q['grid'])})")
    p.add_argument("--warmup", type=_fraction, default=WARMUP_FRACTION, metavar="F",
                   help=f"fraction of each run's steps spent warming up (default: {WARMUP_FRACTION:g})")
    p.add_argument("--data", type=_data_dir, default=None, metavar="DIR",
                   help="folder with the Fashion-MNIST IDX files (else $TORCH_LAMB_DATA, Debian's "
                   "/usr/share/datasets/fashion-mnist, ./data/FashionMNIST/raw, the cache)")
    p.add_argument("--download", action="store_true",
                   help="fetch Fashion-MNIST (30 MB) into --data DIR or the cache, verified, before training")
    p.add_argument("--mirror", default=None, metavar="URL", help="base URL for --download")
    p.add_argument("--digits", action="store_true", help="use scikit-learn's digits even if Fashion-MNIST is here")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, mps or auto (default: cpu)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: 1, steady on a shared machine; 2 is faster on an idle one)")
    p.add_argument("--save-trust-ratios", action="store_true",
                   help="store every Lamb step's per-layer trust ratios in results.json")
    p.add_argument("--no-plots", action="store_true",
                   help="write results.csv and results.json only (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (tqdm)")
    return p


def _listed(values: tuple[Any, ...]) -> str:
    """``(512, 8192)`` as ``512,8192``: the form the options take."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _check_before_work(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What would otherwise fail minutes into a run, checked before any: the output folder takes a file, and
    matplotlib imports (unless --no-plots). Each failure is one line and exit code 2, as a bad option is."""
    import tempfile

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out, prefix=".torch-lamb-write-check-"):
            pass
    except OSError as err:  # os.access says yes to root everywhere, /proc included: only a real write tells
        parser.error(f"argument --out: cannot write into {str(args.out)!r}: {err.strerror or err}")
    if not args.no_plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot
        except ImportError as err:
            from ._hints import install_hint

            parser.error(f"the plots need matplotlib, which this Python cannot import ({err}): install it with "
                         f"{install_hint(['matplotlib'], 'demo')}, or run with --no-plots")


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def _standardise(x_tr: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = x_tr.mean(), x_tr.std()
    return [(t - mean) / std for t in (x_tr, *others)]


def _split(n: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))  # fixed across seeds and runs
    return perm[n_val:], perm[:n_val]


def load_fashion(folder: Path, files: Any = None) -> Data:
    """Fashion-MNIST, split 50,000 train / 10,000 validation (fixed) plus the 10,000 test images."""
    from . import data

    arrays = data.load(folder, files)
    x = arrays["train_images"].reshape(arrays["train_images"].shape[0], -1).float() / 255
    y = arrays["train_labels"].long()
    x_te = arrays["test_images"].reshape(arrays["test_images"].shape[0], -1).float() / 255
    n_val = max(1, x.shape[0] // 6)
    tr, va = _split(x.shape[0], n_val)
    x_tr, x_va, x_te = _standardise(x[tr], x[va], x_te)
    return Data("fashion-mnist", x_tr, y[tr], x_va, y[va], x_te, arrays["test_labels"].long(), str(folder))


def load_digits() -> Data:
    """scikit-learn's 8x8 digits: 1,149 train / 288 validation / 360 test (fixed split)."""
    from sklearn.datasets import load_digits as _digits

    x_all, y_all = _digits(return_X_y=True)
    x, y = torch.as_tensor(x_all, dtype=torch.float32), torch.as_tensor(y_all, dtype=torch.long)
    rest, test = _split(x.shape[0], 360)
    n_val = 288
    tr, va = rest[n_val:], rest[:n_val]
    x_tr, x_va, x_te = _standardise(x[tr], x[va], x[test])
    return Data("digits", x_tr, y[tr], x_va, y[va], x_te, y[test], "sklearn.datasets.load_digits")


def _get_data(args: argparse.Namespace, note: Any) -> Data:
    from . import data

    if args.download:
        dest = args.data or data.cache_dir()
        note(f"downloading Fashion-MNIST into {dest}")
        try:
            data.download(dest, base_url=args.mirror or data.BASE_URL, progress=not args.no_progress)
        except data.DataError as err:
            raise SystemExit(f"torch-lamb demo: {err}") from None
    if not args.digits:
        folder, notes = data.find(args.data)
        for n in notes:
            note(f"skipped {n}")
        if folder is not None:
            try:
                return load_fashion(folder)
            except data.DataError as err:
                note(f"{err}; remove it, or run with --download")
        else:
            note(data.HOW_TO_GET + ".")
        note("Falling back to scikit-learn's digits, which show no large-batch effect.")
    try:
        return load_digits()
    except ImportError:
        from ._hints import install_hint

        raise SystemExit("torch-lamb demo: the digits fallback needs scikit-learn: install it with "
                         f"{install_hint(['scikit-learn'], 'demo')}, or get Fashion-MNIST as above") from None


# ----------------------------------------------------------------------------- training


def _model(n_in: int, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(n_in, 128)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(128, 128)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(128, 10)),
    ])).to(device)


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "lamb":
        from . import Lamb

        return Lamb(model.named_parameters(), learning_rate=lr, betas=BETAS, epsilon=EPS)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")


def _lr_factor(step: int, total: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """Linear warmup then linear decay; ``step`` counts from 0."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _steps(n_train: int, batch: int, epochs: int) -> int:
    return max(1, n_train // batch) * epochs


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits = model(x)
    return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def _train(phase: str, name: str, batch: int, mult: float, peak: float, epochs: int, data: Data, seed: int,
           bar: Any, trust: bool, warmup: float = WARMUP_FRACTION) -> RunResult:
    x_tr, y_tr = data.x_train, data.y_train
    n = x_tr.shape[0]
    per_epoch = max(1, n // batch)  # every step sees exactly `batch` examples
    total = per_epoch * epochs
    model = _model(data.n_features, seed, x_tr.device)
    opt = _optimizer(name, model, peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
    pending: list[torch.Tensor] = []
    names: list[str] = []
    if trust:
        opt.track_trust_ratios(True)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed + 1)
    train_losses, val_losses = [], []
    diverged = False
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x_tr.device)
        model.train()
        running = torch.zeros((), device=x_tr.device)
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach()
            if trust:
                recs = opt.last_trust_ratios()  # type: ignore[attr-defined]
                names = list(recs)
                pending.append(torch.stack([r.ratio for r in recs.values()]))  # stays on device
        if bar is not None:
            bar.update(per_epoch)
        val_loss, _ = _evaluate(model, data.x_val, data.y_val)
        train_losses.append((running / per_epoch).item())  # one host read per epoch
        val_losses.append(val_loss.item())
        if not (math.isfinite(train_losses[-1]) and math.isfinite(val_losses[-1])):
            diverged = True
            if bar is not None:
                bar.update(per_epoch * (epochs - len(train_losses)))
            break
    _, val_acc = _evaluate(model, data.x_val, data.y_val)
    _, test_acc = _evaluate(model, data.x_test, data.y_test)
    wall = time.perf_counter() - start
    ratios = None
    if trust and pending:
        stacked = torch.stack(pending).cpu()  # one host read for the whole run
        ratios = {pname: stacked[:, j].tolist() for j, pname in enumerate(names)}
    return RunResult(phase, name, batch, seed, mult, peak, total, train_losses[-1], val_acc.item(),
                     test_acc.item(), diverged, wall, train_losses, val_losses, ratios)


# ----------------------------------------------------------------------------- reporting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _spread(vals: list[float]) -> str:
    if len(vals) == 1:
        return _pct(vals[0])
    return f"{_pct(sum(vals) / len(vals))} ({_pct(min(vals))}-{_pct(max(vals))})"


def _group(results: list[RunResult], phase: str) -> dict[tuple[str, int, float], list[RunResult]]:
    """Runs by (optimizer, batch, multiplier). The "grid" phase includes the rule's runs (1x) at its batch."""
    grid_batches = {r.batch_size for r in results if r.phase == "grid"}
    out: dict[tuple[str, int, float], list[RunResult]] = {}
    for r in results:
        if r.phase == phase or (phase == "grid" and r.phase == "rule" and r.batch_size in grid_batches):
            out.setdefault((r.optimizer, r.batch_size, r.lr_multiplier), []).append(r)
    return out


def _mean(rs: list[RunResult], key: str) -> float:
    return sum(getattr(r, key) for r in rs) / len(rs)


def best_tuned(results: list[RunResult], batch: int) -> dict[str, tuple[float, list[RunResult]]]:
    """Per optimizer, the grid point at ``batch`` with the best mean validation accuracy (ties: nearest 1x)."""
    best: dict[str, tuple[float, list[RunResult]]] = {}
    for (o, b, m), rs in _group(results, "grid").items():
        if b != batch:
            continue
        key = (_mean(rs, "val_accuracy"), -abs(math.log(m)))
        if o not in best or key > (_mean(best[o][1], "val_accuracy"), -abs(math.log(best[o][0]))):
            best[o] = (m, rs)
    return best


def format_tables(results: list[RunResult]) -> str:
    """The results as plain-text tables (accuracies in %, mean and min-max over seeds)."""
    lines = []
    base: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        if r.phase == "base":
            base.setdefault((r.optimizer, r.peak_lr), []).append(r)
    if base:
        lines += [f"Base-lr selection at batch {results[0].batch_size} (validation accuracy %):"]
        for (o, lr), rs in sorted(base.items(), key=lambda kv: (OPTIMIZERS.index(kv[0][0]), kv[0][1])):
            lines.append(f"  {o:<6} lr {lr:<8.4g} val {_spread([r.val_accuracy for r in rs])}")
        lines.append("")
    head = (f"{'optimizer':<9} {'batch':>6} {'steps':>6} {'peak lr':>9} {'train loss':>10} "
            f"{'val acc %':>18} {'test acc %':>18} {'time s':>7}")
    lines += ["Under the rule:", head, "-" * len(head)]
    for (o, b, _), rs in sorted(_group(results, "rule").items(), key=lambda kv: (kv[0][1], OPTIMIZERS.index(kv[0][0]))):
        lines.append(f"{o:<9} {b:>6} {rs[0].steps:>6} {rs[0].peak_lr:>9.4g} {_mean(rs, 'final_train_loss'):>10.4f} "
                     f"{_spread([r.val_accuracy for r in rs]):>18} {_spread([r.test_accuracy for r in rs]):>18} "
                     f"{_mean(rs, 'wall_time_s'):>7.1f}")
    grid = _group(results, "grid")
    if grid:
        batch = max(b for _, b, _ in grid)
        best = best_tuned(results, batch)
        lines += ["", f"lr grid at batch {batch} (x the rule's lr; * = best on validation):",
                  f"{'optimizer':<9} {'x lr':>6} {'peak lr':>9} {'val acc %':>18} {'test acc %':>18}"]
        for (o, _b, m), rs in sorted(grid.items(), key=lambda kv: (OPTIMIZERS.index(kv[0][0]), kv[0][2])):
            mark = "*" if best.get(o, (None,))[0] == m else " "
            div = "  diverged" if any(r.diverged for r in rs) else ""
            lines.append(f"{o:<9} {m:>6.3g} {rs[0].peak_lr:>9.4g} {_spread([r.val_accuracy for r in rs]):>18} "
                         f"{_spread([r.test_accuracy for r in rs]):>17}{mark}{div}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _batch_axis(ax: Any, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.5)


def _pct_axis(ax: Any, span: float) -> None:
    """Ticks at whole steps of 1, 2 or 5 (never 2.5), labelled with the decimals they need."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(steps=[1, 2, 5, 10]))
    digits = 0 if span >= 0.05 else 1
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.{digits}f}%")


def _acc_limits(ax: Any, vals: list[float], floor_span: float = 0.02) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    pad = max(floor_span, hi - lo) * 0.15
    lo, hi = lo - pad, min(1.0, hi + pad)
    ax.set_ylim(lo, hi)
    _pct_axis(ax, hi - lo)
    return lo, hi


def _plot_accuracy(ax: Any, results: list[RunResult]) -> None:
    rule = _group(results, "rule")
    batches = sorted({b for _, b, _ in rule})
    opts = [o for o in OPTIMIZERS if any(k[0] == o for k in rule)]
    vals: list[float] = []
    for i, o in enumerate(opts):
        xs, ys, lo, hi = [], [], [], []
        for b in batches:
            rs = rule.get((o, b, 1.0))
            if not rs:
                continue
            acc = [r.test_accuracy for r in rs]
            m = sum(acc) / len(acc)
            xs.append(b * (1 + 0.03 * (i - (len(opts) - 1) / 2)))  # a small offset: no line hides another
            ys.append(m)
            lo.append(m - min(acc))
            hi.append(max(acc) - m)
            vals += acc
        st = STYLE[o]
        ax.errorbar(xs, ys, yerr=[lo, hi], color=st["color"], marker=st["marker"], ls=st["ls"], lw=1.6, ms=6,
                    capsize=3, label=f"{LABEL[o]}, lr rule")
    grid = _group(results, "grid")
    if grid:
        gb = max(b for _, b, _ in grid)
        tuned = sorted(best_tuned(results, gb).items(), key=lambda kv: OPTIMIZERS.index(kv[0]))
        for i, (o, (m, rs)) in enumerate(tuned):
            acc = [r.test_accuracy for r in rs]
            mean = sum(acc) / len(acc)
            vals += acc
            ax.errorbar([gb * (1.12 + 0.06 * i)], [mean], yerr=[[mean - min(acc)], [max(acc) - mean]],
                        color=STYLE[o]["color"], marker="*", ms=13, mfc="white", mew=1.5, ls="none", capsize=3,
                        label=f"{LABEL[o]}, best of lr grid ({m:g}x)")
    _batch_axis(ax, batches)
    _acc_limits(ax, vals)
    ax.set_xlabel("batch size (same epochs for all)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def _plot_lr_grid(ax: Any, results: list[RunResult]) -> None:
    grid = _group(results, "grid")
    gb = max(b for _, b, _ in grid)
    mults = sorted({m for _, b, m in grid if b == gb})
    opts = [o for o in OPTIMIZERS if any(k[0] == o for k in grid)]
    best_val = max(_mean(rs, "val_accuracy") for rs in grid.values())
    lo_lim = best_val - 0.25  # keep the spread near the top readable; collapses are drawn at the floor
    floor = lo_lim + 0.01
    for k, o in enumerate(opts):
        st = STYLE[o]
        lines = (("val_accuracy", st["ls"], 1.0, "validation"), ("test_accuracy", ":", 0.55, "test"))
        for key, ls, alpha, what in lines:
            xs = [m for m in mults if (o, gb, m) in grid]
            ys = [_mean(grid[(o, gb, m)], key) for m in xs]
            shown = [max(y, floor) for y in ys]
            ax.plot(xs, shown, color=st["color"], marker=st["marker"], ls=ls, alpha=alpha, lw=1.6,
                    label=f"{LABEL[o]}, {what}")
            for x, y in zip(xs, ys):
                if y < floor and key == "val_accuracy":
                    ax.annotate(f"{_pct(y)}%", (x, floor), textcoords="offset points", xytext=(-34, 8 + 13 * k),
                                fontsize=9, color=st["color"], fontweight="bold")
    ax.set_xscale("log", base=2)
    ax.set_xticks(mults)
    ax.set_xticklabels([f"{m:g}x" for m in mults])
    ax.minorticks_off()
    ax.set_ylim(lo_lim, min(1.0, best_val + 0.03))
    _pct_axis(ax, min(1.0, best_val + 0.03) - lo_lim)
    ax.set_xlabel(f"peak lr / the rule's lr (batch {gb})")
    ax.set_ylabel("accuracy")
    ax.set_title(f"lr sensitivity at batch {gb} (runs off the scale: drawn at the bottom, value shown)", fontsize=9.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)


def _plot_losses(ax: Any, results: list[RunResult], batch: int, legend: bool = True) -> None:
    steps = 0
    for (o, b, _), rs in sorted(_group(results, "rule").items(), key=lambda kv: OPTIMIZERS.index(kv[0][0])):
        if b != batch:
            continue
        r = rs[0]
        steps = r.steps
        ep = range(1, len(r.epoch_train_loss) + 1)
        ax.plot(ep, r.epoch_train_loss, color=STYLE[o]["color"], ls="-", marker=STYLE[o]["marker"], ms=3,
                label=f"{LABEL[o]} train (epoch mean)")
        ax.plot(ep, r.epoch_val_loss, color=STYLE[o]["color"], ls="--", label=f"{LABEL[o]} validation")
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.set_title(f"Loss per epoch, batch {batch} ({steps} steps)")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _plot_trust(ax: Any, run: RunResult) -> None:
    assert run.trust_ratios is not None
    for name, ratios in run.trust_ratios.items():
        ax.plot(range(1, len(ratios) + 1), ratios, label=name, lw=1.3,
                ls="-" if name.endswith("weight") else "--")
    ax.set_yscale("log")
    ax.set_xlabel("update step")
    ax.set_ylabel("trust ratio ||w|| / ||u||")
    ax.set_title(f"Lamb per-layer trust ratios, batch {run.batch_size}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=3, loc="best")


def plots(out: Path, results: list[RunResult]) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    rule = [r for r in results if r.phase == "rule"]
    batches = sorted({r.batch_size for r in rule})
    has_grid = any(r.phase == "grid" for r in results)
    trust = {r.batch_size: r for r in rule if r.trust_ratios and r.seed == min(x.seed for x in rule)}

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _plot_accuracy(ax, results)
    save(fig, "accuracy_vs_batch.png")
    if has_grid:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        _plot_lr_grid(ax, results)
        save(fig, "lr_sensitivity.png")
    fig, axes = plt.subplots(1, len(batches), figsize=(3.6 * len(batches), 3.4), squeeze=False, sharey=True)
    for i, (ax, b) in enumerate(zip(axes[0], batches)):
        _plot_losses(ax, results, b, legend=i == 0)
    save(fig, "loss_curves.png")
    if trust:
        tb = [b for b in (batches[0], batches[-1]) if b in trust]
        tb = list(dict.fromkeys(tb))
        fig, axes = plt.subplots(1, len(tb), figsize=(6 * len(tb), 4.0), squeeze=False)
        for ax, b in zip(axes[0], tb):
            _plot_trust(ax, trust[b])
        save(fig, "trust_ratios.png")
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 9))
    _plot_accuracy(axes[0][0], results)
    if has_grid:
        _plot_lr_grid(axes[0][1], results)
    else:
        axes[0][1].set_axis_off()
    _plot_losses(axes[1][0], results, batches[-1])
    if batches[-1] in trust:
        _plot_trust(axes[1][1], trust[batches[-1]])
    else:
        axes[1][1].set_axis_off()
    save(fig, "summary.png")
    return written


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_before_work(parser, args)
    mode = MODES["quick" if args.quick else "full" if args.full else "default"]
    t_start = time.perf_counter()

    def note(msg: str) -> None:
        print(f"note: {msg}", file=sys.stderr)

    torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    data = _get_data(args, note)
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        setattr(data, k, getattr(data, k).to(device))
    n_train = int(data.x_train.shape[0])
    batches = list(args.batch_sizes or mode["batches"])
    if max(batches) > n_train:
        capped = sorted({min(b, n_train) for b in batches})
        note(f"batch sizes above the {n_train} training examples of {data.name} run as full batch: {capped}")
        batches = capped
    epochs = args.epochs or (DIGITS_EPOCHS if data.name == "digits" else mode["epochs"])
    seeds = list(range(args.seeds or mode["seeds"]))
    grid = list(args.lr_grid or mode["grid"])
    if 1.0 not in grid:
        grid.append(1.0)
        grid.sort()
    opts = list(args.optimizers)
    select = mode["select"] and args.base_lr is None
    base = {o: (args.base_lr or {}).get(o, BASE_LR[o]) for o in opts}

    # Plan every run up front, so that the bar knows the total.
    plan: list[tuple[str, str, int, float, int]] = []  # phase, optimizer, batch, multiplier or base lr, seed
    base_batch = min(BASE_BATCH, n_train)
    if select:
        plan += [("base", o, base_batch, lr, s) for o in opts for lr in BASE_GRID[o] for s in seeds]
    plan += [("rule", o, b, 1.0, s) for b in batches for o in opts for s in seeds]
    gb = batches[-1]
    plan += [("grid", o, gb, m, s) for o in opts for m in grid if m != 1.0 for s in seeds]
    total_steps = sum(_steps(n_train, b, epochs) for _, _, b, _, _ in plan)

    print(f"torch-lamb demo: {data.name} ({n_train} train / {data.y_val.shape[0]} validation / "
          f"{data.y_test.shape[0]} test, from {data.source}), MLP {data.n_features}-128-128-10, {epochs} epochs, "
          f"device {device}, {plural(torch.get_num_threads(), 'thread')}, seeds {seeds}")
    print(f"learning-rate rule: {lr_rule(args.warmup)}")
    print(f"{len(plan)} runs, {total_steps} steps in all")
    bar = None
    if not args.no_progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:  # tqdm ships in the demo extra; without it the run goes on, without a bar
            from ._hints import install_hint

            note(f"no progress bar: tqdm is not installed ({install_hint(['tqdm'], 'demo')})")
    results: list[RunResult] = []

    def run(phase: str, o: str, b: int, m: float, s: int, peak: float) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{phase} {o} batch {b} lr {peak:.3g} seed {s}")
        results.append(_train(phase, o, b, m, peak, epochs, data, s, bar, o == "lamb" and phase == "rule",
                              args.warmup))

    for phase, o, b, v, s in plan:
        if phase == "base":
            run(phase, o, b, 1.0, s, v)
            continue
        if select and phase == "rule" and not any(r.phase == "rule" for r in results):
            for oo in opts:  # the base lrs are now chosen: the best mean validation accuracy
                cands = {r.peak_lr for r in results if r.phase == "base" and r.optimizer == oo}
                base[oo] = max(cands, key=lambda lr, oo=oo: _mean(
                    [r for r in results if r.phase == "base" and r.optimizer == oo and r.peak_lr == lr],
                    "val_accuracy"))
        run(phase, o, b, v, s, base[o] * v * math.sqrt(b / BASE_BATCH))
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start

    print("\nbase lr at batch 128: " + ", ".join(f"{o} {base[o]:g}" for o in opts)
          + (" (selected on validation)" if select else " (given)"))
    print(format_tables(results))
    fields = ["phase", "optimizer", "batch_size", "seed", "lr_multiplier", "peak_lr", "steps", "final_train_loss",
              "val_accuracy", "test_accuracy", "diverged", "wall_time_s"]
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in results:
            w.writerow([getattr(r, k) for k in fields])
    rows = []
    for r in results:
        d = asdict(r)
        if not args.save_trust_ratios:
            d.pop("trust_ratios")
        rows.append(d)
    meta = {
        "dataset": data.name, "source": data.source, "n_train": n_train, "n_val": int(data.y_val.shape[0]),
        "n_test": int(data.y_test.shape[0]), "model": f"MLP {data.n_features}-128-128-10 (ReLU)",
        "epochs": epochs, "batch_sizes": batches, "seeds": seeds, "lr_grid": grid, "device": str(device),
        "lr_rule": lr_rule(args.warmup), "warmup_fraction": args.warmup, "base_batch": BASE_BATCH,
        "base_lr": base, "base_lr_selected": select,
        "betas": BETAS, "eps": EPS, "weight_decay": 0.0, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "mode": "quick" if args.quick else "full" if args.full else "default",
        "elapsed_s": elapsed, "results": rows,
    }
    (args.out / "results.json").write_text(json.dumps(meta, indent=1))
    pngs = [] if args.no_plots else plots(args.out, results)
    print(f"\n{elapsed:.0f} s of training; wrote {args.out / 'results.csv'}, {args.out / 'results.json'}, "
          + ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
