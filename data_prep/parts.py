"""Part files: one task's tokens, the unit of parallel work and of resume.

A task reads its documents in order, filters them, decides each one's split and tokenizes it
(``Encoding.encode_to_numpy``: tiktoken's ordinary encoding straight into an array, so special
token text in a document stays text), appending the tokens plus one EOT per document to a
per-split stream. It writes into ``DIR/.parts/.{key}.{random}.tmp/`` and renames the folder to
``DIR/.parts/{key}/`` when complete, so a part either exists whole or not at all; a killed task
leaves only a temporary folder, removed by the next run. ``key`` hashes the dataset fingerprint
and the task identity: a rerun finds finished parts by name and skips those tasks.

A part folder holds ``train.bin`` and ``val.bin`` (raw tokens of the dataset dtype),
``docs.npz`` (each kept document's token count with its EOT, and whether it went to val, in input
order: what a document or token limit needs to cut at a document boundary) and ``meta.json``
(counts; written last).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import filters, sources
from data_prep.config import StageConfig
from data_prep.tokenizer import EncodingSpec, encoding_for

PARTS = ".parts"
SPLITS = ("train", "val")


def part_key(fingerprint: str, task: sources.Task) -> str:
    return hashlib.sha256(f"{fingerprint}\x00{task.ident}".encode()).hexdigest()[:32]


@dataclass
class Part:
    """A finished part, as the packer reads it."""

    path: Path
    meta: dict

    @property
    def docs(self) -> int:
        return sum(self.meta["docs"].values())

    @property
    def tokens(self) -> int:
        return sum(self.meta["tokens"].values())

    def stream(self, split: str) -> np.ndarray:
        """The split's tokens (memory-mapped; empty when there are none)."""
        dtype = np.dtype(self.meta["dtype"])
        if self.meta["tokens"][split] == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r")

    def doc_table(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / "docs.npz") as z:
            return z["lengths"], z["is_val"]


def load_part(parts_dir: Path, key: str) -> Part | None:
    """The finished part ``key``, or None when it is absent or incomplete."""
    path = parts_dir / key
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        f = path / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta["tokens"][split] * itemsize:
            return None
    return Part(path, meta)


def clean_temporaries(parts_dir: Path) -> None:
    """Remove what killed tasks left behind (only ``.*.tmp`` folders; finished parts stay)."""
    if parts_dir.is_dir():
        for p in parts_dir.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def build_part(
    task: sources.Task, spec: EncodingSpec, cfg: StageConfig, parts_dir: Path, key: str,
    report: Callable[[int, int], None] | None = None,
) -> dict:
    """Run ``task`` into part ``key``; returns its meta. ``report(rows, tokens)`` is called
    after each batch with the running totals."""
    done = load_part(parts_dir, key)
    if done is not None:
        return done.meta
    enc = encoding_for(spec)
    dtype = np.dtype(spec.dtype)
    eot = np.array([spec.eot_id], dtype)
    need = filters.needs(cfg.filters)
    dropped, skipped = Counter(), Counter()
    lengths: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    docs = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    rows = 0
    cpu0 = time.process_time()
    tmp = parts_dir / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        outs = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        try:
            for batch in sources.read(task, cfg.source, need, skipped):
                rows += batch.rows
                texts, val = filters.select(batch, cfg.filters, cfg.split, dropped, skipped)
                arrays, val = _encode(enc, texts, val, skipped)
                arrays, val, stop = _apply_limits(arrays, val, cfg, docs, tokens)
                lens = np.array([len(a) + 1 for a in arrays], np.uint32)
                isv = np.array(val, bool)
                lengths.append(lens)
                flags.append(isv)
                for s, want in zip(SPLITS, (False, True)):
                    sel = [x for a, v in zip(arrays, val) if v == want for x in (a, eot)]
                    if sel:
                        np.concatenate(sel, dtype=dtype, casting="unsafe").tofile(outs[s])
                        docs[s] += len(sel) // 2
                        tokens[s] += int(lens[isv == want].sum())
                if report is not None:
                    report(rows, sum(tokens.values()))
                if stop:
                    break
        finally:
            for f in outs.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.uint32)
        isv = np.concatenate(flags) if flags else np.zeros(0, bool)
        np.savez(tmp / "docs.npz", lengths=lens, is_val=isv)
        meta = {"task": task.index, "label": task.label, "ident": task.ident,
                "dtype": dtype.name, "rows": rows, "docs": docs, "tokens": tokens,
                "cpu_s": round(time.process_time() - cpu0, 3),  # for the benchmark
                "dropped": dict(sorted(dropped.items())),
                "skipped": dict(sorted(skipped.items()))}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, parts_dir / key)
        except OSError:  # finished meanwhile by another attempt of the same task
            if load_part(parts_dir, key) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _encode(enc, texts: list[str], val: list[bool], skipped: Counter):
    arrays, keep = [], []
    for text, v in zip(texts, val):
        try:
            arrays.append(enc.encode_to_numpy(text, disallowed_special=()))
        except UnicodeEncodeError:  # lone surrogates that slipped through a reader
            skipped["invalid_utf8"] += 1
            continue
        keep.append(v)
    return arrays, keep


def _apply_limits(arrays: list, val: list, cfg: StageConfig, docs: dict, tokens: dict):
    """Cut the batch where the task reaches ``max_docs`` / ``max_tokens``; True when reached.
    (No task needs more than the whole dataset may hold; the packer makes the global cut.)"""
    have_docs, have_tokens = sum(docs.values()), sum(tokens.values())
    n = len(arrays)
    if cfg.max_docs is not None:
        n = min(n, cfg.max_docs - have_docs)
    ends = have_tokens + np.cumsum([len(a) + 1 for a in arrays[:n]], dtype=np.int64)
    if cfg.max_tokens is not None:
        n = min(n, int(np.searchsorted(ends, cfg.max_tokens)) + 1)
    reached = (cfg.max_docs is not None and have_docs + n >= cfg.max_docs) or (
        cfg.max_tokens is not None and n > 0 and ends[n - 1] >= cfg.max_tokens)
    return arrays[:n], val[:n], reached
