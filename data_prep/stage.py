"""Staging: a config -> a directory of webdataset token shards and its ``manifest.json``.

Design, and why:

1. **Driver, before any worker.** Validate the config, resolve the tokenizer, plan the tasks
   from metadata only (``sources.plan``) and hash what decides the output bytes into the dataset
   fingerprint. Bad config, unknown tokenizer, missing or mistyped columns, unreadable parquet
   footers and an output directory holding a different dataset all fail here, with nothing
   written.
2. **Ray tasks, one per input** (file, row-group range, hub file, builtin group). Each filters,
   splits and tokenizes its documents into a *part* under ``DIR/.parts/`` (``parts.py``), named
   by a hash of the fingerprint and the task identity and renamed into place when complete. A
   rerun after a kill finds the finished parts and runs only the rest. At most ``workers`` tasks
   are in flight; with a document or token limit they are launched in input order and launching
   stops once the finished prefix holds enough.
3. **Driver packs.** The parts' streams are concatenated in task order, cut into chunks and
   written as shards (``packing.py``; temp name + rename), then ``manifest.json`` is written last
   (atomic) and the parts are removed. A directory is a complete dataset iff it has a manifest.

The output depends only on the order of the documents (input order), never on the number of
workers, the task boundaries or their timing, so it is byte-identical for any worker count and
after any number of interruptions. The price is disk: parts and shards coexist until the end.

Ray: a local ``ray.init`` by default (kept on 127.0.0.1, token auth off since nothing else can
reach it); ``address`` (or ``RAY_ADDRESS``) joins a cluster, where ``out`` must be a path every
node sees (a shared filesystem) and ``walsh`` must be installed on every node.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import config as config_mod
from data_prep import filters, packing, parts, sources, tokenizer
from data_prep.config import StageConfig
from data_prep.local_ray import use_local_ray_env
from data_prep.manifest import FORMAT, MANIFEST, Manifest
from data_prep.progress import StageProgress
from data_prep.sources import StageError, Task

SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
MARKER = "dataset.json"
SPLIT_RULE_TEXT = ("val iff blake2b-64(salt + '\\0' + key) / 2^64 < val_fraction; key = the "
                   "document id, else its text")


def stage(config: StageConfig | dict, *, address: str | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None) -> Manifest:
    """Stage ``config`` (see module doc); returns the manifest (also when already staged)."""
    cfg = config if isinstance(config, StageConfig) else config_mod.from_dict(config)
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    tokenizer.check(cfg.tokenizer)  # cheap checks first: an offline hub fails in < 1 s
    plan = sources.plan(cfg.source, task_mb=cfg.task_mb, needs=filters.needs(cfg.filters))
    if not plan.tasks:
        raise StageError("the source has no inputs")
    spec = tokenizer.resolve(cfg.tokenizer)
    identity = {**cfg.output_identity(), "tokenizer": vars(spec.info()), "format": FORMAT,
                "inputs": plan.description, "revision": plan.revision}
    fp = config_mod.fingerprint(identity)
    out = Path(cfg.out)
    existing = check_out_dir(out, fp, identity)
    if existing is not None:
        log(f"{out}: already staged ({existing.total_tokens:,} tokens); nothing to do")
        return existing
    parts_dir = out / parts.PARTS
    with _locked(parts_dir):
        check_out_dir(out, fp, identity)  # again, under the lock
        (parts_dir / MARKER).write_text(json.dumps({"fingerprint": fp, **identity}, indent=1))
        _clean(out, parts_dir)
        keys = [parts.part_key(fp, t) for t in plan.tasks]
        done = {t.index: p for t in plan.tasks
                if (p := parts.load_part(parts_dir, keys[t.index])) is not None}
        reused = len(done)
        with ray_session(cfg.workers, address) as (ray, workers):
            run_tasks(ray, plan.tasks, keys, spec, cfg, parts_dir, workers, done, progress)
        ran = len(done) - reused
        ordered = []
        for t in plan.tasks:
            if t.index not in done:
                break
            ordered.append(done[t.index])
        if cfg.max_docs is None and cfg.max_tokens is None:
            assert len(ordered) == len(plan.tasks), "every task must have finished"
        selected = packing.select_parts(ordered, cfg.max_docs, cfg.max_tokens)
        manifest = pack(out, selected, spec, cfg, plan, fp, progress)
        manifest.save(out)
        for p in out.iterdir():  # shards of an older, interrupted attempt
            if SHARD_RE.match(p.name) and p.name not in {s.name for s in manifest.shards}:
                p.unlink()
        if not cfg.keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
    _summary(log, manifest, out, time.perf_counter() - t0, ran, reused)
    return manifest


# -- the output directory -------------------------------------------------------------------
def check_out_dir(out: Path, fp: str, identity: dict) -> Manifest | None:
    """The finished manifest when ``out`` already holds this dataset; None when ``out`` is
    absent, empty or holds an unfinished staging of it; StageError otherwise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise StageError(f"{out}: exists and is not a directory")
    if (out / MANIFEST).exists():
        m = Manifest.load(out)
        if m.fingerprint == fp:
            return m
        raise StageError(
            f"{out} holds a different dataset (its manifest: source {_describe(m.source)}, "
            f"tokenizer {m.tokenizer.name}, fingerprint {str(m.fingerprint)[:12]}; this config: "
            f"{fp[:12]}). Stage into another directory, or delete {out} first.")
    marker = out / parts.PARTS / MARKER
    if marker.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{marker}: unreadable ({err}); delete {out} and stage again") \
                from None
        old, new = _loose(old), _loose(identity)
        if old != new:
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise StageError(
                f"{out} holds an unfinished staging of a different dataset (it differs in: "
                f"{', '.join(differ)}). Stage into another directory, or delete {out} first.")
        return None
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name != parts.PARTS and not p.name.endswith(".tmp"))
    if foreign:
        raise StageError(f"{out} is not empty and holds no walsh dataset (found "
                         f"{', '.join(foreign[:5])}); stage into a new or empty directory")
    return None


