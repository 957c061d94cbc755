"""``python -m torch_lamb.bench`` / ``torch-lamb bench``: time a LAMB step against its references.

Every row steps its own optimizer over one shared set of CPU parameters (float32 unless
``--dtype`` says otherwise; fixed random gradients). Rows run interleaved, round by round, so
machine noise hits them alike; the table gives the median step, the ratio to torch's fused AdamW,
the implied bandwidth (nominal bytes per parameter, :func:`nominal_bytes`: in float32, 40 for
LAMB's two passes, 28 for AdamW's one, 88 for every feature), the time against the floor's rate
for the row's bytes, the optimizer state, the largest transient allocation of a step (peak RSS
during the step minus RSS before it), the first step and, for the LAMB rows, the trust ratios of
one update (``ratios``: counted after the timed rounds, in one more step with telemetry on).

Rows: ``lamb-fused`` (torch-lamb's default), ``lamb-fused-sliced`` (the default with one trust ratio
per index along dim 0 of every 3-D parameter, an MoE expert bank ``[experts, in, out]``:
``set_trust_ratio_slices(dim=0)``; only for cases that have such a parameter, ``moe`` and ``moe-
large``; the report gives its per-round ratio to ``lamb-fused``, the cost of per-expert ratios over
per-tensor ones), ``lamb-fused-skip`` (the default with ``skip_nonfinite=True``), ``lamb-fused-
master`` (``master_weights=True``; with ``--dtype bfloat16/float16`` only), ``lamb-foreach``,
``lamb-compiled`` (the ``compiled`` backend: its first step, in the ``first ms`` column, is the cold
compile; ``lamb-compiled-all`` on request), the fused and foreach steps with every Keras feature on
(``-all``: gradient accumulation over 2 micro-steps, global-norm clipping, EMA; one "step" is the 2
calls that make one update), torch's AdamW (fused, foreach), timm's Lamb (when timm is installed;
loaded from its file without timm's package), and ``floor`` (float32 only): LAMB's two passes over
the same tensors, in the fused kernel's blocks and segments, with the arithmetic taken out (the
least time LAMB's 40 bytes per parameter take here; without the kernel, a scaled torch copy).

Cases: ``bert-base``, ``bert-large``, ``small-many`` (2000 small vectors), ``huge`` (one 64M vector),
``moe`` (64 experts, each a 512 -> 1024 -> 512 FFN, in two banks ``[64, 512, 1024]`` and
``[64, 1024, 512]``, plus a router and two 512x512 projections: 67.7M parameters, near BERT-base),
``moe-large`` (the full-size 64 experts of 1024 -> 4096 -> 1024: 539M parameters, about 20 GiB with
its rows) and ``tiny`` (for tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CASES", "main"]

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-6, 0.01
LAMB_BPP = 40  # float32: see nominal_bytes
SPREAD_WARNING = 0.10  # a row whose per-round ratios span more than this fraction of their median is flagged
# all features, per update of 2 micro-steps: the first call accumulates (read g, acc; write acc: 12 B)
# and moves the EMA (read p, avg; write avg: 12); the second reads g and acc for the global norm (8),
# then pass 1 reads p, g, acc, m, v and writes acc (zeroed), m, v (32), and pass 2 reads p, m, v, avg
# and writes p, avg (24)
LAMB_ALL_BPP = 12 + 12 + 8 + 32 + 24


def _bert(h: int, ff: int, layers: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(30522, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (ff, h), (ff,), (h, ff), (h,), (h,), (h,)]
    return [*shapes, (h, h), (h,)]


def _small_many(n: int = 2000, lo: int = 1000, hi: int = 5000) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(int(x),) for x in torch.randint(lo, hi + 1, (n,), generator=g)]


def _moe(experts: int, d: int, h: int) -> list[tuple[int, ...]]:
    """An MoE block: a router, two dense d x d projections, a LayerNorm and two expert banks."""
    return [(experts, d), (experts,), (d, d), (d,), (d, d), (d,), (d,), (d,), (experts, d, h), (experts, h, d)]


CASES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "bert-base": lambda: _bert(768, 3072, 12),
    "bert-large": lambda: _bert(1024, 4096, 24),
    "small-many": _small_many,
    "huge": lambda: [(64 * 1024 * 1024,)],
    "moe": lambda: _moe(64, 512, 1024),
    "moe-large": lambda: _moe(64, 1024, 4096),
    "tiny": lambda: [(64, 64), (64,), (1000,)],
}
DEFAULT_ROWS = ["lamb-fused", "lamb-fused-sliced", "lamb-fused-skip", "lamb-fused-master", "lamb-foreach",
                "lamb-compiled", "lamb-fused-all", "lamb-foreach-all", "lamb-fused-scaler", "adamw-fused",
                "adamw-fused-scaler", "adamw-foreach", "timm-lamb", "floor"]
LARGE_ROWS = ["lamb-fused", "lamb-foreach", "adamw-fused", "floor"]  # bert-large: fits in 24 GiB
CASE_ROWS = {
    "bert-large": LARGE_ROWS,
    "moe-large": ["lamb-fused", "lamb-fused-sliced", "adamw-fused", "floor"],
    # the compiled backend's compile time grows with the tensors of a bucket: 2,000 take many minutes
    "small-many": [r for r in DEFAULT_ROWS if r != "lamb-compiled"],
}
SLICED, PER_TENSOR = "lamb-fused-sliced", "lamb-fused"  # the report gives the cost of the one over the other
PAIRS = [(SLICED, PER_TENSOR), ("lamb-fused-scaler", "lamb-fused"), ("adamw-fused-scaler", "adamw-fused")]
QUICK_CASES = ["small-many", "bert-base"]  # --quick: these cases, 3 rounds, QUICK_ROWS for bert-base
QUICK_ROWS = ["lamb-fused", "lamb-fused-all", "lamb-fused-scaler", "adamw-fused", "adamw-fused-scaler", "floor"]
QUICK_ROUNDS = 3
# measured (docs/performance.md, The benchmark)
QUICK_COST = "40 s on 2 idle cores, 2.5 minutes on a busy machine; peaks at 5.6 GB of memory"
# the --help description: plain text (the module docstring's first line is reStructuredText)
DESCRIPTION = ("Time a LAMB optimizer step against torch's AdamW, timm's Lamb and a memory-traffic floor, on "
               "parameter sets shaped like real models. Also: python -m torch_lamb.bench.")
_PROGRESS = {"on": True}


def progress(msg: str) -> None:
    """One line of progress on stderr (stdout stays clean for --json)."""
    if _PROGRESS["on"]:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def memory_estimate(numel: int, rows: list[str], dtype: torch.dtype = torch.float32) -> int:
    """Bytes a case needs, roughly: parameters and gradients, plus each row's state and step transient.

    Per parameter (e = bytes of ``dtype``): 2e shared; Lamb's float32 state 8 (m, v), 12 with
    master weights, 16 with every feature (plus accumulators and averages); the foreach rows add an
    update-sized float32 transient (8); AdamW's state 2e; timm's 2e plus a 4 B transient; the floor's
    scratch 2e.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    per = {"lamb-fused": 8, "lamb-fused-sliced": 8, "lamb-compiled": 8, "lamb-fused-master": 12, "lamb-foreach": 16,
           "lamb-fused-all": 16,
           "lamb-foreach-all": 24, "adamw-fused": 2 * e, "adamw-foreach": 2 * e, "timm-lamb": 2 * e + 4,
           "floor": 2 * e}
    return numel * (2 * e + sum(per.get(r, 8) for r in rows))




