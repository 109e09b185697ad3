"""Packing: the parts' token streams, in input order, cut into chunks and written as shards.

Every split is one stream: the parts' ``{split}.bin`` files concatenated in task order (task
order is input order, so the stream does not depend on which worker ran what, or when). The
stream is cut into chunks of exactly ``chunk_tokens`` tokens (only a split's last chunk may be
shorter) and every ``chunks_per_shard`` chunks become one shard, written by
:func:`data_prep.shards.write_shard` (temp name, then rename). With a document or token limit the
stream ends at the document boundary where the limit is reached, counted over both splits in
input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np

from data_prep.manifest import ShardInfo
from data_prep.parts import Part
from data_prep.shards import write_shard


def select_parts(parts: list[Part], max_docs: int | None, max_tokens: int | None,
                 ) -> list[tuple[Part, int | None]]:
    """The parts that make the dataset, in order, each with how many of its documents to take
    (None: all of them)."""
    out: list[tuple[Part, int | None]] = []
    docs = tokens = 0
    for part in parts:
        if (max_docs is not None and docs >= max_docs) or \
                (max_tokens is not None and tokens >= max_tokens):
            break
        if (max_docs is not None and docs + part.docs > max_docs) or \
                (max_tokens is not None and tokens + part.tokens > max_tokens):
            lengths, _ = part.doc_table()
            n = len(lengths)
            if max_docs is not None:
                n = min(n, max_docs - docs)
            if max_tokens is not None:
                ends = tokens + np.cumsum(lengths[:n], dtype=np.int64)
                n = min(n, int(np.searchsorted(ends, max_tokens)) + 1)
            out.append((part, n))
            docs += n
            tokens += int(lengths[:n].sum())
        else:
            out.append((part, None))
            docs += part.docs
            tokens += part.tokens
    return out


def taken(part: Part, take: int | None) -> dict[str, tuple[int, int]]:
    """Per split, (documents, tokens) that ``take`` keeps of ``part``."""
    if take is None:
        return {s: (part.meta["docs"][s], part.meta["tokens"][s]) for s in part.meta["docs"]}
    lengths, is_val = part.doc_table()
    lengths, is_val = lengths[:take], is_val[:take]
    return {s: (int((is_val == want).sum()), int(lengths[is_val == want].sum()))
            for s, want in (("train", False), ("val", True))}


def streams(selected: list[tuple[Part, int | None]], split: str) -> Iterator[np.ndarray]:
    for part, take in selected:
        arr = part.stream(split)
        if take is not None:
            arr = arr[:taken(part, take)[split][1]]
        if len(arr):
            yield arr


def iter_chunks(arrays: Iterable[np.ndarray], chunk_tokens: int, dtype: np.dtype,
                ) -> Iterator[np.ndarray]:
    """Cut the concatenation of ``arrays`` into chunks of ``chunk_tokens`` (the last shorter)."""
    buf = np.empty(chunk_tokens, dtype)
    fill = 0
    for arr in arrays:
        pos = 0
        while pos < len(arr):
            n = min(chunk_tokens - fill, len(arr) - pos)
            buf[fill:fill + n] = arr[pos:pos + n]
            fill += n
            pos += n
            if fill == chunk_tokens:
                yield buf.copy()
                fill = 0
    if fill:
        yield buf[:fill].copy()


def write_split(
    out: Path, split: str, arrays: Iterable[np.ndarray], chunk_tokens: int,
    chunks_per_shard: int, dtype: np.dtype, on_chunk: Callable[[int], None] | None = None,
) -> list[ShardInfo]:
    """Write ``split``'s shards; ``on_chunk(tokens)`` after each chunk (progress)."""
    chunks = iter_chunks(arrays, chunk_tokens, dtype)
    if on_chunk is not None:
        chunks = (on_chunk(len(c)) or c for c in chunks)
    shards: list[ShardInfo] = []
    first_chunk = 0
    while (head := next(chunks, None)) is not None:
        group = chain([head], islice(chunks, chunks_per_shard - 1))
        info = write_shard(out, split, len(shards), first_chunk, group)
        shards.append(info)
        first_chunk += info.samples
    return shards
