"""Fashion-MNIST for ``torch-lamb demo``: find, verify, load and (on request) download the IDX files.

Fashion-MNIST (Xiao et al. 2017, MIT licence) is 60,000 training and 10,000 test images of 28x28
grey pixels in 10 classes, distributed as four IDX files, gzipped or not. :func:`find` looks for
them, in order, in ``--data DIR``, ``$TORCH_LAMB_DATA``, Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), torchvision's ``FashionMNIST/raw`` layout (under each of
those folders and under ``./data``) and this project's cache folder
(``${TORCH_LAMB_CACHE_DIR:-~/.cache/torch_lamb}/fashion-mnist``, where :func:`download` writes).
Every file is checked against the known size and SHA-256 of its decompressed content (so a
recompressed copy, such as Debian's, passes).

Only the standard library and torch are used: no numpy, no torchvision.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BASE_URL",
    "DEBIAN_DIR",
    "FASHION_MNIST",
    "DataError",
    "IdxFile",
    "cache_dir",
    "candidates",
    "download",
    "find",
    "load",
    "read_idx",
]

BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "Fashion-MNIST not found; get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "`torch-lamb demo --download`, or `--data DIR` / $TORCH_LAMB_DATA pointing at the four IDX files"
)


class DataError(RuntimeError):
    """A data file is missing, damaged, or not the file it claims to be."""


@dataclass(frozen=True)
class IdxFile:
    """One IDX file: its base name (without ``.gz``), decompressed size and SHA-256."""

    name: str
    size: int
    sha256: str


# The decompressed files' sizes and digests (the official files, also what Debian ships).
FASHION_MNIST: dict[str, IdxFile] = {
    "train_images": IdxFile("train-images-idx3-ubyte", 47040016,
                            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": IdxFile("train-labels-idx1-ubyte", 60008,
                            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": IdxFile("t10k-images-idx3-ubyte", 7840016,
                           "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte", 10008,
                           "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}

_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
           0x0E: torch.float64}


def cache_dir() -> Path:
    """Where :func:`download` writes: ``${TORCH_LAMB_CACHE_DIR:-~/.cache/torch_lamb}/fashion-mnist``."""
    root = os.environ.get("TORCH_LAMB_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "torch_lamb") / "fashion-mnist"


def candidates(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders :func:`find` searches, in order."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    env = os.environ.get("TORCH_LAMB_DATA")
    if env:
        roots.append(Path(env))
    out: list[Path] = []
    for r in roots:
        out += [r, r / "FashionMNIST" / "raw"]
    out += [DEBIAN_DIR, Path("data") / "FashionMNIST" / "raw", cache_dir()]
    return list(dict.fromkeys(p.expanduser() for p in out))


def _path_of(folder: Path, f: IdxFile) -> Path | None:
    for name in (f.name, f.name + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_bytes(path: Path, gz: bool | None = None) -> bytes:
    try:
        if path.suffix == ".gz" if gz is None else gz:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot be read ({err})") from err


def _check(path: Path, raw: bytes, f: IdxFile) -> None:
    if len(raw) != f.size:
        raise DataError(f"{path}: {len(raw)} bytes decompressed, expected {f.size} (truncated or not {f.name})")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != f.sha256:
        raise DataError(f"{path}: SHA-256 {digest[:16]}... does not match {f.name}'s {f.sha256[:16]}...")


def read_idx(raw: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Parse an IDX buffer (magic ``0 0 type ndim``, big-endian int32 dims, then the data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise DataError(f"{source}: not an IDX file (bad magic number)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{source}: IDX header truncated")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _DTYPES[raw[2]]
    n = 1
    for d in dims:
        n *= d
    item = torch.empty((), dtype=dtype).element_size()
    if len(raw) != head + n * item:
        raise DataError(f"{source}: IDX dims {dims} need {head + n * item} bytes, the file has {len(raw)}")
    t = torch.frombuffer(bytearray(raw[head:]), dtype=dtype) if n else torch.empty(0, dtype=dtype)
    if item > 1 and sys.byteorder == "little":
        t = t.view(torch.uint8).view(-1, item).flip(1).reshape(-1).view(dtype)  # IDX is big-endian
    return t.reshape(dims)


def _stored_size(path: Path) -> int:
    """Decompressed size without decompressing: a gzip member's trailer holds it (mod 2**32)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def find(data_dir: str | os.PathLike[str] | None = None, files: dict[str, IdxFile] | None = None,
         ) -> tuple[Path | None, list[str]]:
    """The first folder holding all four files with their known sizes, and notes on folders skipped.

    A cheap check (no decompression); :func:`load` verifies the digests.
    """
    files = files or FASHION_MNIST
    notes: list[str] = []
    for folder in candidates(data_dir):
        paths = [_path_of(folder, f) for f in files.values()]
        if not any(paths):
            continue
        if not all(paths):
            missing = [f.name for f, p in zip(files.values(), paths) if p is None]
            notes.append(f"{folder}: incomplete, missing {', '.join(missing)}")
            continue
        try:
            bad = [f"{p.name} holds {_stored_size(p)} bytes, expected {f.size}"
                   for f, p in zip(files.values(), paths) if p is not None and _stored_size(p) != f.size % 2**32]
        except OSError as err:
            bad = [str(err)]
        if bad:
            notes.append(f"{folder}: " + "; ".join(bad))
            continue
        return folder, notes
    return None, notes


def load(folder: str | os.PathLike[str], files: dict[str, IdxFile] | None = None,
         verify: bool = True) -> dict[str, torch.Tensor]:
    """The four arrays: ``train_images`` (N, 28, 28) uint8, ``train_labels`` (N,) uint8, and the test pair."""
    files = files or FASHION_MNIST
    out = {}
    for key, f in files.items():
        p = _path_of(Path(folder), f)
        if p is None:
            raise DataError(f"{folder}: {f.name}(.gz) is missing")
        raw = _read_bytes(p)
        if verify:
            _check(p, raw, f)
        out[key] = read_idx(raw, str(p))
    for split in ("train", "test"):
        n_img, n_lab = out[f"{split}_images"].shape[0], out[f"{split}_labels"].shape[0]
        if n_img != n_lab:
            raise DataError(f"{folder}: {n_img} {split} images but {n_lab} labels")
    return out


def _progress(total: int | None, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships in the demo extra
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


def download(dest: str | os.PathLike[str] | None = None, base_url: str = BASE_URL,
             files: dict[str, IdxFile] | None = None, progress: bool = True,
             names: Iterable[str] | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``<base_url><name>.gz`` for each file into ``dest`` (default :func:`cache_dir`), verified.

    Each file is written to a temporary name, checked (decompressed size and SHA-256), and only then
    renamed into place; files already present and valid are kept. Raises :class:`DataError`.
    """
    files = files or FASHION_MNIST
    folder = Path(dest) if dest is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(names) if names is not None else list(files)
    for key in keys:
        f = files[key]
        target = folder / (f.name + ".gz")
        if target.is_file():
            try:
                _check(target, _read_bytes(target), f)
                continue
            except DataError:
                pass  # damaged: fetch again
        url = base_url.rstrip("/") + "/" + f.name + ".gz"
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{f.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                bar = _progress(int(length) if length else None, f.name + ".gz", progress)
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
            _check(target, _read_bytes(tmp, gz=True), f)
            shutil.move(str(tmp), str(target))
        except OSError as err:
            raise DataError(f"downloading {url} failed: {err}") from err
        finally:
            if tmp.exists():
                tmp.unlink()
        if progress:
            print(f"downloaded {url} -> {target} (verified)", file=sys.stderr)
    return folder
