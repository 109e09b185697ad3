"""Parts and packing in one process (no Ray): what a task writes, limits, chunks, shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep import config, packing, parts, sources, tokenizer
from data_prep.shards import read_samples


@pytest.fixture
def jsonl_corpus(tmp_path, helpers) -> Path:
    for i in range(3):
        helpers.write_jsonl(tmp_path / "in" / f"{i}.jsonl", helpers.make_docs(i, 40, f"j{i}"))
    return tmp_path / "in"


def _build_all(cfg, parts_dir: Path) -> list[parts.Part]:
    spec = tokenizer.resolve(cfg.tokenizer)
    plan = sources.plan(cfg.source, task_mb=cfg.task_mb)
    out = []
    for task in plan.tasks:
        key = parts.part_key("fp", task)
        parts.build_part(task, spec, cfg, parts_dir, key)
        out.append(parts.load_part(parts_dir, key))
    return out


def _cfg(corpus, ranks_file, **kw):
    return config.from_dict({"source": {"type": "files", "paths": [str(corpus)]}, "out": "x",
                             "tokenizer": str(ranks_file), "task_mb": 1e-6,
                             "split": {"val_fraction": 0.25}, **kw})


def test_part_holds_each_kept_document_and_one_eot(jsonl_corpus, ranks_file,
                                                   reference_encoding, tmp_path, helpers):
    cfg = _cfg(jsonl_corpus, ranks_file)
    built = _build_all(cfg, tmp_path / "parts")
    assert len(built) == 3
    eot = reference_encoding.eot_token
    for i, part in enumerate(built):
        docs = helpers.make_docs(i, 40, f"j{i}")
        lengths, is_val = part.doc_table()
        assert len(lengths) == part.docs == 40
        streams = {s: part.stream(s).tolist() for s in parts.SPLITS}
        want = {"train": [], "val": []}
        for d, v in zip(docs, is_val):
            want["val" if v else "train"] += reference_encoding.encode_ordinary(d["text"]) + [eot]
        assert streams == want
        assert part.meta["tokens"] == {s: len(want[s]) for s in parts.SPLITS}
        assert int(lengths.sum()) == part.tokens
    assert {p.name for p in (tmp_path / "parts").iterdir()} == {
        parts.part_key("fp", t) for t in sources.plan(cfg.source, task_mb=1e-6).tasks}


def test_a_failing_task_leaves_no_part_and_no_temporaries(tmp_path, ranks_file, helpers):
    good = helpers.write_jsonl(tmp_path / "in" / "a.jsonl", helpers.make_docs(0, 30, "a"))
    bad = tmp_path / "in" / "b.jsonl.gz"
    data = (good.read_bytes() * 50)
    import gzip
    bad.write_bytes(gzip.compress(data)[:4000])
    cfg = _cfg(tmp_path / "in", ranks_file)
    with pytest.raises(sources.StageError, match="b.jsonl.gz: unreadable gzip file"):
        _build_all(cfg, tmp_path / "parts")
    left = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(left) == 1 and not left[0].startswith(".")  # a.jsonl's part only


def test_limits_cut_at_a_document_boundary(jsonl_corpus, ranks_file, tmp_path):
    full = _build_all(_cfg(jsonl_corpus, ranks_file), tmp_path / "full")
    sel = packing.select_parts(full, max_docs=55, max_tokens=None)
    assert [take for _, take in sel] == [None, 15]
    limited = _build_all(_cfg(jsonl_corpus, ranks_file, max_docs=55), tmp_path / "lim")
    assert [p.docs for p in limited] == [40, 40, 40]  # no task needs more than 55
    lengths = np.concatenate([p.doc_table()[0] for p in full])
    budget = int(lengths[:70].sum()) - 3  # reached inside document 70
    sel = packing.select_parts(full, max_docs=None, max_tokens=budget)
    assert sum(packing.taken(p, t)["train"][0] + packing.taken(p, t)["val"][0]
               for p, t in sel) == 70
    tok_limited = _build_all(_cfg(jsonl_corpus, ranks_file, max_tokens=budget),
                             tmp_path / "tok")
    a = packing.select_parts(tok_limited, None, budget)
    assert [(t, p.meta["tokens"]) for p, t in a][:1] == [(None, full[0].meta["tokens"])]
    for split in parts.SPLITS:
        got = np.concatenate(list(packing.streams(a, split)) or [np.zeros(0)])
        want = np.concatenate(list(packing.streams(sel, split)) or [np.zeros(0)])
        assert np.array_equal(got, want)


@pytest.mark.parametrize("lengths", [[5, 3, 12, 1, 7], [16], [1] * 9, []])
def test_iter_chunks_cuts_the_concatenation(lengths):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1000, n).astype(np.uint16) for n in lengths]
    chunks = list(packing.iter_chunks(arrays, 4, np.dtype(np.uint16)))
    joined = np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)
    assert np.array_equal(np.concatenate(chunks) if chunks else joined, joined)
    assert all(len(c) == 4 for c in chunks[:-1]) and all(c.dtype == np.uint16 for c in chunks)


def test_write_split_groups_chunks_into_shards(tmp_path):
    stream = np.arange(1000, dtype=np.uint16)
    shards = packing.write_split(tmp_path, "train", [stream[:333], stream[333:]], 64, 5,
                                 np.dtype(np.uint16))
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar",
                                        "train-000002.tar", "train-000003.tar"]
    assert [s.samples for s in shards] == [5, 5, 5, 1] and sum(s.tokens for s in shards) == 1000
    keys, back = [], []
    for s in shards:
        for key, arr in read_samples(tmp_path / s.name):
            keys.append(key)
            back.append(arr)
    assert keys == [f"train-{i:010d}" for i in range(16)]
    assert np.array_equal(np.concatenate(back), stream)