def _loose(identity: dict) -> dict:
    """The identity an unfinished staging may resume under: the same input paths, whatever
    their sizes (a fixed or regenerated file is re-read: its task identity, and so its part
    name, holds its size and mtime)."""
    out = {k: v for k, v in identity.items() if k != "fingerprint"}
    inputs = dict(out.get("inputs", {}))
    if "files" in inputs:
        inputs["files"] = [f["path"] for f in inputs["files"]]
    out["inputs"] = inputs
    return out


def _describe(source: dict) -> str:
    what = source.get("repo") or source.get("name") or source.get("paths")
    return f"{source.get('type')}:{what}"


@contextmanager
def _locked(parts_dir: Path):
    parts_dir.mkdir(parents=True, exist_ok=True)
    with open(parts_dir / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{parts_dir.parent} is being staged by another process") from None
        yield


def _clean(out: Path, parts_dir: Path) -> None:
    parts.clean_temporaries(parts_dir)
    for p in out.glob(".*.tmp"):  # shard or manifest temporaries of a killed run
        p.unlink(missing_ok=True)


# -- Ray --------------------------------------------------------------------------------------
@contextmanager
def ray_session(workers: int | None, address: str | None):
    """Yield (ray, workers): the running Ray, or a local one (shut down afterwards), or the
    cluster at ``address`` / ``RAY_ADDRESS``."""
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:  # must precede `import ray`: Ray reads them at import and at init
        use_local_ray_env()
    import ray

    if ray.is_initialized():
        yield ray, workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        return
    if local:
        n = workers or os.cpu_count() or 1
        ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=address, logging_level="WARNING")
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    try:
        yield ray, n
    finally:
        ray.shutdown()


_SPECS: dict[str, tokenizer.EncodingSpec] = {}


def _task(task: Task, spec_box: list, spec_sha: str, cfg: StageConfig, parts_dir: str,
          key: str, board) -> dict:
    """Runs in a Ray worker. The encoding spec comes boxed (not resolved by Ray) so a worker
    fetches and builds it once, not once per task."""
    import ray

    spec = _SPECS.get(spec_sha)
    if spec is None:
        spec = _SPECS[spec_sha] = ray.get(spec_box[0])
    report = None
    if board is not None:
        report = lambda rows, tokens: board.report.remote(task.index, rows, tokens)
    return parts.build_part(task, spec, cfg, Path(parts_dir), key, report)


