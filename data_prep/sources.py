"""Sources: turn a configured source into an ordered list of tasks, and read a task's documents.

Planning happens in the driver and touches only metadata (file lists, sizes, parquet footers,
hub shard counts), so a wrong text column or an unreadable parquet file is reported before any
worker starts. A *task* is one input file, a range of row groups of a big parquet file, or a run
of small consecutive files, up to about ``task_mb`` of text; its identity (paths, ranges, sizes,
mtimes) names its part file, so a rerun skips it when nothing changed. The output bytes depend
only on the order of the documents, never on where the task boundaries fall.

Readers yield :class:`DocBatch` columns. A per-document problem (invalid UTF-8, a line that is
not JSON, a record without the text field) becomes ``None`` in ``texts`` and a counted skip; a
per-file problem (unreadable file, missing or mistyped column) raises :class:`StageError` naming
the file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.config import BuiltinSource, FilesSource, HubSource

BATCH = 1024
SUFFIXES = {
    ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".ndjson.gz": "jsonl",
    ".txt": "txt", ".text": "txt", ".md": "txt",
}
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class StageError(ValueError):
    """Bad input or a bad output directory; the message names the file and the problem."""


@dataclass(frozen=True)
class Piece:
    """One readable unit: a file, a row-group range ``[start, stop)`` of a parquet file, a hub
    shard (``start`` = shard index of ``stop`` shards) or a builtin group."""

    path: str
    fmt: str
    start: int = 0
    stop: int = 0
    nbytes: int = 0
    rows: int | None = None
    mtime_ns: int = 0


@dataclass(frozen=True)
class Task:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def ident(self) -> str:
        return json.dumps([[p.path, p.fmt, p.start, p.stop, p.nbytes, p.mtime_ns]
                           for p in self.pieces])

    @property
    def rows(self) -> int | None:
        rows = [p.rows for p in self.pieces]
        return None if None in rows else sum(rows)

    @property
    def label(self) -> str:
        p = self.pieces[0]
        if p.fmt == "hub":
            name = f"{p.path.rpartition('@')[0]} shard {p.start + 1}/{p.stop}"
        elif p.fmt == "builtin":
            name = p.path + (f"[{p.start}:{p.stop}]" if p.stop else "")
        else:
            name = Path(p.path).name + (f"[rg {p.start}:{p.stop}]" if p.fmt == "parquet" else "")
        return name + (f" +{len(self.pieces) - 1}" if len(self.pieces) > 1 else "")


@dataclass
class Plan:
    tasks: list[Task]
    description: dict  # what the manifest records as the source
    revision: str | None = None


@dataclass
class DocBatch:
    texts: list  # str, or None for a document already counted as skipped
    ids: list | None = None
    int_scores: list | None = None
    languages: list | None = None
    rows: int = field(default=0)


# -- planning -------------------------------------------------------------------------------
def plan(source, *, task_mb: float, needs: frozenset[str] = frozenset()) -> Plan:
    """Ordered tasks for ``source``. ``needs``: extra fields the filters read."""
    if isinstance(source, FilesSource):
        return plan_files(source, task_mb=task_mb, needs=needs)
    if isinstance(source, HubSource):
        from data_prep import hub
        return hub.plan(source, needs=needs)
    if isinstance(source, BuiltinSource):
        from data_prep import builtin
        return builtin.plan(source)
    raise StageError(f"unknown source {source!r}")


def detect_format(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def expand(paths: list[str], fmt: str) -> list[tuple[str, str]]:
    """Files, folders (walked in sorted order, hidden entries skipped) and globs -> ordered
    ``(path, format)``; each path once."""
    out: dict[str, str] = {}
    for spec in paths:
        if any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise StageError(f"{spec}: the pattern matches no files")
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
            found = [p for p in found if detect_format(p, fmt)]
            if not found:
                raise StageError(f"{spec}: no parquet, jsonl or txt files in this folder")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise StageError(f"{spec}: no such file or folder")
        for p in found:
            kind = detect_format(p, fmt)
            if kind is None:
                raise StageError(f"{p}: unknown file type (expected .parquet, .jsonl[.gz] or "
                                 ".txt; or set the source's format)")
            out.setdefault(p, kind)
    return list(out.items())


def plan_files(src: FilesSource, *, task_mb: float, needs: frozenset[str]) -> Plan:
    budget = int(task_mb * (1 << 20))
    pieces: list[Piece] = []
    files = []
    for path, fmt in expand(src.paths, src.format):
        st = os.stat(path)
        files.append({"path": path, "bytes": st.st_size})
        if fmt == "parquet":
            pieces += parquet_pieces(path, src, budget, needs, st.st_mtime_ns)
        else:
            est = st.st_size * (4 if path.endswith(".gz") else 1)
            pieces.append(Piece(path, fmt, nbytes=est, mtime_ns=st.st_mtime_ns))
    tasks: list[list[Piece]] = []
    size = 0
    for p in pieces:  # whole pieces, in order, grouped up to the budget
        if not tasks or size + p.nbytes > budget:
            tasks.append([])
            size = 0
        tasks[-1].append(p)
        size += p.nbytes
    desc = {"type": "files", "paths": list(src.paths), "format": src.format,
            "text_field": src.text_field, "id_field": src.id_field, "separator": src.separator,
            "files": files}
    return Plan([Task(i, tuple(t)) for i, t in enumerate(tasks)], desc)


STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                pa.types.is_large_binary, getattr(pa.types, "is_string_view", lambda t: False))


def parquet_pieces(path: str, src: FilesSource, budget: int, needs: frozenset[str],
                   mtime_ns: int) -> list[Piece]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise StageError(f"{path}: unreadable parquet file: {err}") from None
    schema = pf.schema_arrow
    check_columns(path, schema.names, src.text_field, needs)
    typ = schema.field(src.text_field).type
    if not any(test(typ) for test in STRING_TYPES):
        raise StageError(f"{path}: column {src.text_field!r} has type {typ}, expected a string "
                         "column (set the source's text_field)")
    md = pf.metadata
    pieces, start, size, rows = [], 0, 0, 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        size += rg.total_byte_size
        rows += rg.num_rows
        if size >= budget or i == md.num_row_groups - 1:
            pieces.append(Piece(path, "parquet", start, i + 1, size, rows, mtime_ns))
            start, size, rows = i + 1, 0, 0
    return pieces


def check_columns(path: str, names: list[str], text_field: str, needs: frozenset[str]) -> None:
    if text_field not in names:
        raise StageError(f"{path}: no text column {text_field!r} (columns: {', '.join(names)}); "
                         "set the source's text_field")
    for need in sorted(needs):
        if need not in names:
            raise StageError(f"{path}: the filters need a column {need!r}, which this file "
                             f"lacks (columns: {', '.join(names)})")


# -- reading --------------------------------------------------------------------------------
def read(task: Task, source, needs: frozenset[str], skipped: Counter) -> Iterator[DocBatch]:
    """The documents of ``task`` in order."""
    for piece in task.pieces:
        if piece.fmt == "parquet":
            yield from read_parquet(piece, source, needs, skipped)
        elif piece.fmt == "jsonl":
            yield from read_jsonl(piece, source, needs, skipped)
        elif piece.fmt == "txt":
            yield from read_txt(piece, source, skipped)
        elif piece.fmt == "hub":
            from data_prep import hub
            yield from hub.read(piece, source, needs, skipped)
        elif piece.fmt == "builtin":
            from data_prep import builtin
            yield from builtin.read(piece)
        else:
            raise StageError(f"{piece.path}: unknown input format {piece.fmt!r}")


def _decode(values: list, skipped: Counter) -> list:
    out = []
    for v in values:
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                v = None
        elif v is None:
            skipped["null_text"] += 1
        out.append(v)
    return out


def read_parquet(piece: Piece, src, needs: frozenset[str], skipped: Counter):
    try:
        pf = pq.ParquetFile(piece.path)
        names = pf.schema_arrow.names
        id_field = src.id_field if src.id_field in names else None
        cols = [src.text_field, *([id_field] if id_field else []), *sorted(needs)]
        batches = pf.iter_batches(batch_size=BATCH, row_groups=range(piece.start, piece.stop),
                                  columns=cols)
        for b in batches:
            col = b.column(src.text_field)
            try:
                texts = col.to_pylist()
            except UnicodeDecodeError:  # a string column holding invalid UTF-8
                texts = col.cast(pa.binary()).to_pylist()
            yield DocBatch(
                _decode(texts, skipped),
                ids=b.column(id_field).to_pylist() if id_field else None,
                int_scores=b.column("int_score").to_pylist() if "int_score" in needs else None,
                languages=b.column("language").to_pylist() if "language" in needs else None,
                rows=b.num_rows,
            )
    except (pa.ArrowException, OSError) as err:
        raise StageError(f"{piece.path}: unreadable parquet file: {err}") from None


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_jsonl(piece: Piece, src, needs: frozenset[str], skipped: Counter):
    extra = {"id": src.id_field, **{name: name for name in needs}}  # DocBatch key -> field
    cols: dict[str, list] = {}
    seen_text = 0
    keys_seen: set[str] = set()

    def flush() -> DocBatch:
        n = len(cols["text"])
        batch = DocBatch(cols["text"], cols.get("id"), cols.get("int_score"),
                         cols.get("language"), rows=n)
        cols.clear()
        return batch

    try:
        with _open(piece.path) as f:
            for line in f:
                if not line.strip():
                    continue
                rec = _parse_line(line, skipped)
                text = None
                if rec is not None:
                    if len(keys_seen) < 64:
                        keys_seen.update(list(rec)[:64])
                    text = rec.get(src.text_field)
                    if text is None:
                        skipped["missing_text"] += 1
                    elif not isinstance(text, str):
                        skipped["non_string_text"] += 1
                        text = None
                    else:
                        seen_text += 1
                        if not text.isascii() and not _utf8_ok(text):
                            skipped["invalid_utf8"] += 1
                            text = None
                rec = rec or {}
                cols.setdefault("text", []).append(text)
                for key, name in extra.items():
                    if name:
                        cols.setdefault(key, []).append(rec.get(name))
                if len(cols["text"]) >= BATCH:
                    yield flush()
    except GZIP_ERRORS as err:
        raise StageError(f"{piece.path}: unreadable gzip file: {err}") from None
    except OSError as err:
        raise StageError(f"{piece.path}: unreadable file: {err}") from None
    if cols:
        yield flush()
    if seen_text == 0 and keys_seen:
        raise StageError(f"{piece.path}: no record has a string field {src.text_field!r} "
                         f"(fields seen: {', '.join(sorted(keys_seen))}); set the source's "
                         "text_field")


def _parse_line(line: bytes, skipped: Counter) -> dict | None:
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        skipped["invalid_utf8"] += 1
        return None
    except json.JSONDecodeError:
        skipped["bad_json"] += 1
        return None
    if not isinstance(rec, dict):
        skipped["bad_json"] += 1
        return None
    return rec


def _utf8_ok(text: str) -> bool:
    """False for strings holding lone surrogates (JSON ``\\ud800`` escapes)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_txt(piece: Piece, src, skipped: Counter):
    try:
        data = Path(piece.path).read_bytes()
    except OSError as err:
        raise StageError(f"{piece.path}: unreadable file: {err.strerror or err}") from None
    raw = data.split(src.separator.encode()) if src.separator else [data]
    for i in range(0, len(raw), BATCH):
        part = raw[i:i + BATCH]
        yield DocBatch(_decode(part, skipped), rows=len(part))
