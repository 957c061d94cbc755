"""`torch-lamb demo --quick`: a real run that writes a table and readable plots."""

import csv
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from torch_lamb import cli, demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_quick_run_table_holds_real_numbers(quick_run: tuple[Path, str]) -> None:
    out, printed = quick_run
    rows = list(csv.DictReader(open(out / "results.csv")))
    meta = json.loads((out / "results.json").read_text())
    n_train = meta["n_train"]
    assert n_train == 1437 and meta["n_test"] == 360
    assert {(r["optimizer"], int(r["batch_size"])) for r in rows} == {
        (o, b) for o in ("lamb", "adamw", "sgd") for b in (32, n_train)
    }
    for r in rows:
        acc, loss, steps = float(r["test_accuracy"]), float(r["final_train_loss"]), int(r["steps"])
        assert 0.0 <= acc <= 1.0
        assert math.isfinite(loss) and loss >= 0
        assert steps == math.ceil(n_train / int(r["batch_size"])) * demo.QUICK_EPOCHS
        assert float(r["peak_lr"]) == pytest.approx(
            demo.BASE_LR[r["optimizer"]] * math.sqrt(int(r["batch_size"]) / demo.BASE_BATCH)
        )
        assert float(r["wall_time_s"]) > 0
        assert f"{r['optimizer']:<9} {int(r['batch_size']):>6} {steps:>6}" in printed
        if int(r["batch_size"]) == 32:
            assert acc > 0.8, r  # chance is 0.1: small-batch training really learned
    # The JSON matches the CSV, and the loss curves end at the reported final loss.
    for r, j in zip(rows, meta["results"]):
        assert j["final_train_loss"] == pytest.approx(float(r["final_train_loss"]))
        assert len(j["epoch_losses"]) == demo.QUICK_EPOCHS
        assert j["epoch_losses"][-1] == j["final_train_loss"]
    # Trust ratios: one value per update step for every Lamb parameter, positive and finite.
    trust = meta["lamb_trust_ratios"]
    assert set(trust) == {"32", str(n_train)}
    for b, per_param in trust.items():
        assert list(per_param) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
        for ratios in per_param.values():
            assert len(ratios) == math.ceil(n_train / int(b)) * demo.QUICK_EPOCHS
            assert all(math.isfinite(x) and x > 0 for x in ratios)
    assert "sqrt(batch / 32)" in printed  # the learning-rate rule is stated


def test_quick_run_pngs_are_real_images(quick_run: tuple[Path, str]) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    out, _ = quick_run
    for name in ("loss_curves.png", "accuracy_vs_batch.png", "trust_ratios.png", "summary.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 10_000, name
        img = mpimg.imread(path)
        assert img.shape[0] >= 200 and img.shape[1] >= 300, (name, img.shape)
        # Not blank: many distinct colours (lines, text, legend).
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50, name


def test_help_states_options_and_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--batch-sizes", "--epochs", "--seed", "--device", "--quick", "torch_lamb_demo"):
        assert opt in text
    assert "sqrt" in text and "warmup" in text


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="batch-sizes"):
        demo.main(["--batch-sizes", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="optimizers"):
        demo.main(["--optimizers", "adam", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def test_bench_dispatches_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("torch_lamb.bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_lamb.bench", fake)
    import torch_lamb

    monkeypatch.setattr(torch_lamb, "bench", fake, raising=False)
    assert cli.main(["bench", "--x", "1"]) == 0
    assert seen == [["--x", "1"]]


def test_import_stays_light_and_module_entry_point_works() -> None:
    code = (
        "import sys, torch; before = set(sys.modules);"  # torch itself may import tqdm
        "import torch_lamb, torch_lamb.cli, torch_lamb.telemetry;"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'tqdm', 'transformers') if m in set(sys.modules) - before];"
        "print(heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "torch_lamb", "demo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--quick" in res.stdout
