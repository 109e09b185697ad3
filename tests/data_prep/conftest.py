"""Fixtures for the data_prep tests: a tokenizer built here, corpora in the FineWeb-Edu schema,
and one local Ray for the whole session.

Nothing here reads /work/shared or the network: the tokenizer's ranks are learned by a small
BPE on generated text and written in tiktoken's file format, which exercises the "user path"
branch of the tokenizer resolution.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.local_ray import use_local_ray_env

HERE = Path(__file__).parent

# Ray reads these at import and init: loopback only, no token auth (ARCHITECTURE.md section 7).
use_local_ray_env()

# The GPT-2 split pattern, written out (not imported) so the independent encoder is independent.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which "
         "learning students energy cell water teacher history science data model theory "
         "function equation research school plant climate naïve café über 東京 данные "
         "mathematics knowledge process system light sound reading writing 42 1999 3.14").split()


def make_text(rng: random.Random, n_words: int) -> str:
    words = rng.choices(WORDS, k=n_words)
    sentences, i = [], 0
    while i < len(words):
        k = rng.randint(4, 14)
        s = " ".join(words[i:i + k])
        sentences.append(s[:1].upper() + s[1:] + rng.choice([".", ".", "?", "!", ";"]))
        i += k
    return " ".join(sentences)


def make_docs(seed: int, n: int, prefix: str, mean_words: int = 60) -> list[dict]:
    """FineWeb-Edu rows: text, id, url, score, int_score, language, token_count, ..."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = make_text(rng, max(1, int(rng.expovariate(1 / mean_words))))
        rows.append({
            "text": text, "id": f"<urn:uuid:{prefix}-{i:05d}>",
            "dump": "CC-MAIN-2024-10", "url": f"https://example.org/{prefix}/{i}",
            "file_path": f"s3://bucket/{prefix}.warc.gz", "language": "en",
            "language_score": 0.95, "token_count": len(text.split()),
            "score": round(rng.uniform(2.0, 5.0), 3), "int_score": rng.randint(2, 5),
        })
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def train_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE: the 256 bytes, then the most frequent adjacent pair, repeatedly."""
    import regex

    ranks = {bytes([i]): i for i in range(256)}
    words = Counter(tuple(bytes([b]) for b in w.encode())
                    for t in texts for w in regex.findall(PAT_STR, t))
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return ranks


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [base64.b64encode(t) + b" " + str(r).encode()
             for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="session")
def ranks(tmp_path_factory) -> dict[bytes, int]:
    rng = random.Random(7)
    return train_bpe([make_text(rng, 400) for _ in range(20)], n_merges=300)


@pytest.fixture(scope="session")
def ranks_file(tmp_path_factory, ranks) -> Path:
    return write_ranks(tmp_path_factory.mktemp("tok") / "test-bpe.tiktoken", ranks)


@pytest.fixture(scope="session")
def reference_encoding(ranks):
    """The same tokenizer built directly with tiktoken: the independent count."""
    import tiktoken

    return tiktoken.Encoding(name="test-bpe", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """3 parquet files (several row groups) + 2 jsonl files (one gzipped), FineWeb-Edu schema."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        write_parquet(root / f"{i:03d}_00000.parquet", make_docs(i, 150, f"pq{i}"))
    write_jsonl(root / "extra-a.jsonl", make_docs(10, 80, "ja"))
    write_jsonl(root / "extra-b.jsonl.gz", make_docs(11, 80, "jb"))
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the data_prep tests; stage() uses a running Ray when there
    is one. Shut down when the run leaves this folder (below), so it never lingers under the
    other packages' tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or Path(str(nextitem.path)).parent != HERE:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def tree_digest(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``directory`` (the byte-for-byte comparison)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def helpers():
    """Module-level helpers for test files (tests/ has no packages to import them from)."""
    import types

    return types.SimpleNamespace(make_docs=make_docs, write_parquet=write_parquet,
                                 write_jsonl=write_jsonl, tree_digest=tree_digest,
                                 write_ranks=write_ranks, make_text=make_text, EOT=EOT,
                                 PAT_STR=PAT_STR)
