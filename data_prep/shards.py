"""Writing and reading one webdataset shard of token chunks.

A shard is written through webdataset's ``TarWriter`` with a fixed mtime, user and group, so the
same chunks always give the same bytes, under a temporary name that is renamed into place only
once complete (a reader never sees a partial shard). Samples: ``{"__key__": "{split}-{chunk:010d}",
"tokens.npy": array}`` (see ``data_prep.manifest``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_prep.manifest import ShardInfo

TAR_MTIME = 0.0  # fixed, for byte-identical shards
TOKENS_EXT = "tokens.npy"
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


def read_samples(
    path: str | os.PathLike, first: int = 0, stop: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` of samples ``first <= i < stop`` (``stop`` None: to the end) of
    one shard, in file order: the one reader of the shard format (verify, inspect, the loader).

    Reads the tar sequentially with webdataset's tar iterator (no node or worker splitting, no
    shuffling, no RNG use); samples before ``first`` are read through but not decoded, and reading
    stops after sample ``stop - 1``. A sample without ``tokens.npy`` or a shard with fewer than
    ``stop`` samples raises ``RuntimeError`` naming the file."""
    index, key, found = -1, None, True
    with open(path, "rb") as f:
        for item in tar_file_iterator(f):
            prefix, suffix = base_plus_ext(item["fname"])
            if prefix is None:
                continue
            if prefix != key:
                if not found:
                    raise RuntimeError(f"{path}: sample {key!r} has no {TOKENS_EXT}")
                index, key, found = index + 1, prefix, index + 1 < first
                if stop is not None and index >= stop:
                    return
            if index >= first and suffix.lower() == TOKENS_EXT:
                found = True
                yield key, np.load(io.BytesIO(item["data"]), allow_pickle=False)
                if stop is not None and index == stop - 1:
                    return
    if not found:
        raise RuntimeError(f"{path}: sample {key!r} has no {TOKENS_EXT}")
    if stop is not None:
        raise RuntimeError(f"{path}: the shard ends after {index + 1} samples, the manifest "
                           f"promised at least {stop}")


def read_shard(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` of every sample of one shard, in order."""
    return read_samples(path)
