"""Writing and reading one webdataset shard of token chunks.

A shard is written through webdataset's ``TarWriter`` with a fixed mtime, user and group, so the
same chunks always give the same bytes, under a temporary name that is renamed into place only
once complete (a reader never sees a partial shard). Samples: ``{"__key__": "{split}-{chunk:010d}",
"tokens.npy": array}`` (see ``data_prep.manifest``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_prep.manifest import ShardInfo, atomic_file

TAR_MTIME = 0.0  # fixed, for byte-identical shards
TOKENS_EXT = "tokens.npy"


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


class HashingFile:
    """A file wrapper that feeds every byte written or read through ``hash`` (one pass over a
    shard both writes or reads it and hashes it)."""

    def __init__(self, f: BinaryIO, hash=None) -> None:
        self.f, self.hash = f, hash or hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.hash.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """Hash whatever is left unread (a tar reader stops before the end padding)."""
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def write_shard(
    directory: str | os.PathLike, split: str, index: int, first_chunk: int,
    chunks: Iterable[np.ndarray],
) -> ShardInfo:
    """Write ``chunks`` (1-D token arrays) as shard ``{split}-{index:06d}.tar`` atomically,
    hashing the bytes as they are written."""
    target = Path(directory) / shard_name(split, index)
    samples = tokens = 0
    with atomic_file(target) as f:
        hf = HashingFile(f)
        with wds.TarWriter(hf, mtime=TAR_MTIME, user="walsh", group="walsh") as w:
            for i, chunk in enumerate(chunks):
                w.write({"__key__": sample_key(split, first_chunk + i), "tokens.npy": chunk})
                samples += 1
                tokens += int(chunk.shape[0])
    return ShardInfo(name=target.name, split=split, samples=samples, tokens=tokens,
                     sha256=hf.hash.hexdigest())


def read_samples(
    path: str | os.PathLike, first: int = 0, stop: int | None = None,
    fileobj: BinaryIO | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` of samples ``first <= i < stop`` (``stop`` None: to the end) of
    one shard, in file order: the one reader of the shard format (verify, inspect, the loader).

    Reads the tar sequentially with webdataset's tar iterator (no node or worker splitting, no
    shuffling, no RNG use); samples before ``first`` are read through but not decoded, and reading
    stops after sample ``stop - 1``. A sample without ``tokens.npy`` or a shard with fewer than
    ``stop`` samples raises ``RuntimeError`` naming the file. ``fileobj``: read from this open
    file instead of opening ``path`` (e.g. a ``HashingFile``); ``path`` still names it."""
    index, key, found = -1, None, True
    with open(path, "rb") if fileobj is None else contextlib.nullcontext(fileobj) as f:
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