def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def load_timm_lamb() -> type | None:
    """timm's ``Lamb`` loaded from ``timm/optim/lamb.py`` without timm's package ``__init__``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        return None
    root = os.path.dirname(spec.origin)
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]}
    try:
        for name, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
        from timm.optim.lamb import Lamb as TimmLamb  # type: ignore[import-not-found]

        return TimmLamb
    except Exception:
        return None
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


class _Row:
    def __init__(self, name: str, step: Callable[[], Any], bpp: int, state: Callable[[], int],
                 opt: torch.optim.Optimizer | None = None) -> None:
        self.name, self.step, self.bpp, self.state_bytes = name, step, bpp, state
        self.lamb = opt  # a Lamb row: after the timed rounds, one more step counts its trust ratios
        self.trust_ratios: int | None = None
        self.times: list[float] = []
        self.transient_mb = 0.0
        self.first_s = float("nan")


def _state_bytes(opt: torch.optim.Optimizer) -> Callable[[], int]:
    def count() -> int:
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)
    return count


def nominal_bytes(row: str, dtype: torch.dtype) -> int:
    """Bytes per parameter a row must move, for parameters and gradients of ``dtype`` (e bytes each).

    LAMB (float32 state): pass 1 reads p, g, m, v and writes m, v; pass 2 reads p, m, v and writes
    p: 4e + 24 (40 in float32). With master weights p is the float32 master and pass 2 also writes
    the e-byte copy: 2e + 36. Every feature on, per update: ``LAMB_ALL_BPP`` in float32, 7e + 60 in
    general. AdamW and timm keep their state in the parameters' dtype: 7e and 10e.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    if row.endswith("-all"):
        return 7 * e + 60
    if row == "lamb-fused-master":
        return 2 * e + 36
    if row == "lamb-fused-skip":  # the finite check reads g once more
        return 5 * e + 24
    if row.startswith("adamw-"):
        return 7 * e
    if row == "timm-lamb":
        return 10 * e
    return 4 * e + 24