def run_tasks(ray, tasks: list[Task], keys: list[str], spec, cfg: StageConfig, parts_dir: Path,
              workers: int, done: dict[int, parts.Part], progress: bool) -> None:
    """Run the tasks not in ``done`` (filled in as they finish), ``workers`` at a time."""
    def enough() -> bool:
        if cfg.max_docs is None and cfg.max_tokens is None:
            return False
        docs = tokens = 0
        for t in tasks:
            if t.index not in done:
                return False
            docs += done[t.index].docs
            tokens += done[t.index].tokens
            if (cfg.max_docs is not None and docs >= cfg.max_docs) or \
                    (cfg.max_tokens is not None and tokens >= cfg.max_tokens):
                return True
        return False

    queue = deque(t for t in tasks if t.index not in done)
    prog = StageProgress(ray, len(tasks), len(done), sum(p.tokens for p in done.values()),
                         progress and bool(queue) and not enough())
    remote = ray.remote(num_cpus=1)(_task)
    spec_ref = ray.put(spec)
    pending: dict = {}
    try:
        while True:
            while queue and len(pending) < workers and not enough():
                t = queue.popleft()
                ref = remote.remote(t, [spec_ref], spec.ranks_sha256, cfg, str(parts_dir),
                                    keys[t.index], prog.board)
                pending[ref] = t
                prog.started(t)
            if not pending or enough():
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            prog.poll()
            for ref in ready:
                t = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, ValueError):
                        raise StageError(str(cause)) from None
                    raise
                done[t.index] = parts.load_part(parts_dir, keys[t.index])
                prog.finished(t, done[t.index].tokens)
    finally:
        for ref in pending:  # after an error, or tasks past a reached limit
            ray.cancel(ref)
        prog.close()


# -- packing and the manifest -----------------------------------------------------------------
def pack(out: Path, selected, spec, cfg: StageConfig, plan, fp: str, progress: bool) -> Manifest:
    dtype = np.dtype(spec.dtype)
    per_shard = cfg.packing.chunks_per_shard(dtype.itemsize)
    counts = {s: [0, 0] for s in parts.SPLITS}
    rows, dropped, skipped = 0, Counter(), Counter()
    for part, take in selected:
        for s, (d, n) in packing.taken(part, take).items():
            counts[s][0] += d
            counts[s][1] += n
        rows += part.meta["rows"]
        dropped.update(part.meta["dropped"])
        skipped.update(part.meta["skipped"])
    total = sum(n for _, n in counts.values())
    shards = []
    with tqdm(total=total, desc="packing", unit="tok", unit_scale=True,
              disable=not progress, mininterval=0.5) as bar:
        for s in parts.SPLITS:
            shards += packing.write_split(out, s, packing.streams(selected, s),
                                          cfg.packing.chunk_tokens, per_shard, dtype, bar.update)
    totals = {
        "documents": {s: counts[s][0] for s in parts.SPLITS},
        "tokens": {s: counts[s][1] for s in parts.SPLITS},
        "chunks": {s: sum(x.samples for x in shards if x.split == s) for s in parts.SPLITS},
        "shards": {s: sum(1 for x in shards if x.split == s) for s in parts.SPLITS},
        "rows_read": rows,
        "dropped": {k: dropped.get(k, 0) for k in filters.FILTER_ORDER},
        "skipped": dict(sorted(skipped.items())),
    }
    source = {**plan.description, "limits": {"max_docs": cfg.max_docs,
                                             "max_tokens": cfg.max_tokens}}
    return Manifest(
        tokenizer=spec.info(), dtype=dtype.name, chunk_tokens=cfg.packing.chunk_tokens,
        source=source, filters=cfg.filters.model_dump(mode="json"),
        split_rule={**cfg.split.model_dump(mode="json"), "rule": SPLIT_RULE_TEXT},
        totals=totals, shards=shards, revision=plan.revision, fingerprint=fp)


def _summary(log, m: Manifest, out: Path, seconds: float, ran: int, reused: int) -> None:
    t = m.totals
    docs, toks = t["documents"], t["tokens"]
    log(f"staged {sum(docs.values()):,} documents (train {docs['train']:,}, val "
        f"{docs['val']:,}), {m.total_tokens:,} tokens (train {toks['train']:,}, val "
        f"{toks['val']:,}) into {len(m.shards)} shards in {out}")
    drops = ", ".join(f"{k} {v:,}" for k, v in t["dropped"].items() if v) or "none"
    skips = ", ".join(f"{k} {v:,}" for k, v in t["skipped"].items()) or "none"
    log(f"read {t['rows_read']:,} rows; dropped by filters: {drops}; skipped (bad input): "
        f"{skips}")
    log(f"{seconds:.1f} s, {m.total_tokens / max(seconds, 1e-9):,.0f} tokens/s "
        f"({ran} inputs run, {reused} reused from an earlier run)")
