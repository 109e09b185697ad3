"""``walsh data verify`` and ``walsh data inspect``: trust, then look.

``verify`` re-reads everything the manifest promises: each shard's sha256, its samples (keys in
order, dtype, chunk lengths: all full except a split's very last), its token count, that every
id is in the vocabulary, and per split that the tokens and the EOT count (one per document) match
the totals. Each problem names the shard (a flipped byte: a sha256 mismatch; a truncated shard:
a sha256 mismatch plus unreadable data or missing samples). Shards are checked in a thread pool
(hashing and reading release the GIL).

``inspect`` prints the statistics from the manifest and decodes the start of a chunk.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.manifest import Manifest, ShardInfo
from data_prep.shards import HashingFile, read_samples, sample_key


class VerifyError(ValueError):
    """A dataset that failed verification (the message names the shards)."""


@dataclass
class ShardCheck:
    shard: ShardInfo
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    eots: int = 0


@dataclass
class Report:
    root: Path
    checks: list[ShardCheck]
    problems: list[str]  # all of them, shard ones included

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(m: Manifest, shard: ShardInfo, first_chunk: int, last: bool) -> ShardCheck:
    c = ShardCheck(shard)
    path = m.path(shard)
    if not path.is_file():
        c.problems.append(f"{shard.name}: missing")
        return c
    lengths = []
    with open(path, "rb") as raw:  # one pass: the samples are read and the bytes hashed
        hashed = HashingFile(raw)
        _read_into(c, m, shard, path, hashed, first_chunk, lengths)
        digest = hashed.hexdigest_to_end()
    if digest != shard.sha256:
        c.problems.insert(0, f"{shard.name}: sha256 mismatch (manifest {shard.sha256[:16]}..., "
                             f"file {digest[:16]}...)")
    c.samples, c.tokens = len(lengths), int(sum(lengths))
    full = lengths[:-1] if last else lengths
    if any(n != m.chunk_tokens for n in full) or (lengths and lengths[-1] > m.chunk_tokens):
        c.problems.append(f"{shard.name}: chunks not of {m.chunk_tokens} tokens")
    if c.samples != shard.samples:
        c.problems.append(f"{shard.name}: {c.samples} samples, the manifest says {shard.samples}")
    if c.tokens != shard.tokens:
        c.problems.append(f"{shard.name}: {c.tokens:,} tokens, the manifest says "
                          f"{shard.tokens:,}")
    return c


def _read_into(c: ShardCheck, m: Manifest, shard: ShardInfo, path: Path, f: HashingFile,
               first_chunk: int, lengths: list[int]) -> None:
    """Check every sample of the open shard ``f``; append lengths, EOTs and problems to ``c``."""
    try:
        for i, (key, arr) in enumerate(read_samples(path, fileobj=f)):
            want = sample_key(shard.split, first_chunk + i)
            if key != want:
                c.problems.append(f"{shard.name}: sample {i} has key {key!r}, expected {want!r}")
                break
            if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(m.dtype) or arr.ndim != 1:
                c.problems.append(f"{shard.name}: sample {key} is not a 1-D {m.dtype} array")
                break
            if arr.size and int(arr.max()) >= m.tokenizer.vocab_size:
                c.problems.append(f"{shard.name}: sample {key} has ids >= the vocab size "
                                  f"{m.tokenizer.vocab_size}")
            lengths.append(arr.size)
            c.eots += int(np.count_nonzero(arr == m.tokenizer.eot_id))
    except Exception as err:  # whatever the tar reader raises, the shard is unreadable
        c.problems.append(f"{shard.name}: unreadable after {len(lengths)} samples "
                          f"({type(err).__name__}: {err})")


def verify(directory: str | os.PathLike, threads: int | None = None) -> Report:
    m = Manifest.load(directory)
    jobs = []
    for split in m.splits:
        first = 0
        shards = m.split(split)
        for i, s in enumerate(shards):
            jobs.append((s, first, i == len(shards) - 1))
            first += s.samples
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        checks = list(pool.map(lambda j: check_shard(m, *j), jobs))
    problems = [p for c in checks for p in c.problems]
    for split in ("train", "val"):
        got = [c for c in checks if c.shard.split == split]
        tokens, eots = sum(c.tokens for c in got), sum(c.eots for c in got)
        want_tokens = m.totals.get("tokens", {}).get(split, 0)
        want_docs = m.totals.get("documents", {}).get(split, 0)
        if tokens != want_tokens:
            problems.append(f"split {split}: {tokens:,} tokens in the shards, the totals say "
                            f"{want_tokens:,}")
        if eots != want_docs:
            problems.append(f"split {split}: {eots:,} EOT tokens (one per document), the totals "
                            f"say {want_docs:,} documents")
    return Report(Path(directory), checks, problems)


def first_chunk(m: Manifest, split: str, index: int = 0) -> np.ndarray:
    """Chunk ``index`` of ``split`` (counted over the split's shards)."""
    rest = index
    for shard in m.split(split):
        if rest < shard.samples:
            return next(read_samples(m.path(shard), rest, rest + 1))[1]
        rest -= shard.samples
    raise ValueError(f"{m.root}: split {split!r} has no chunk {index}")


def decode_sample(m: Manifest, split: str, index: int, n_tokens: int) -> str:
    """The first ``n_tokens`` of a chunk as text, or why it cannot be decoded."""
    from data_prep import tokenizer

    try:
        spec = tokenizer.resolve(m.tokenizer.name, fetch=False)
    except ValueError as err:
        return f"(cannot decode: {err})"
    if spec.ranks_sha256 != m.tokenizer.ranks_sha256:
        return (f"(cannot decode: tokenizer {m.tokenizer.name!r} now has ranks "
                f"{spec.ranks_sha256[:12]}, the dataset was made with "
                f"{m.tokenizer.ranks_sha256[:12]})")
    tokens = first_chunk(m, split, index)[:n_tokens]
    return tokenizer.encoding_for(spec).decode(tokens.tolist())


def inspect(directory: str | os.PathLike, split: str = "train", index: int = 0,
            n_tokens: int = 200) -> str:
    m = Manifest.load(directory)
    t, tok = m.totals, m.tokenizer
    src = m.source
    what = src.get("repo") or src.get("name") or ", ".join(src.get("paths", []))
    lines = [
        f"dataset    {m.root}  ({m.format}, fingerprint {str(m.fingerprint)[:12]})",
        f"source     {src.get('type')}: {what}" + (f" @ {m.revision}" if m.revision else ""),
        f"tokenizer  {tok.name} (vocab {tok.vocab_size:,}, EOT {tok.eot_id}, ranks "
        f"{tok.ranks_sha256[:12]}); {m.dtype}; chunks of {m.chunk_tokens:,} tokens",
        f"filters    {', '.join(f'{k}={v}' for k, v in m.filters.items()) or 'none'}; split: "
        f"val_fraction {m.split_rule.get('val_fraction')} by {m.split_rule.get('key')}",
        f"{'split':6} {'shards':>7} {'chunks':>8} {'documents':>11} {'tokens':>15} "
        f"{'tok/doc':>9} {'MB':>9}",
    ]
    for s in ("train", "val"):
        shards = m.split(s)
        docs = t.get("documents", {}).get(s, 0)
        toks = m.split_tokens(s)
        mb = sum(m.path(x).stat().st_size for x in shards if m.path(x).is_file()) / 2**20
        lines.append(f"{s:6} {len(shards):>7,} {sum(x.samples for x in shards):>8,} "
                     f"{docs:>11,} {toks:>15,} {toks / max(docs, 1):>9.1f} {mb:>9.1f}")
    drops = ", ".join(f"{k} {v:,}" for k, v in t.get("dropped", {}).items()) or "none"
    skips = ", ".join(f"{k} {v:,}" for k, v in t.get("skipped", {}).items()) or "none"
    lines.append(f"read       {t.get('rows_read', 0):,} rows; dropped: {drops}; skipped: "
                 f"{skips}")
    if m.split(split):
        lines.append(f"--- {split} chunk {index}, first {n_tokens} tokens ---")
        lines.append(decode_sample(m, split, index, n_tokens))
    return "\n".join(lines)
