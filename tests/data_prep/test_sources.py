"""Sources and filters (no Ray): file discovery, task planning, readers, bad input, the split."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import builtin, filters, sources
from data_prep.config import BuiltinSource, FilesSource, Filters, SplitRule
from data_prep.sources import StageError


def _read_all(task_or_piece, src, needs=frozenset()):
    task = task_or_piece if isinstance(task_or_piece, sources.Task) else \
        sources.Task(0, (task_or_piece,))
    skipped = Counter()
    batches = list(sources.read(task, src, needs, skipped))
    return batches, skipped


def test_expand_orders_walks_and_names_problems(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/a.parquet", "d/sub/c.txt", "d/.hidden.jsonl", "d/notes.csv"):
        (tmp_path / name).write_text("x")
    found = sources.expand([str(tmp_path / "d")], "auto")
    assert [p.split("/d/")[1] for p, _ in found] == ["a.parquet", "b.jsonl", "sub/c.txt"]
    assert [f for _, f in found] == ["parquet", "jsonl", "txt"]
    assert len(sources.expand([str(tmp_path / "d" / "*.jsonl")], "auto")) == 1
    with pytest.raises(StageError, match="missing.parquet: no such file"):
        sources.expand([str(tmp_path / "missing.parquet")], "auto")
    with pytest.raises(StageError, match="notes.csv: unknown file type"):
        sources.expand([str(tmp_path / "d" / "notes.csv")], "auto")
    with pytest.raises(StageError, match="matches no files"):
        sources.expand([str(tmp_path / "*.parquet")], "auto")


def test_parquet_is_split_by_row_groups_and_small_files_grouped(tmp_path, helpers):
    big = helpers.write_parquet(tmp_path / "big.parquet", helpers.make_docs(0, 400, "b"),
                                row_group_size=50)
    for i in range(3):
        helpers.write_jsonl(tmp_path / f"s{i}.jsonl", helpers.make_docs(i, 5, f"s{i}"))
    src = FilesSource(paths=[str(tmp_path)])
    budget_mb = pq.ParquetFile(big).metadata.row_group(0).total_byte_size * 2.5 / 2**20
    plan = sources.plan(src, task_mb=budget_mb)
    big_tasks = [t for t in plan.tasks if t.pieces[0].fmt == "parquet"]
    assert len(big_tasks) == 3  # 8 row groups, ~3 per task
    assert [(t.pieces[0].start, t.pieces[0].stop) for t in big_tasks] == [(0, 3), (3, 6), (6, 8)]
    assert sum(p.rows for t in big_tasks for p in t.pieces if p.fmt == "parquet") == 400
    assert len(plan.tasks[-1].pieces) >= 2  # the small jsonl files share a task
    assert [f["path"] for f in plan.description["files"]][0].endswith("big.parquet")
    again = sources.plan(src, task_mb=budget_mb)
    assert [t.ident for t in again.tasks] == [t.ident for t in plan.tasks]


def test_parquet_column_problems_name_the_file(tmp_path, helpers):
    rows = helpers.make_docs(0, 10, "x")
    helpers.write_parquet(tmp_path / "content.parquet",
                          [{("content" if k == "text" else k): v for k, v in r.items()}
                           for r in rows])
    with pytest.raises(StageError, match=r"content.parquet: no text column 'text' \(columns: "):
        sources.plan(FilesSource(paths=[str(tmp_path / "content.parquet")]), task_mb=16)
    helpers.write_parquet(tmp_path / "ints.parquet", [{"text": i, "id": str(i)} for i in range(5)])
    with pytest.raises(StageError, match="ints.parquet: column 'text' has type int64"):
        sources.plan(FilesSource(paths=[str(tmp_path / "ints.parquet")]), task_mb=16)
    helpers.write_parquet(tmp_path / "noscore.parquet", [{"text": "a", "id": "1"}])
    with pytest.raises(StageError, match="noscore.parquet: the filters need a column 'int_score'"):
        sources.plan(FilesSource(paths=[str(tmp_path / "noscore.parquet")]), task_mb=16,
                     needs=frozenset({"int_score"}))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(StageError, match="junk.parquet: unreadable parquet file"):
        sources.plan(FilesSource(paths=[str(tmp_path / "junk.parquet")]), task_mb=16)


def test_parquet_invalid_utf8_and_nulls_are_counted(tmp_path):
    table = pa.table({"text": pa.array([b"good", b"\xff\xfebad", None, b"ok"], pa.binary()),
                      "id": ["1", "2", "3", "4"]})
    pq.write_table(table, tmp_path / "bin.parquet")
    src = FilesSource(paths=[str(tmp_path / "bin.parquet")])
    plan = sources.plan(src, task_mb=16)
    batches, skipped = _read_all(plan.tasks[0], src)
    assert batches[0].texts == ["good", None, None, "ok"]
    assert skipped == {"invalid_utf8": 1, "null_text": 1}


def test_jsonl_per_document_problems_are_counted_skips(tmp_path):
    lines = [
        json.dumps({"text": "fine", "id": "a"}).encode(),
        b'{"text": "caf\xe9 latin-1", "id": "b"}',  # invalid UTF-8
        b"{not json",
        b"[1, 2]",
        json.dumps({"id": "c"}).encode(),  # no text
        json.dumps({"text": 5, "id": "d"}).encode(),
        b'{"text": "lone \\ud800 surrogate", "id": "e"}',
        b"",
        json.dumps({"text": "", "id": "f"}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    src = FilesSource(paths=[str(path)])
    batches, skipped = _read_all(sources.plan(src, task_mb=16).tasks[0], src)
    assert batches[0].texts == ["fine", None, None, None, None, None, None, ""]
    assert batches[0].ids == ["a", None, None, None, "c", "d", "e", "f"]
    assert skipped == {"invalid_utf8": 2, "bad_json": 2, "missing_text": 1,
                       "non_string_text": 1}


def test_jsonl_without_the_text_field_is_an_error(tmp_path, helpers):
    rows = [{"content": r["text"], "id": r["id"]} for r in helpers.make_docs(0, 5, "x")]
    path = helpers.write_jsonl(tmp_path / "c.jsonl", rows)
    src = FilesSource(paths=[str(path)])
    with pytest.raises(StageError, match=r"c.jsonl: no record has a string field 'text' "
                                         r"\(fields seen: content, id\)"):
        _read_all(sources.plan(src, task_mb=16).tasks[0], src)
    ok = FilesSource(paths=[str(path)], text_field="content")
    batches, _ = _read_all(sources.plan(ok, task_mb=16).tasks[0], ok)
    assert batches[0].texts[0] == rows[0]["content"]


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path, helpers):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n"
                                  for r in helpers.make_docs(0, 200, "g")))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    src = FilesSource(paths=[str(path)])
    with pytest.raises(StageError, match="cut.jsonl.gz: unreadable gzip file"):
        _read_all(sources.plan(src, task_mb=16).tasks[0], src)
    (tmp_path / "nogz.jsonl.gz").write_bytes(b"plain text, not gzip")
    src = FilesSource(paths=[str(tmp_path / "nogz.jsonl.gz")])
    with pytest.raises(StageError, match="nogz.jsonl.gz: unreadable gzip file"):
        _read_all(sources.plan(src, task_mb=16).tasks[0], src)


def test_txt_one_per_file_or_per_separator(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first doc\n===\nsecond\n===\n\xff\xfe")
    src = FilesSource(paths=[str(tmp_path / "a.txt")])
    batches, skipped = _read_all(sources.plan(src, task_mb=16).tasks[0], src)
    assert batches[0].texts == [None] and skipped == {"invalid_utf8": 1}
    sep = FilesSource(paths=[str(tmp_path / "a.txt")], separator="\n===\n")
    batches, skipped = _read_all(sources.plan(sep, task_mb=16).tasks[0], sep)
    assert batches[0].texts[:2] == ["first doc", "second"] and skipped == {"invalid_utf8": 1}


def test_builtin_corpus_is_deterministic_and_offline():
    plan = builtin.plan(BuiltinSource())
    assert len(plan.tasks) >= 5 and plan.revision.startswith("python-")
    first = [b.texts for b in builtin.read(plan.tasks[1].pieces[0])]
    again = [b.texts for b in builtin.read(plan.tasks[1].pieces[0])]
    assert first == again and sum(map(len, first)) > 20
    topics = next(builtin.read(plan.tasks[0].pieces[0]))
    assert topics.ids[0].startswith("pydoc-topics:") and len(topics.texts) > 50
    name, text = builtin.module_text("json/__init__.py")
    assert name == "json" and "JSON" in text and "json.dumps" in text


def test_filters_count_each_drop_once_and_in_order():
    batch = sources.DocBatch(
        texts=["long enough english", "short", "long enough french", "long but low score",
               "   \n", None, "long enough, no id"],
        ids=["1", "2", "3", "4", "5", "6", None],
        int_scores=[4, 4, 4, 1, 4, 4, 3], languages=["en", "en", "fr", "en", "en", "en", "en"])
    dropped, skipped = Counter(), Counter()
    f = Filters(min_int_score=3, languages=["en"], min_chars=10)
    texts, val = filters.select(batch, f, SplitRule(), dropped, skipped)
    assert texts == ["long enough english", "long enough, no id"] and val == [False, False]
    assert dropped == {"min_chars": 1, "language": 1, "int_score": 1}
    assert skipped == {"empty": 1}
    assert filters.needs(f) == {"int_score", "language"}


def test_split_is_a_pure_function_of_the_key():
    rule = SplitRule(val_fraction=0.2)
    keys = [f"<urn:uuid:{i}>" for i in range(5000)]
    val = [filters.is_val(k, rule) for k in keys]
    assert val == [filters.is_val(k, rule) for k in keys]
    assert 0.17 < sum(val) / len(val) < 0.23
    other = [filters.is_val(k, SplitRule(val_fraction=0.2, salt="x")) for k in keys]
    assert other != val
    by_text = sources.DocBatch(texts=["same text"], ids=["id-1"])
    a = filters.select(by_text, Filters(), SplitRule(val_fraction=0.5, key="text"),
                       Counter(), Counter())
    b = filters.select(sources.DocBatch(texts=["same text"], ids=["id-2"]), Filters(),
                       SplitRule(val_fraction=0.5, key="text"), Counter(), Counter())
    assert a == b