def _make_rows(names: list[str], params: list[torch.Tensor], numel: int) -> list[_Row]:
    from .optimizer import Lamb

    dtype = params[0].dtype
    rows = []
    for name in names:
        if name.startswith("lamb-"):
            impl = {"fused": "auto"}.get(name.split("-")[1], name.split("-")[1])  # lamb-fused: the default
            kw: dict[str, Any] = {}
            calls = 1
            if name.endswith("-scaler"):
                kw = {}
            if name.endswith("-all"):
                kw = {"gradient_accumulation_steps": 2, "global_clipnorm": 1.0, "use_ema": True}
                calls = 2
            if name.endswith("-skip"):  # skip_nonfinite=True: one more read of g for the finite check
                kw = {"skip_nonfinite": True}
            if name.endswith("-master"):
                if dtype == torch.float32:
                    continue  # master weights are for float16/bfloat16 parameters
                kw = {"master_weights": True}
            banks = [p for p in params if p.dim() == 3]  # expert banks [experts, in, out]
            if name.endswith("-sliced") and not banks:
                continue  # nothing to slice in this case
            opt = Lamb(params, learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                       implementation=impl, **kw)
            if name.endswith("-sliced"):
                opt.set_trust_ratio_slices(var_list=banks, dim=0)  # one trust ratio per expert

            def step(opt: Lamb = opt, calls: int = calls) -> None:
                for _ in range(calls):
                    opt.step()

            rows.append(_Row(name, _scaled(opt) if name.endswith("-scaler") else step, nominal_bytes(name, dtype),
                             _state_bytes(opt), opt))
        elif name.startswith("adamw-"):
            flag = {"fused": True} if name.startswith("adamw-fused") else {"foreach": True}
            opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flag)
            rows.append(_Row(name, _scaled(opt) if name.endswith("-scaler") else opt.step,
                             nominal_bytes(name, dtype), _state_bytes(opt)))
        elif name == "timm-lamb":
            timm_lamb = load_timm_lamb()
            if timm_lamb is None:
                continue
            opt = timm_lamb(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
            rows.append(_Row(name, opt.step, nominal_bytes(name, dtype), _state_bytes(opt)))
        elif name == "floor":
            if dtype == torch.float32:  # the floor streams float32 parameters
                rows.append(_floor_row(params, numel))
        else:
            raise ValueError(f"unknown row {name!r}; known: {DEFAULT_ROWS}")
    return rows


def _scaled(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """A step through ``torch.amp.GradScaler`` (``scaler.step(opt)``, then ``update()``). Its scale stays 1, so
    that the gradients keep their values from round to round whichever path unscales them."""
    scaler = torch.amp.GradScaler(next(p.device.type for g in opt.param_groups for p in g["params"]),
                                  init_scale=1.0, growth_interval=2**30)

    scaler.scale(torch.zeros(()))  # GradScaler makes its scale when it first scales a loss

    def step() -> None:
        scaler.step(opt)
        scaler.update()

    return step


def _floor_row(params: list[torch.Tensor], numel: int) -> _Row:
    """LAMB's two passes over the same tensors, in the kernel's blocks and segments, with no arithmetic
    (the kernel's own floor build). Without it: a torch copy of 8 B per element, scaled to 40 B."""
    from .backends import cpu_kernel

    stream = cpu_kernel.floor_stream(params, [p.grad for p in params])
    if stream is not None:
        return _Row("floor", stream, LAMB_BPP, lambda: 8 * numel)
    n = min(numel, 32 * 1024 * 1024)
    src, dst = torch.ones(n), torch.empty(n)
    reps = LAMB_BPP / 8 * numel / n  # a copy moves 8 B per element

    def copy_floor() -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        return (time.perf_counter() - t0) * reps

    return _Row("floor", copy_floor, LAMB_BPP, lambda: 8 * n)


def import_times(rounds: int) -> dict[str, Any]:
    """``from torch_lamb import Lamb`` against ``import torch``, each in a fresh interpreter, one after the other
    in each round (the same machine load): medians, and the ratio's spread over the rounds."""
    def once(statement: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
        return time.perf_counter() - t0

    torch_s, lamb_s = [], []
    for i in range(rounds):
        torch_s.append(once("import torch"))
        lamb_s.append(once("from torch_lamb import Lamb"))
        progress(f"  import round {i + 1}/{rounds}: torch {torch_s[-1]:.2f} s, torch_lamb {lamb_s[-1]:.2f} s")
    return {"rounds": rounds, "torch_s": statistics.median(torch_s), "torch_lamb_s": statistics.median(lamb_s),
            "ratio": statistics.median(lamb_s) / statistics.median(torch_s),
            "ratio_spread": _spread([a / b for a, b in zip(lamb_s, torch_s)])}


def _cold_compile_s() -> float | None:
    """Seconds to compile the kernel from scratch (into a throwaway cache directory)."""
    from .backends import kernel_build

    cc = kernel_build.compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        try:
            kernel_build.build_kernel(Path(d) / "k.so", cc, kernel_build.FLAGS)
        except kernel_build.KernelError:
            return None
        return time.perf_counter() - t0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def run_case(case: str, rounds: int, rows: list[str] | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Time one parameter set (parameters and gradients of ``dtype``); returns a JSON-ready dict."""
    from .backends.kernel_build import kernel_status

    shapes = CASES[case]()
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    names = rows or CASE_ROWS.get(case, DEFAULT_ROWS)
    progress(f"case {case}: {len(shapes)} tensors, {numel / 1e6:.1f}M {str(dtype).removeprefix('torch.')} params, "
             f"{plural(len(names), 'row')}, {plural(rounds, 'round')}; "
             f"needs about {memory_estimate(numel, names, dtype) / 2**30:.1f} GiB")
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        params.append(p)
    rss_base = _rss_mb()
    t0 = time.perf_counter()
    kernel = kernel_status().available
    load_s = time.perf_counter() - t0
    table = _make_rows(names, params, numel)
    peak = _rss_mb("VmHWM")
    can_peak = _reset_peak()
    for row in table:  # first step: state allocation (and any compilation)
        t0 = time.perf_counter()
        row.step()
        row.first_s = time.perf_counter() - t0
        progress(f"  {case} {row.name}: first step {row.first_s * 1e3:.0f} ms")
    for i in range(rounds):
        for row in table:
            before = _rss_mb()
            peak = max(peak, _rss_mb("VmHWM"))
            if can_peak:
                _reset_peak()
            t0 = time.perf_counter()
            out = row.step()
            dt = time.perf_counter() - t0
            row.times.append(out if isinstance(out, float) else dt)
            if can_peak:
                row.transient_mb = max(row.transient_mb, _rss_mb("VmHWM") - before)
        progress(f"  {case} round {i + 1}/{rounds}: "
                 + ", ".join(f"{r.name} {r.times[-1] * 1e3:.1f} ms" for r in table))
    for row in table:  # untimed: one more step with telemetry on, to count the trust ratios of an update
        if row.lamb is not None:
            row.lamb.track_trust_ratios(True)
            row.step()
            row.trust_ratios = len(row.lamb.last_trust_ratios())
            row.lamb.track_trust_ratios(False)
    ref = next((r for r in table if r.name == "adamw-fused"), None)
    ref_ms = statistics.median(ref.times) * 1e3 if ref else None
    floor = next((r for r in table if r.name == "floor"), None)
    floor_ms_per_byte = statistics.median(floor.times) * 1e3 / floor.bpp if floor else None
    out_rows = []
    for row in table:
        ms = statistics.median(row.times) * 1e3
        # per round, against the reference timed in the same round: the spread says how far to trust it
        per_round = [t / r for t, r in zip(row.times, ref.times)] if ref else []
        # and against the floor's time for the row's bytes, in the same round
        per_round_floor = ([t / (f * row.bpp / floor.bpp) for t, f in zip(row.times, floor.times)]
                           if floor else [])
        out_rows.append({
            "name": row.name,
            "median_ms": ms,
            "min_ms": min(row.times) * 1e3,
            "ratio_vs_adamw_fused": ms / ref_ms if ref_ms else None,
            "ratio_spread": _spread(per_round),
            "ratio_vs_floor": ms / (floor_ms_per_byte * row.bpp) if floor_ms_per_byte else None,
            "floor_spread": _spread(per_round_floor),
            "gb_per_s": row.bpp * numel / (ms * 1e-3) / 1e9,
            "bytes_per_param": row.bpp,
            "state_mb": row.state_bytes() / 2**20,
            "transient_mb": row.transient_mb,
            "first_step_ms": row.first_s * 1e3,
            "trust_ratios": row.trust_ratios,
        })
    by_name = {r.name: r for r in table}
    pairs = {}
    for row, against in PAIRS:
        if row in by_name and against in by_name:  # timed in the same rounds, one right after the other
            a, b = by_name[row].times, by_name[against].times
            pairs[row] = {"row": row, "vs": against, "ratio": statistics.median(a) / statistics.median(b),
                          "ratio_spread": _spread([x / y for x, y in zip(a, b)])}
    return {
        "case": case,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(shapes),
        "params": numel,
        "rounds": rounds,
        "fused_kernel": kernel,
        "kernel_load_s": load_s,
        "rss_base_mb": rss_base,
        "peak_rss_mb": max(peak, _rss_mb("VmHWM")),
        "rows": out_rows,
        "sliced_vs_per_tensor": pairs.get(SLICED),
        "scaler_vs_plain": [pairs[r] for r, _ in PAIRS if r != SLICED and r in pairs],
    }


def plural(count: int, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _spread(ratios: list[float]) -> list[float] | None:
    """[min, median, max] of per-round ratios (None without any)."""
    return [min(ratios), statistics.median(ratios), max(ratios)] if ratios else None


def _is_wide(spread: list[float] | None) -> bool:
    return bool(spread) and spread[2] - spread[0] > SPREAD_WARNING * spread[1]


def _spread_text(spread: list[float] | None) -> str:
    return f"{spread[0]:.2f}/{spread[1]:.2f}/{spread[2]:.2f}" if spread else "-"


def _print(result: dict[str, Any]) -> None:
    print(f"\ncase {result['case']}: {result['tensors']} tensors, "
          f"{result['params'] / 1e6:.2f}M {result['dtype']} params, "
          f"{plural(result['rounds'], 'round')}, fused kernel {'on' if result['fused_kernel'] else 'OFF (fallback)'}")
    print(f"{'row':<18}{'median ms':>11}{'vs AdamW':>10}{'per round':>18}{'GB/s':>8}{'B/param':>9}{'vs floor':>10}"
          f"{'per round':>18}{'state MB':>10}{'transient MB':>14}{'first ms':>10}{'ratios':>8}")
    noisy, noisy_floor = [], []
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_adamw_fused']:.2f}x" if r["ratio_vs_adamw_fused"] else "-"
        floor = f"{r['ratio_vs_floor']:.2f}x" if r["ratio_vs_floor"] else "-"
        spread, floor_spread = r.get("ratio_spread"), r.get("floor_spread")
        count = r.get("trust_ratios")
        if _is_wide(spread):
            noisy.append(r["name"])
        if _is_wide(floor_spread):
            noisy_floor.append(r["name"])
        print(f"{r['name']:<18}{r['median_ms']:>11.1f}{ratio:>10}{' ' + _spread_text(spread):>18}{r['gb_per_s']:>8.1f}"
              f"{r['bytes_per_param']:>9}{floor:>10}{' ' + _spread_text(floor_spread):>18}{r['state_mb']:>10.0f}"
              f"{r['transient_mb']:>14.1f}{r['first_step_ms']:>10.1f}{count if count is not None else '-':>8}")
    for cost, what in ((result.get("sliced_vs_per_tensor"), "per-slice vs per-tensor trust ratios"),
                       *((c, "a GradScaler step vs a plain step") for c in result.get("scaler_vs_plain", []))):
        if cost:
            low, mid, high = cost["ratio_spread"]
            print(f"{cost['row']} vs {cost['vs']} ({what}): {cost['ratio']:.3f}x "
                  f"(per round {low:.3f}-{high:.3f}, median {mid:.3f})")
    print(f"RSS: {result['rss_base_mb']:.0f} MB with params+grads, "
          f"peak {result['peak_rss_mb']:.0f} MB (all rows)")
    for against, names in (("AdamW", noisy), ("the floor", noisy_floor)):
        if names:
            print(f"warning: the per-round ratio to {against} spans more than {SPREAD_WARNING:.0%} of its median "
                  f"for {', '.join(names)}: the machine was too noisy to compare these rows with {against}; "
                  "run again on a quiet one")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    ap = argparse.ArgumentParser(prog="torch-lamb bench", description=DESCRIPTION, allow_abbrev=False)
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="parameter set (repeatable; default: bert-base and small-many)")
    ap.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default: 7; --quick: {QUICK_ROUNDS})")
    ap.add_argument("--quick", action="store_true",
                    help=f"cases {' and '.join(QUICK_CASES)} ({','.join(QUICK_ROWS)} for bert-base), "
                    f"{QUICK_ROUNDS} rounds: {QUICK_COST}")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the parameters and gradients (Lamb's state stays float32; default float32)")
    ap.add_argument("--rows", default=None, help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--import-rounds", type=int, default=None,
                    help="rounds of the import timing, in fresh interpreters (default: 5 without --case, else 0)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help="write JSON to FILE (or stdout when no FILE)")
    args = ap.parse_args(argv)
    _PROGRESS["on"] = not args.no_progress
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else 7
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.import_rounds is None:
        args.import_rounds = 0 if args.case else 5
    if args.import_rounds < 0:
        ap.error("--import-rounds must be >= 0")
    rows = args.rows.split(",") if args.rows else None
    for r in rows or ():
        if r not in DEFAULT_ROWS:
            ap.error(f"unknown row {r!r}; known: {','.join(DEFAULT_ROWS)}")

    from .backends import grad_scan
    from .backends.kernel_build import kernel_status

    progress("compiling the kernel once from scratch (timed), then loading it from the cache")
    cold = _cold_compile_s()
    t0 = time.perf_counter()
    status = kernel_status()
    cached = time.perf_counter() - t0
    progress("building or loading the gradient scan (a C++ pass the fused rows use when it is on)")
    scan = grad_scan.wait()
    report: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "compile_cold_s": cold,
        "kernel_load_cached_s": cached,
        "kernel": str(status),
        "grad_scan": str(scan),
        "cpu": _cpu_model(),
        "cases": [run_case(c, args.rounds, rows or (QUICK_ROWS if args.quick and c == "bert-base" else None),
                           getattr(torch, args.dtype))
                  for c in (args.case or (QUICK_CASES if args.quick else ["bert-base", "small-many"]))],
        "import": import_times(args.import_rounds) if args.import_rounds else None,
    }
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(f"torch {report['torch']}, {report['cpu']}, {plural(report['threads'], 'thread')}; kernel: cold compile "
              f"{cold if cold is not None else float('nan'):.2f} s, load from cache {cached:.3f} s")
        print(status)
        print(scan)
        for c in report["cases"]:
            _print(c)
        if report["import"]:
            imp = report["import"]
            low, mid, high = imp["ratio_spread"]
            print(f"\nimport: `from torch_lamb import Lamb` {imp['torch_lamb_s']:.2f} s vs `import torch` "
                  f"{imp['torch_s']:.2f} s in fresh interpreters: {imp['ratio']:.3f}x "
                  f"(per round {low:.3f}-{high:.3f}, median {mid:.3f}; {plural(imp['rounds'], 'round')})")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
