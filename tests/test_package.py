"""Package hygiene: the licence, `torch-lamb --version`, and an sdist that carries its tests and the C kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import torch_lamb

ROOT = Path(__file__).resolve().parents[1]


def test_licence_matches_pyproject() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert meta["dependencies"][0].startswith("torch")


def test_version_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "torch_lamb", "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stdout.strip() == f"torch-lamb {torch_lamb.__version__}"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist from a copy of the source tree (so the build leaves nothing in the checkout)."""
    pytest.importorskip("setuptools.build_meta")
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src-copy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "torch_lamb_demo", "*.so"))
    out = tmp / "dist"
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out / res.stdout.strip().splitlines()[-1]


def test_sdist_carries_tests_and_kernel(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")))
        assert pkg_info is not None
        info = pkg_info.read().decode()
    for need in ("LICENSE", "README.md", "pyproject.toml", "src/torch_lamb/backends/lamb_kernel.c",
                 "src/torch_lamb/demo.py", "tests/conftest.py", "tests/idx_fixtures.py", "tests/test_data.py",
                 "tests/test_cpu_kernel.py", "tests/impls.py", "tests/keras_oracle.py", "examples/plain_loop.py"):
        assert need in names, need
    assert not any(n.endswith((".pyc", ".so")) for n in names)
    assert "License-Expression: Apache-2.0" in info


def test_sdist_tests_run(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(tmp_path, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12 / 3.11.4)
            tar.extractall(tmp_path)
    (root,) = tmp_path.iterdir()
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py",
                          "tests/test_package.py::test_licence_matches_pyproject"],
                         cwd=root, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout


def test_readme_runs_what_ci_runs_and_stays_short() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmd = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert ci_cmd in [b.strip() for b in blocks], "the README's test command must be .ci/run's"
    demo_cmd = next(b for b in blocks if "torch-lamb demo" in b)
    assert demo_cmd.strip().startswith("(command -v apt-get") and "dataset-fashion-mnist" in demo_cmd
    assert len(readme.splitlines()) <= 210
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", readme):
        assert (ROOT / target).exists(), target
