"""`torch-lamb demo`: real (tiny) runs that write a table and readable plots, the fallback, the CLI errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import idx_fixtures as fx
import pytest
import torch

pytest.importorskip("matplotlib")

from torch_lamb import cli, data, demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "2", "--no-progress", "--threads", "1"]


@pytest.fixture
def fixture_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Only the tests' own IDX files can be found (in --data DIR), with the fixture's digests."""
    monkeypatch.delenv("TORCH_LAMB_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "no-cache")
    monkeypatch.setattr(data, "FASHION_MNIST", fx.spec())
    monkeypatch.chdir(tmp_path)
    return fx.write(tmp_path / "fashion")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["demo", *argv])
    return rc, out.getvalue(), err.getvalue()


def _check_pngs(out: Path, names: list[str]) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        img = mpimg.imread(path)
        assert img.shape[0] >= 300 and img.shape[1] >= 500, (name, img.shape)
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50, name  # not blank


def test_run_on_fashion_idx_files(fixture_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, printed, err = _run(["--data", str(fixture_data), "--out", str(out), "--batch-sizes", "10,40",
                             "--lr-grid", "0.5,2", "--base-lr", "lamb=0.01,adamw=0.003", *TINY])
    assert rc == 0, err
    assert "fashion-mnist" in printed and "sqrt(batch / 128)" in printed and ", 1 thread, seeds" in printed
    meta = json.loads((out / "results.json").read_text())
    n_train = fx.N_TRAIN - fx.N_TRAIN // 6
    assert (meta["dataset"], meta["n_train"], meta["n_val"], meta["n_test"]) == (
        "fashion-mnist", n_train, fx.N_TRAIN // 6, fx.N_TEST)
    assert meta["base_lr"] == {"lamb": 0.01, "adamw": 0.003} and not meta["base_lr_selected"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = {(r["phase"], r["optimizer"], int(r["batch_size"]), float(r["lr_multiplier"])) for r in rows}
    want = {("rule", o, b, 1.0) for o in ("lamb", "adamw") for b in (10, 40)}
    want |= {("grid", o, 40, m) for o in ("lamb", "adamw") for m in (0.5, 2.0)}
    assert got == want
    for r in rows:
        b = int(r["batch_size"])
        assert int(r["steps"]) == (n_train // b) * 2
        base = meta["base_lr"][r["optimizer"]]
        assert float(r["peak_lr"]) == pytest.approx(base * float(r["lr_multiplier"]) * math.sqrt(b / 128))
        assert 0 <= float(r["val_accuracy"]) <= 1 and 0 <= float(r["test_accuracy"]) <= 1
        assert f"{r['optimizer']:<9} {b:>6}" in printed or r["phase"] == "grid"
    assert "lr grid at batch 40" in printed and "*" in printed
    for j in meta["results"]:
        assert "trust_ratios" not in j  # only with --save-trust-ratios
        assert len(j["epoch_train_loss"]) == len(j["epoch_val_loss"]) == 2
    _check_pngs(out, ["accuracy_vs_batch.png", "lr_sensitivity.png", "loss_curves.png", "trust_ratios.png",
                      "summary.png"])


def test_base_lr_selection_and_trust_ratios(fixture_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, printed, err = _run(["--data", str(fixture_data), "--out", str(out), "--batch-sizes", "40",
                             "--lr-grid", "1", "--save-trust-ratios", "--epochs", "1", "--no-progress",
                             "--threads", "1"])
    assert rc == 0, err
    meta = json.loads((out / "results.json").read_text())
    assert meta["base_lr_selected"]
    base_runs = [r for r in meta["results"] if r["phase"] == "base"]
    for o in ("lamb", "adamw"):
        mine = [r for r in base_runs if r["optimizer"] == o]
        assert sorted(r["peak_lr"] for r in mine) == sorted(demo.BASE_GRID[o])
        assert meta["base_lr"][o] == max(mine, key=lambda r: r["val_accuracy"])["peak_lr"]  # chosen on validation
    assert "Base-lr selection" in printed
    (lamb,) = [r for r in meta["results"] if r["phase"] == "rule" and r["optimizer"] == "lamb"]
    assert list(lamb["trust_ratios"]) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight",
                                          "fc3.bias"]
    for ratios in lamb["trust_ratios"].values():
        assert len(ratios) == lamb["steps"] and all(math.isfinite(x) and x > 0 for x in ratios)


def test_download_flag_fetches_from_a_mirror(fixture_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import functools
    import http.server
    import threading

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(fixture_data)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "fetched"
        dest.mkdir()
        rc, printed, err = _run(["--download", "--mirror", f"http://127.0.0.1:{httpd.server_address[1]}",
                                 "--data", str(dest), "--out", str(tmp_path / "o"), "--batch-sizes", "40",
                                 "--lr-grid", "1", "--base-lr", "lamb=0.01,adamw=0.003", *TINY])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rc == 0, err
    assert f"from {dest}" in printed
    assert len(list(dest.glob("*.gz"))) == 4


def test_no_data_falls_back_to_digits(fixture_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    rc, printed, err = _run(["--out", str(out), "--batch-sizes", "64,8192", "--lr-grid", "1",
                             "--base-lr", "lamb=0.01,adamw=0.003", *TINY])  # fixture_data is not in --data
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert any("apt-get install dataset-fashion-mnist" in n and "--download" in n for n in notes)
    assert any("digits" in n and "no large-batch effect" in n for n in notes)
    assert any("full batch" in n for n in notes)  # 8192 > the 1,149 digits training examples
    meta = json.loads((out / "results.json").read_text())
    assert (meta["dataset"], meta["n_train"], meta["n_test"]) == ("digits", 1149, 360)
    assert meta["batch_sizes"] == [64, 1149]
    assert "digits" in printed


def test_fallback_without_scikit_learn_says_what_to_do(fixture_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exc:
        _run(["--out", str(tmp_path / "o"), *TINY])
    message = str(exc.value.code)
    assert message.startswith("torch-lamb demo: the digits fallback needs scikit-learn: install it with "), message
    assert f"`{sys.executable} -m pip install scikit-learn`" in message and "torch-lamb[" not in message
    assert "\n" not in message


def test_corrupt_data_is_reported_then_falls_back(fixture_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    f = fixture_data / "t10k-labels-idx1-ubyte.gz"
    import gzip

    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] ^= 1
    f.write_bytes(gzip.compress(bytes(raw)))
    rc, _, err = _run(["--data", str(fixture_data), "--out", str(tmp_path / "o"), "--batch-sizes", "64",
                       "--lr-grid", "1", "--base-lr", "lamb=0.01", "--optimizers", "lamb", *TINY])
    assert rc == 0
    assert "SHA-256" in err and "digits" in err


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-sizes", "abc"], "--batch-sizes"),
    (["--batch-sizes", ","], "--batch-sizes"),
    (["--batch-sizes", "0"], "outside"),
    (["--batch-sizes", "100000"], "outside"),
    (["--optimizers", ""], "--optimizers"),
    (["--optimizers", "adam"], "unknown optimizer"),
    (["--device", "foo"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--seeds", "-1"], "--seeds"),
    (["--threads", "0"], "--threads"),
    (["--lr-grid", "0,1"], "--lr-grid"),
    (["--base-lr", "lamb"], "--base-lr"),
    (["--base-lr", "adam=0.1"], "--base-lr"),
    (["--warmup", "1.5"], "--warmup"),
    (["--data", "/nonexistent/fashion"], "--data"),
    (["--quick", "--full"], "not allowed"),
    (["--bogus"], "unrecognized"),
])
def test_bad_values_exit_2_with_one_line_before_any_work(
        argv: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "_get_data", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torch-lamb demo: error:"), err
    assert fragment in err


def test_cuda_on_a_cpu_only_torch_is_rejected(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only torch reports
    monkeypatch.setattr(demo, "_get_data", lambda *a: pytest.fail("work started"))
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--device", dev])
        assert exc.value.code == 2
        assert "no usable CUDA" in capsys.readouterr().err
    assert demo._device("auto") == "cpu"


def test_unwritable_out_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "_get_data", lambda *a: pytest.fail("work started"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad = [str(a_file), str(a_file / "sub")]
    if Path("/proc/self").is_dir():  # os.access says root may write into /proc; only a real write says no
        bad.append("/proc/nope")
    if os.geteuid() != 0:  # root may write anywhere; a read-only folder only stops other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        bad.append(str(ro / "out"))
    for out in bad:
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--out", out])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err, err


def test_help_states_options_and_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--batch-sizes", "--epochs", "--seeds", "--device", "--quick", "--full", "--data",
                "--download", "--save-trust-ratios", "torch_lamb_demo", "Fashion-MNIST"):
        assert opt in text, opt
    assert "sqrt" in text and "warmup" in text


def test_debian_data_when_installed(tmp_path: Path) -> None:
    """With dataset-fashion-mnist installed, the default search finds it and batch 8192 trains (1 epoch)."""
    if not all((data.DEBIAN_DIR / (f.name + ".gz")).is_file() for f in data.FASHION_MNIST.values()):
        pytest.skip("dataset-fashion-mnist is not installed")
    rc, _, err = _run(["--out", str(tmp_path), "--batch-sizes", "8192", "--epochs", "1", "--lr-grid", "1",
                             "--base-lr", "lamb=0.01,adamw=0.003", "--no-progress"])
    assert rc == 0, err
    meta = json.loads((tmp_path / "results.json").read_text())
    assert (meta["dataset"], meta["n_train"], meta["n_val"], meta["n_test"]) == ("fashion-mnist", 50000, 10000, 10000)
    assert {r["optimizer"] for r in meta["results"]} == {"lamb", "adamw"}
    assert all(r["steps"] == 6 and r["test_accuracy"] > 0.3 for r in meta["results"])


def test_bench_dispatches_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("torch_lamb.bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_lamb.bench", fake)
    import torch_lamb

    monkeypatch.setattr(torch_lamb, "bench", fake, raising=False)
    assert cli.main(["bench", "--x", "1"]) == 0
    assert seen == [["--x", "1"]]


def test_unknown_command_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2


def test_import_stays_light_and_module_entry_point_works() -> None:
    code = (
        "import sys, torch; before = set(sys.modules);"  # torch itself may import tqdm
        "import torch_lamb, torch_lamb.cli, torch_lamb.telemetry, torch_lamb.data;"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'tqdm', 'transformers') if m in set(sys.modules) - before];"
        "print(heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "torch_lamb", "demo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--quick" in res.stdout


def test_out_under_proc_exits_2_with_one_line_in_a_fresh_process(tmp_path: Path) -> None:
    """What docs/demo.md promises, as a user meets it: the command, not a traceback."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "torch_lamb", "demo", "--out", "/proc/nope", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("torch-lamb demo: error: argument --out: cannot write into '/proc/nope': ")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def _no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError


def test_without_matplotlib_the_demo_stops_before_any_work_saying_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_matplotlib(monkeypatch)
    monkeypatch.setattr(demo, "_get_data", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torch-lamb demo: error: the plots need matplotlib"), err
    assert f"`{sys.executable} -m pip install matplotlib`" in err and "--no-plots" in err
    assert "torch-lamb[" not in err


def test_no_plots_runs_without_matplotlib_and_writes_the_results(
        fixture_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_matplotlib(monkeypatch)
    out = tmp_path / "out"
    rc, printed, err = _run(["--data", str(fixture_data), "--out", str(out), "--batch-sizes", "40", "--lr-grid", "1",
                             "--base-lr", "lamb=0.01,adamw=0.003", "--no-plots", *TINY])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["optimizer"], r["batch_size"]) for r in rows} == {("lamb", "40"), ("adamw", "40")}
    assert all(0 < float(r["test_accuracy"]) <= 1 for r in rows)
    assert "wrote" in printed and ".png" not in printed


def test_without_tqdm_the_demo_runs_without_a_bar_and_says_how_to_get_one(
        fixture_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    argv = ["--data", str(fixture_data), "--out", str(tmp_path / "o"), "--batch-sizes", "40", "--lr-grid", "1",
            "--base-lr", "lamb=0.01", "--optimizers", "lamb", "--epochs", "1", "--threads", "1", "--no-plots"]
    rc, _, err = _run(argv)
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "tqdm" in line]
    assert notes == [f"note: no progress bar: tqdm is not installed (`{sys.executable} -m pip install tqdm`"
                     + notes[0].split("tqdm`", 1)[1]], notes
    assert (tmp_path / "o" / "results.json").is_file()


def test_install_hints_name_packages_not_an_index_that_lacks_torch_lamb() -> None:
    """torch-lamb is on no package index: no message tells a user to `pip install 'torch-lamb[...]'`."""
    from torch_lamb._hints import install_hint

    src = Path(__file__).resolve().parents[1] / "src" / "torch_lamb"
    offenders = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
                 if "torch-lamb[" in p.read_text()]
    assert offenders == []
    hint = install_hint(["matplotlib", "tqdm"], "demo")
    assert hint.startswith(f"`{sys.executable} -m pip install matplotlib tqdm`")
    assert f"-m pip install -e '{src.parents[1]}[demo]'`" in hint  # these tests run from a clone
