"""``walsh bench staging``: staging throughput next to bare tiktoken on the same text and cores.

Generates a corpus of at least ``--mb`` MB of text in the FineWeb-Edu parquet schema (documents
assembled from paragraphs of the builtin python-docs corpus with a seeded RNG, so it is
English-like technical text and the same on every run), then in one process measures:

- bare ``Encoding.encode_ordinary_batch`` over all the texts, with 1 and N threads;
- staging (``data_prep.stage.stage``) with 1 and N Ray workers, Ray started beforehand and its
  start-up time reported apart (it is a fixed cost, not throughput);

and prints tokens/s, tokens/s per core, staging as a share of bare per core (the goal is at
least 80%), the same per CPU-second actually used (the CPU time of the tasks plus the driver's,
which other load on the machine does not inflate; it leaves out Ray's own processes and worker
start-up), the scaling from 1 to N workers, and whether the outputs are byte-identical. On a
shared machine use ``--repeats``: the runs are interleaved and the best of each is kept; the
load average before and after is printed so a reader can judge the contention.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from data_prep.local_ray import use_local_ray_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mb", type=float, default=64.0, help="corpus size in MB of text (>= 50)")
    p.add_argument("--files", type=int, default=16, help="parquet files in the corpus")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to stage with (default: 1 and all CPUs)")
    p.add_argument("--tokenizer", default="r50k_base", help="tiktoken name or ranks file path")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each configuration this many times, keep the best")
    p.add_argument("--json", help="also write the figures to this JSON file")


def make_corpus(out: Path, mb: float, files: int, seed: int = 0) -> tuple[int, int]:
    """Write ``files`` parquet files holding >= ``mb`` MB of text; returns (docs, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep import builtin
    from data_prep.config import BuiltinSource

    paragraphs: list[str] = []
    for task in builtin.plan(BuiltinSource()).tasks:
        for piece in task.pieces:
            for batch in builtin.read(piece):
                for text in batch.texts:
                    paragraphs += [p for p in text.split("\n\n") if len(p) > 40]
    rng = random.Random(seed)
    target = int(mb * 1e6)
    per_file = -(-target // files)
    out.mkdir(parents=True, exist_ok=True)
    docs = total = 0
    for f in range(files):
        texts, size = [], 0
        while size < per_file:
            text = "\n\n".join(rng.choices(paragraphs, k=rng.randint(2, 24)))
            texts.append(text)
            size += len(text.encode())
        n = len(texts)
        table = pa.table({
            "text": texts, "id": [f"<urn:uuid:bench-{f:03d}-{i:07d}>" for i in range(n)],
            "url": [f"https://docs.python.org/bench/{f}/{i}" for i in range(n)],
            "score": [rng.uniform(2.5, 5.0) for _ in range(n)],
            "int_score": [rng.randint(3, 5) for _ in range(n)],
            "language": ["en"] * n, "token_count": [0] * n,
        })
        pq.write_table(table, out / f"{f:03d}_00000.parquet", row_group_size=1024)
        docs += n
        total += size
    return docs, total


def bare(enc, texts: list[str], threads: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=threads)))
    return {"tokens": tokens + len(texts),  # + one EOT per document, as staged
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def main(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from data_prep import tokenizer

    cores = os.cpu_count() or 1
    workers = args.workers or sorted({1, cores})
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="walsh-bench-staging-")
    work = Path(args.dir or tmp.name)
    try:
        corpus = work / "corpus"
        t0 = time.perf_counter()
        docs, nbytes = make_corpus(corpus, args.mb, args.files)
        print(f"corpus: {nbytes / 1e6:.1f} MB of text, {docs:,} documents, {args.files} parquet "
              f"files ({time.perf_counter() - t0:.1f} s to generate); {cores} CPU cores; "
              f"load average {os.getloadavg()[0]:.2f}; best of {args.repeats}")
        enc = tokenizer.load(args.tokenizer)
        texts = [t for f in sorted(corpus.glob("*.parquet"))
                 for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        samples: dict[tuple[str, int], list[dict]] = {}
        digests = set()
        for rep in range(args.repeats):  # interleaved, so every run sees the same conditions
            for n in workers:
                samples.setdefault(("bare", n), []).append(bare(enc, texts, n))
            for n in workers:
                out = work / f"out-{n}-{rep}"
                samples.setdefault(("staging", n), []).append(
                    _stage_run(corpus, out, n, args.tokenizer))
                digests.add(_digest(out))
                shutil.rmtree(out)
        rows = report(samples, len(digests) == 1, workers)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"rows": rows, "identical": len(digests) == 1, "mb": nbytes / 1e6,
                 "docs": docs, "samples": {f"{k[0]}-{k[1]}": v for k, v in samples.items()}},
                indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()


def report(samples: dict, identical: bool, workers: list[int]) -> list[dict]:
    """Print the table (best run of each configuration) and the ratios; return the rows."""
    rows = []
    for (kind, n), runs in samples.items():
        best = min(runs, key=lambda r: r["seconds"])
        name = (f"bare encode_ordinary_batch, {n} thread(s)" if kind == "bare"
                else f"staging, {n} Ray worker(s)")
        rows.append({"run": name, "kind": kind, "cores": n, **best,
                     "tokens_per_s": best["tokens"] / best["seconds"]})
    bare = {r["cores"]: r for r in rows if r["kind"] == "bare"}
    staged = {r["cores"]: r for r in rows if r["kind"] == "staging"}
    bare1 = bare[workers[0]]["tokens_per_s"] / workers[0]
    cpu1 = bare[workers[0]]["tokens"] / bare[workers[0]]["cpu_s"]
    print("\n| run | cores | tokens | seconds | tokens/s | tokens/s per core | per core vs "
          "bare 1 thread | tokens per CPU-s | vs bare 1 thread |\n|---|---|---|---|---|---|---|"
          "---|---|")
    for r in rows:
        r["per_core"] = r["tokens_per_s"] / r["cores"]
        r["per_cpu_s"] = r["tokens"] / r["cpu_s"]
        print(f"| {r['run']} | {r['cores']} | {r['tokens']:,} | {r['seconds']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['per_core']:,.0f} | "
              f"{100 * r['per_core'] / bare1:.0f}% | {r['per_cpu_s']:,.0f} | "
              f"{100 * r['per_cpu_s'] / cpu1:.0f}% |")
    for n, r in staged.items():
        with_start = r["tokens"] / (r["seconds"] + r["ray_start_s"])
        print(f"staging with {n} worker(s): {100 * r['tokens_per_s'] / bare[n]['tokens_per_s']:.0f}"
              f"% of bare with {n} thread(s); Ray start-up {r['ray_start_s']:.1f} s (excluded; "
              f"with it: {with_start:,.0f} tokens/s)")
    if len(workers) > 1:
        lo, hi = workers[0], workers[-1]
        print(f"scaling {lo} -> {hi} workers: "
              f"{staged[hi]['tokens_per_s'] / staged[lo]['tokens_per_s']:.2f}x; bare {lo} -> "
              f"{hi} threads: {bare[hi]['tokens_per_s'] / bare[lo]['tokens_per_s']:.2f}x")
    print(f"outputs byte-identical across worker counts {workers}: {'yes' if identical else 'NO'}")
    return rows


def _stage_run(corpus: Path, out: Path, n: int, tok: str) -> dict:
    """Stage with ``n`` workers in a fresh local Ray (its start-up timed apart)."""
    from data_prep.stage import stage

    use_local_ray_env()  # before `import ray`
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        m = stage({"source": {"type": "files", "paths": [str(corpus)]}, "out": str(out),
                   "tokenizer": tok, "workers": n, "keep_parts": True}, progress=False)
        secs, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        ray.shutdown()
    tasks_cpu = sum(json.loads(p.read_text())["cpu_s"] for p in out.glob(".parts/*/meta.json"))
    return {"tokens": m.total_tokens, "seconds": secs, "ray_start_s": ray_start,
            "cpu_s": tasks_cpu + driver_cpu, "tasks_cpu_s": tasks_cpu}


def _digest(directory: Path) -> str:
    from data_prep.shards import sha256_file

    return json.dumps({p.name: sha256_file(p) for p in sorted(directory.iterdir())
                       if p.is_file()})
