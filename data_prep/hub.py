"""The Hugging Face hub source: FineWeb-Edu (or any dataset) streamed through ``datasets``.

Each hub data file is one task (``IterableDataset.shard`` over the dataset's file shards), so
the workers stream different files in parallel and a rerun skips finished ones. The revision is
resolved to a commit sha once, in the driver, so every task reads the same snapshot and the
manifest records it.

Offline, ``datasets`` would retry for minutes before failing. Staging checks first, in well under
a second: the offline variables (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), then a TCP
connection to the endpoint (or to the proxy, when one is set); if either says no, it stops with
a message that says how to stage local files instead. ``repo`` may also name a local folder laid
out like a hub dataset, which needs no network at all.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from data_prep.config import HubSource
from data_prep.sources import BATCH, DocBatch, Piece, Plan, StageError, Task, check_columns

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT = 0.8  # seconds; the whole check must stay under one second


def offline_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the hub is unusable right now, or None when it answers."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]}"
    target = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            target = os.environ[var]
            break
    url = urlsplit(target if "://" in target else f"http://{target}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    errors: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            errors.append("")
        except OSError as err:
            errors.append(str(err) or type(err).__name__)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not errors:
        return f"{host}:{port} did not answer within {timeout:.1f} s"
    return f"cannot connect to {host}:{port}: {errors[0]}" if errors[0] else None


def offline_message(src: HubSource, reason: str) -> str:
    return (
        f"the Hugging Face hub is unavailable ({reason}), so {src.repo} cannot be streamed. "
        "To stage offline, use local files: on a connected machine run `huggingface-cli "
        f"download {src.repo} --repo-type dataset --local-dir DIR` (add --include to fetch one "
        "subset, e.g. 'sample/10BT/*'), copy DIR here, then run `walsh data stage --source "
        "DIR --out OUT` (parquet, jsonl or txt files; or `source: {type: files, paths: [DIR]}` "
        "in a config)."
    )


def _load(src: HubSource, revision: str | None):
    import datasets

    return datasets.load_dataset(src.repo, name=src.subset, split=src.split, revision=revision,
                                 streaming=True)


def plan(src: HubSource, *, needs: frozenset[str] = frozenset()) -> Plan:
    local = Path(src.repo).is_dir()
    revision = None
    if not local:
        reason = offline_reason()
        if reason:
            raise StageError(offline_message(src, reason))
        from huggingface_hub import HfApi
        try:
            revision = HfApi().dataset_info(src.repo, revision=src.revision).sha
        except Exception as err:  # not found, gated, no such revision, network
            raise StageError(f"hub dataset {src.repo}@{src.revision}: {err}") from None
    try:
        ds = _load(src, revision)
    except Exception as err:
        raise StageError(f"hub dataset {src.repo} (subset {src.subset}, split {src.split}): "
                         f"{err}") from None
    if ds.features is not None:
        check_columns(src.repo, list(ds.features), src.text_field, needs)
    n = ds.num_shards
    ref = f"{src.repo}@{revision or ''}"
    tasks = [Task(i, (Piece(ref, "hub", i, n),)) for i in range(n)]
    desc = {"type": "hub", "repo": src.repo, "subset": src.subset, "split": src.split,
            "requested_revision": src.revision, "text_field": src.text_field,
            "id_field": src.id_field, "files": n}
    return Plan(tasks, desc, revision)


def read(piece: Piece, src: HubSource, needs: frozenset[str], skipped: Counter):
    repo, _, revision = piece.path.rpartition("@")
    ds = _load(src.model_copy(update={"repo": repo}), revision or None)
    ds = ds.shard(num_shards=piece.stop, index=piece.start)
    for b in ds.iter(batch_size=BATCH):
        if src.text_field not in b:
            raise StageError(f"{repo} shard {piece.start}: no text field {src.text_field!r} "
                             f"(fields: {', '.join(b)})")
        texts = b[src.text_field]
        for i, t in enumerate(texts):
            if t is None:
                skipped["null_text"] += 1
            elif not isinstance(t, str):
                skipped["non_string_text"] += 1
                texts[i] = None
        yield DocBatch(texts, ids=b.get(src.id_field) if src.id_field else None,
                       int_scores=b.get("int_score") if "int_score" in needs else None,
                       languages=b.get("language") if "language" in needs else None,
                       rows=len(texts))
