"""Small Fashion-MNIST-shaped IDX files that the tests write themselves (never the network)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import torch

from torch_lamb import data

N_TRAIN, N_TEST = 180, 60


def idx_bytes(t: torch.Tensor) -> bytes:
    """A uint8 tensor as an IDX buffer."""
    assert t.dtype == torch.uint8
    head = bytes([0, 0, 0x08, t.dim()]) + b"".join(struct.pack(">I", d) for d in t.shape)
    return head + t.contiguous().numpy().tobytes()


def arrays(seed: int = 0) -> dict[str, torch.Tensor]:
    """Learnable toy data: each class is a bright band at its own rows, plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = torch.arange(n) % 10
        img = torch.randint(0, 60, (n, 28, 28), generator=g)
        for c in range(10):
            img[labels == c, 2 * c + 4: 2 * c + 7, :] += 150
        out[f"{split}_images"] = img.clamp(0, 255).to(torch.uint8)
        out[f"{split}_labels"] = labels.to(torch.uint8)
    return out


def spec(seed: int = 0) -> dict[str, data.IdxFile]:
    """The fixture's IdxFile table (sizes and digests), in place of data.FASHION_MNIST."""
    a = arrays(seed)
    out = {}
    for key, f in data.FASHION_MNIST.items():
        raw = idx_bytes(a[key])
        out[key] = data.IdxFile(f.name, len(raw), hashlib.sha256(raw).hexdigest())
    return out


def write(folder: Path, gz: bool = True, seed: int = 0) -> Path:
    """The four fixture files in ``folder`` (gzipped or not); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, f in data.FASHION_MNIST.items():
        raw = idx_bytes(arrays(seed)[key])
        if gz:
            (folder / (f.name + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / f.name).write_bytes(raw)
    return folder
