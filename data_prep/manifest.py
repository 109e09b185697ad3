"""``manifest.json``: what a staged dataset directory holds, and the contract with the loader.

Layout of a dataset directory::

    manifest.json                   this file (written last, atomically)
    train-000000.tar ...            webdataset shards, ``{split}-{index:06d}.tar``
    val-000000.tar ...

Each shard sample is one chunk of contiguous tokens: ``{"__key__": "{split}-{chunk:010d}",
"tokens.npy": uint16 | uint32 array [<= chunk_tokens]}`` (documents packed back to back with one
EOT after each; only the last chunk of a split may be shorter).

The manifest records the tokenizer (name, ranks sha256, vocab size, EOT id), dtype, chunk length,
source and revision, filters, the split rule, totals (documents, tokens, chunks per split; what
each filter dropped and what bad input was skipped), the dataset fingerprint, and per shard its
name, split, samples, tokens and sha256. ``Manifest.load(dir)`` validates it and names the file
and key on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

FORMAT = "walsh-shards/1"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent (the message names file and key)."""


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    ranks_sha256: str
    vocab_size: int
    eot_id: int


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    samples: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str  # "uint16" | "uint32"
    chunk_tokens: int
    source: dict
    filters: dict
    split_rule: dict
    totals: dict
    shards: list[ShardInfo]
    revision: str | None = None
    # sha256 of what decides the output bytes (config + inputs); a rerun into the directory
    # with a different one is refused
    fingerprint: str | None = None
    format: str = FORMAT
    root: Path | None = field(default=None, compare=False)

    # -- queries ----------------------------------------------------------------------------
    def split(self, name: str) -> list[ShardInfo]:
        """The shards of split ``name`` in order ("train", "val")."""
        return [s for s in self.shards if s.split == name]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def split_tokens(self, name: str) -> int:
        return sum(s.tokens for s in self.split(name))

    def path(self, shard: ShardInfo) -> Path:
        if self.root is None:
            raise ManifestError("manifest has no root directory (it was not loaded from disk)")
        return self.root / shard.name

    # -- I/O --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/manifest.json`` atomically (temp file, fsync, rename)."""
        directory = Path(directory)
        target = directory / MANIFEST
        atomic_write_bytes(target, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        self.root = directory
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ManifestError(
                f"{path}: no manifest (not a staged dataset, or staging unfinished)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{path}: unreadable manifest: {err}") from err
        return cls.from_dict(raw, path, directory)

    @classmethod
    def from_dict(cls, raw: dict, path: Path | str = MANIFEST, root: Path | None = None):
        def need(obj: dict, key: str, typ, where: str):
            if key not in obj:
                raise ManifestError(f"{path}: missing key {where}{key}")
            if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                raise ManifestError(f"{path}: key {where}{key} has the wrong type "
                                    f"({type(obj[key]).__name__})")
            return obj[key]

        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: the manifest must be a JSON object")
        fmt = need(raw, "format", str, "")
        if fmt != FORMAT:
            raise ManifestError(f"{path}: key format is {fmt!r}, this version reads {FORMAT!r}")
        tok = need(raw, "tokenizer", dict, "")
        tokenizer = TokenizerInfo(
            name=need(tok, "name", str, "tokenizer."),
            ranks_sha256=need(tok, "ranks_sha256", str, "tokenizer."),
            vocab_size=need(tok, "vocab_size", int, "tokenizer."),
            eot_id=need(tok, "eot_id", int, "tokenizer."),
        )
        dtype = need(raw, "dtype", str, "")
        if dtype not in ("uint16", "uint32"):
            raise ManifestError(f"{path}: key dtype must be uint16 or uint32, got {dtype!r}")
        shards = []
        for i, s in enumerate(need(raw, "shards", list, "")):
            where = f"shards[{i}]."
            if not isinstance(s, dict):
                raise ManifestError(f"{path}: key shards[{i}] must be an object")
            shards.append(ShardInfo(
                name=need(s, "name", str, where), split=need(s, "split", str, where),
                samples=need(s, "samples", int, where), tokens=need(s, "tokens", int, where),
                sha256=need(s, "sha256", str, where),
            ))
        return cls(
            tokenizer=tokenizer, dtype=dtype, chunk_tokens=need(raw, "chunk_tokens", int, ""),
            source=need(raw, "source", dict, ""), filters=need(raw, "filters", dict, ""),
            split_rule=need(raw, "split_rule", dict, ""), totals=need(raw, "totals", dict, ""),
            shards=shards, revision=raw.get("revision"), fingerprint=raw.get("fingerprint"),
            format=fmt, root=root,
        )


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``target`` through: a temp file in the same directory, fsynced and
    renamed into place when the block ends, removed if it raises. A reader sees the old file or
    the new one, never a partial one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the dataset is read by other users and nodes
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (``atomic_file``)."""
    with atomic_file(target) as f:
        f.write(data)
