"""The Fashion-MNIST loader: IDX parsing, search order, checks, and --download against a local server."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import idx_fixtures as fx
import pytest
import torch

from torch_lamb import data


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real data anywhere the loader looks; the fixture's digests stand in for the real ones."""
    for var in ("TORCH_LAMB_DATA", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the local server is reached directly
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(data, "FASHION_MNIST", fx.spec())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_read_idx_round_trip_and_errors() -> None:
    t = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    assert torch.equal(data.read_idx(fx.idx_bytes(t)), t)
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="need"):
        data.read_idx(fx.idx_bytes(t)[:-1])
    big = bytes([0, 0, 0x0B, 1]) + (2).to_bytes(4, "big") + (258).to_bytes(2, "big") + (3).to_bytes(2, "big")
    assert data.read_idx(big).tolist() == [258, 3]  # multi-byte items are big-endian


@pytest.mark.parametrize("gz", [True, False])
def test_load_gzipped_or_not(isolated: Path, gz: bool) -> None:
    folder = fx.write(isolated / "d", gz=gz)
    arrays = data.load(folder)
    want = fx.arrays()
    for key in want:
        assert torch.equal(arrays[key], want[key]), key
    assert arrays["train_images"].shape == (fx.N_TRAIN, 28, 28)


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.find() == (None, [])
    cache = fx.write(isolated / "cache")
    assert data.find()[0] == cache
    tv = fx.write(isolated / "data" / "FashionMNIST" / "raw", gz=False)  # torchvision's layout under ./data
    assert data.find()[0] == Path("data/FashionMNIST/raw") and tv.is_dir()
    debian = fx.write(isolated / "debian")
    assert data.find()[0] == debian
    env = fx.write(isolated / "env" / "FashionMNIST" / "raw")
    monkeypatch.setenv("TORCH_LAMB_DATA", str(isolated / "env"))
    assert data.find()[0] == env
    explicit = fx.write(isolated / "explicit")
    assert data.find(explicit)[0] == explicit
    assert data.candidates(explicit)[:2] == [explicit, explicit / "FashionMNIST" / "raw"]


def test_incomplete_or_wrong_size_is_skipped_with_a_note(isolated: Path) -> None:
    bad = fx.write(isolated / "bad")
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    short = fx.write(isolated / "short")
    f = short / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-10]))
    good = fx.write(isolated / "cache")
    folder, notes = data.find(bad)
    assert folder == good
    assert any("incomplete" in n and "t10k-labels" in n for n in notes)
    folder, notes = data.find(short)
    assert folder == good and any("expected" in n for n in notes)


def test_digest_mismatch_is_caught_by_load(isolated: Path) -> None:
    folder = fx.write(isolated / "d")
    f = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # same size, one label changed
    f.write_bytes(gzip.compress(bytes(raw)))
    assert data.find(folder)[0] == folder  # find's check is the size only
    with pytest.raises(data.DataError, match="SHA-256"):
        data.load(folder)


def test_real_digests_when_debian_data_is_installed() -> None:
    if not all((data.DEBIAN_DIR / (f.name + ".gz")).is_file() for f in data.FASHION_MNIST.values()):
        pytest.skip("dataset-fashion-mnist is not installed")
    arrays = data.load(data.DEBIAN_DIR)
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_labels"].shape == (10000,)
    assert int(arrays["train_labels"].max()) == 9


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving the fixture's .gz files."""
    root = fx.write(tmp_path / "served")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_from_local_server(isolated: Path, server: tuple[str, Path]) -> None:
    url, _ = server
    dest = data.download(isolated / "dl", base_url=url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name + ".gz" for f in data.FASHION_MNIST.values())
    assert data.find(dest)[0] == dest
    assert torch.equal(data.load(dest)["test_images"], fx.arrays()["test_images"])
    data.download(dest, base_url=url, progress=False)  # present and valid: kept, nothing fetched again


def test_download_default_goes_to_the_cache(isolated: Path, server: tuple[str, Path]) -> None:
    url, _ = server
    assert data.download(base_url=url, progress=True) == isolated / "cache"
    assert data.find()[0] == isolated / "cache"


def test_download_rejects_a_damaged_file_and_leaves_nothing(isolated: Path, server: tuple[str, Path]) -> None:
    url, root = server
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 10))
    with pytest.raises(data.DataError, match="expected"):
        data.download(isolated / "dl", base_url=url, progress=False)
    assert not (isolated / "dl" / "train-labels-idx1-ubyte.gz").exists()
    assert not list((isolated / "dl").glob("*.part"))


def test_download_reports_http_errors(isolated: Path, server: tuple[str, Path]) -> None:
    url, _ = server
    with pytest.raises(data.DataError, match=r"downloading .*failed"):
        data.download(isolated / "dl", base_url=url + "missing/", progress=False)
