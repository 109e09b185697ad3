"""Writing and reading one webdataset shard of token chunks.

A shard is written through webdataset's ``TarWriter`` with a fixed mtime, user and group, so the
same chunks always give the same bytes, under a temporary name that is renamed into place only
once complete (a reader never sees a partial shard). Samples: ``{"__key__": "{split}-{chunk:010d}",
"tokens.npy": array}`` (see ``data_prep.manifest``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from data_prep.manifest import ShardInfo

TAR_MTIME = 0.0  # fixed, for byte-identical shards
SHARD_MODE = 0o644  # mkstemp makes 0600; shards are read by other users and nodes


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, chunk_index: int) -> str:
    return f"{split}-{chunk_index:010d}"


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def write_shard(
    directory: str | os.PathLike, split: str, index: int, first_chunk: int,
    chunks: Iterable[np.ndarray],
) -> ShardInfo:
    """Write ``chunks`` (1-D token arrays) as shard ``{split}-{index:06d}.tar`` atomically."""
    directory = Path(directory)
    target = directory / shard_name(split, index)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    samples = tokens = 0
    try:
        with os.fdopen(fd, "wb") as f:
            with wds.TarWriter(f, mtime=TAR_MTIME, user="walsh", group="walsh") as w:
                for i, chunk in enumerate(chunks):
                    w.write({"__key__": sample_key(split, first_chunk + i), "tokens.npy": chunk})
                    samples += 1
                    tokens += int(chunk.shape[0])
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.chmod(tmp, SHARD_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ShardInfo(name=target.name, split=split, samples=samples, tokens=tokens, sha256=digest)


def read_shard(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` of every sample of one shard, in order. No node or worker
    splitting (the caller decides who reads what) and a fixed seed (the global ``random`` is
    left alone, so a trainer's RNG state stays exact)."""
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None,
                        workersplitter=None, seed=0).decode()
    for sample in ds:
        yield sample["__key__"], sample["tokens.npy"]
