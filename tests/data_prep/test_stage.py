"""Staging end to end with real Ray, real tars and data generated here: counts against an
independent tiktoken, byte-identical output for 1 and 2 workers, kill-and-resume, the split under
reordering, a directory holding another dataset, bad input inside a task, limits, dtypes."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep import tokenizer
from data_prep.manifest import Manifest
from data_prep.shards import read_samples, sha256_file
from data_prep.sources import StageError
from data_prep.stage import stage

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

CHUNK = 256
SHARD_MB = CHUNK * 2 * 8 / 2**20  # 8 chunks of uint16 per shard


def cfg_for(paths, out, ranks_file, **kw) -> dict:
    base = {"source": {"type": "files", "paths": [str(p) for p in paths]}, "out": str(out),
            "tokenizer": str(ranks_file), "split": {"val_fraction": 0.2},
            "packing": {"chunk_tokens": CHUNK, "shard_mb": SHARD_MB},
            "task_mb": 0.03}  # several tasks even for these small files
    for key, value in kw.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


def corpus_texts(root: Path) -> list[tuple[str, str]]:
    """(id, text) of every document of ``root`` in staging order (sorted files, rows)."""
    out = []
    for p in sorted(root.iterdir()):
        if p.suffix == ".parquet":
            rows = pq.read_table(p).to_pylist()
        else:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        out += [(r["id"], r["text"]) for r in rows]
    return out


def split_docs(m: Manifest, split: str) -> list[list[int]]:
    """The documents of a split, as token lists, read back from the shards."""
    arrays = [arr for s in m.split(split) for _, arr in read_samples(m.path(s))]
    if not arrays:
        return []
    stream = np.concatenate(arrays).tolist()
    docs, cur = [], []
    for t in stream:
        if t == m.tokenizer.eot_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the stream ends with an EOT
    return docs


@pytest.fixture(scope="module")
def reference(ray_local, corpus, ranks_file, tmp_path_factory, helpers):
    """The corpus staged once, uninterrupted, with one worker."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    cfg = cfg_for([corpus], out, ranks_file, workers=1)
    m = stage(cfg)
    return cfg, m, helpers.tree_digest(out)


def test_totals_match_an_independent_tiktoken_count(reference, corpus, reference_encoding):
    cfg, m, _ = reference
    docs = corpus_texts(corpus)
    want = sum(len(reference_encoding.encode_ordinary(t)) + 1 for _, t in docs)
    assert m.total_tokens == want
    assert sum(m.totals["documents"].values()) == len(docs) == m.totals["rows_read"]
    assert m.totals["tokens"]["train"] == m.split_tokens("train")
    assert 0 < m.totals["documents"]["val"] < len(docs) / 2
    texts = {s: [reference_encoding.decode(d) for d in split_docs(m, s)] for s in ("train", "val")}
    assert sorted(texts["train"] + texts["val"]) == sorted(t for _, t in docs)
    order = [t for _, t in docs]
    for s in ("train", "val"):  # each split keeps the input order
        pos = [order.index(t) for t in texts[s]]
        assert pos == sorted(pos)
    assert m.tokenizer.name == cfg["tokenizer"] and m.dtype == "uint16"
    assert m.tokenizer.eot_id == reference_encoding.eot_token
    assert m.chunk_tokens == CHUNK and m.source["type"] == "files"
    assert len(m.source["files"]) == 5 and m.split_rule["val_fraction"] == 0.2
    for s in m.shards:
        assert sha256_file(m.path(s)) == s.sha256
        assert s.samples <= 8
    assert not (m.root / ".parts").exists()


def test_one_and_two_workers_and_any_task_size_give_identical_bytes(reference, tmp_path, helpers):

    cfg, _, digest = reference
    for name, extra in (("w2", {"workers": 2}), ("w2-small-tasks", {"workers": 2,
                                                                     "task_mb": 0.005})):
        out = tmp_path / name
        stage({**cfg, "out": str(out), **extra})
        assert helpers.tree_digest(out) == digest, name


def test_kill_and_resume_gives_identical_bytes(ray_local, tmp_path, ranks_file, helpers):

    root = tmp_path / "big"
    for i in range(10):
        helpers.write_jsonl(root / f"{i:02d}.jsonl", helpers.make_docs(100 + i, 1500, f"k{i}"))
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = cfg_for([root], ref_out, ranks_file, workers=2, task_mb=1e-6)  # a task per file
    stage(ref)
    cfg = {**ref, "out": str(out), "workers": 1}
    address = ray_local.get_runtime_context().gcs_address
    code = ("import json, sys; from data_prep.stage import stage; "
            "stage(json.loads(sys.argv[1]), address=sys.argv[2])")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg), address],
                            start_new_session=True, cwd=Path(__file__).parents[2])
    parts_dir = out / ".parts"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p for p in parts_dir.glob("*") if p.is_dir() and not p.name.startswith(".")]
            if len(done) >= 2:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "staging finished before it could be killed"
    assert not (out / "manifest.json").exists()
    logs: list[str] = []
    stage({**cfg, "workers": 2}, log=logs.append)
    assert helpers.tree_digest(out) == helpers.tree_digest(ref_out)
    reused = int(logs[-1].split(", ")[-1].split()[0].lstrip("("))
    assert reused >= 2, logs[-1]


def test_resume_after_losing_the_manifest_shards_and_parts(reference, tmp_path, helpers):

    cfg, _, digest = reference
    out = tmp_path / "ds"
    stage({**cfg, "out": str(out), "keep_parts": True})
    finished = sorted(p for p in (out / ".parts").iterdir() if p.is_dir())
    assert len(finished) >= 5
    (out / "manifest.json").unlink()
    (out / "train-000001.tar").unlink()
    with open(out / "train-000002.tar", "r+b") as f:
        f.truncate(1000)
    for p in finished[:2]:
        shutil.rmtree(p)
    (out / ".train-000003.tar.abc.tmp").write_bytes(b"partial")
    (out / ".parts" / f".{finished[0].name}.0123.tmp").mkdir()
    stage({**cfg, "out": str(out), "workers": 2})
    assert helpers.tree_digest(out) == digest


def test_verify_names_a_flipped_byte_and_a_truncated_shard(reference, tmp_path, capsys):
    from pipeline.cli import main

    _, m, _ = reference
    out = tmp_path / "ds"
    shutil.copytree(m.root, out)
    assert main(["data", "verify", str(out), "--no-decode"]) == 0
    assert "OK" in capsys.readouterr().out
    flipped, cut = out / "train-000001.tar", out / "val-000000.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert main(["data", "verify", str(out), "--no-decode"]) == 2
    captured = capsys.readouterr()
    assert "train-000001.tar: sha256 mismatch" in captured.out
    assert "val-000000.tar: sha256 mismatch" in captured.out
    assert "shards failing: train-000001.tar, val-000000.tar" in captured.err
    from data_prep.verify import verify

    problems = verify(out).problems
    assert any(p.startswith("val-000000.tar: ") and ("samples" in p or "unreadable" in p)
               for p in problems), problems
    assert not any("train-000000.tar" in p for p in problems)


def test_split_is_stable_when_inputs_are_reordered(reference, corpus, tmp_path, helpers,
                                                   reference_encoding):
    cfg, m, _ = reference
    rows = [r for p in sorted(corpus.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for p in sorted(corpus.glob("*.jsonl*")):
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        rows += [json.loads(line) for line in raw.splitlines()]
    random.Random(3).shuffle(rows)
    moved = tmp_path / "moved"
    for i in range(4):  # other files, other order, other boundaries, other formats
        chunk = rows[i::4]
        if i % 2:
            helpers.write_parquet(moved / f"part-{3 - i}.parquet", chunk, row_group_size=17)
        else:
            helpers.write_jsonl(moved / f"part-{3 - i}.jsonl", chunk)
    m2 = stage(cfg_for([moved], tmp_path / "ds", cfg["tokenizer"], workers=2))
    for split in ("train", "val"):
        a = sorted(reference_encoding.decode(d) for d in split_docs(m, split))
        b = sorted(reference_encoding.decode(d) for d in split_docs(m2, split))
        assert a == b, split


def test_a_directory_holding_another_dataset_is_refused_and_untouched(reference, tmp_path, helpers):

    cfg, m, digest = reference
    # already staged: nothing to do, so no file is written again (a rewrite through a temp
    # name and a rename gives a new inode and mtime even for equal bytes)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in m.root.rglob("*")}
    assert stage(cfg).fingerprint == m.fingerprint
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in m.root.rglob("*")} == stamps
    other = {**cfg, "packing": {"chunk_tokens": 128, "shard_mb": SHARD_MB}}
    with pytest.raises(StageError, match="holds a different dataset"):
        stage(other)
    assert helpers.tree_digest(m.root) == digest
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StageError, match=r"photos is not empty and holds no walsh dataset "
                                         r"\(found cat.jpg\)"):
        stage({**cfg, "out": str(foreign)})
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def test_an_unfinished_staging_of_another_dataset_is_refused(reference, tmp_path):
    cfg, _, _ = reference
    out = tmp_path / "ds"
    stage({**cfg, "out": str(out), "keep_parts": True})
    (out / "manifest.json").unlink()  # now it looks unfinished
    with pytest.raises(StageError, match=r"unfinished staging of a different dataset \(it "
                                         r"differs in: split\)"):
        stage({**cfg, "out": str(out), "split": {"val_fraction": 0.5}})


def test_bad_gzip_inside_a_task_names_the_file_and_resumes_once_fixed(ray_local, tmp_path,
                                                                     ranks_file, helpers):
    root = tmp_path / "in"
    helpers.write_jsonl(root / "a.jsonl", helpers.make_docs(1, 50, "a"))
    good = helpers.write_jsonl(tmp_path / "b.jsonl.gz", helpers.make_docs(2, 400, "b"))
    (root / "b.jsonl.gz").write_bytes(good.read_bytes()[:3000])
    cfg = cfg_for([root], tmp_path / "ds", ranks_file, workers=2, task_mb=1e-6)
    with pytest.raises(StageError) as info:
        stage(cfg)
    msg = str(info.value)
    assert "b.jsonl.gz: unreadable gzip file" in msg and "Traceback" not in msg
    assert not (tmp_path / "ds" / "manifest.json").exists()
    shutil.copy(good, root / "b.jsonl.gz")
    m = stage(cfg)
    assert sum(m.totals["documents"].values()) == 450


def test_per_document_problems_are_counted_and_reported(ray_local, tmp_path, ranks_file):
    root = tmp_path / "in"
    root.mkdir()
    lines = [json.dumps({"text": f"document number {i} about science", "id": str(i)})
             for i in range(20)]
    lines += ['{"text": "", "id": "e"}', '{"text": "   ", "id": "s"}', "{broken",
              '{"id": "no text"}', b'{"text": "bad \xff", "id": "u"}'.decode("latin-1"),
              '{"text": "tiny", "id": "t"}']
    (root / "x.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    logs: list[str] = []
    m = stage(cfg_for([root], tmp_path / "ds", ranks_file, filters={"min_chars": 10}),
              log=logs.append)
    assert sum(m.totals["documents"].values()) == 20
    assert m.totals["skipped"] == {"bad_json": 1, "empty": 2, "invalid_utf8": 1,
                                   "missing_text": 1}
    assert m.totals["dropped"] == {"min_chars": 1, "language": 0, "int_score": 0}
    assert "min_chars 1" in logs[1] and "empty 2" in logs[1] and "invalid_utf8 1" in logs[1]


def test_limits_are_identical_across_workers(reference, tmp_path, helpers):

    cfg, _, _ = reference
    digests = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        m = stage({**cfg, "out": str(out), "workers": w, "max_docs": 300, "task_mb": 0.005})
        assert sum(m.totals["documents"].values()) == 300
        digests.append(helpers.tree_digest(out))
    assert digests[0] == digests[1]
    m = stage({**cfg, "out": str(tmp_path / "tok"), "max_tokens": 5000})
    assert 5000 <= m.total_tokens < 5000 + 2000


def test_large_vocab_is_staged_as_uint32(ray_local, tmp_path, helpers):
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):
        for b in range(256):
            ranks[bytes([a, b])] = len(ranks)
    tok = helpers.write_ranks(tmp_path / "big.tiktoken", ranks)
    root = tmp_path / "in"
    docs = helpers.make_docs(5, 40, "u")
    helpers.write_jsonl(root / "u.jsonl", docs)
    m = stage(cfg_for([root], tmp_path / "ds", tok))
    enc = tokenizer.load(str(tok))
    assert m.dtype == "uint32" and m.tokenizer.vocab_size == 65793
    assert m.total_tokens == sum(len(enc.encode_ordinary(d["text"])) + 1 for d in docs)
    assert all(arr.dtype == np.uint32 for s in m.shards for _, arr in read_samples(m.path(s)))


def test_builtin_corpus_stages_offline(ray_local, tmp_path, ranks_file):
    m = stage({"source": {"type": "builtin", "name": "python-docs"}, "out": str(tmp_path / "b"),
               "tokenizer": str(ranks_file), "max_docs": 150,
               "packing": {"chunk_tokens": 1024, "shard_mb": 0.05}})
    assert sum(m.totals["documents"].values()) == 150
    assert m.source["type"] == "builtin" and m.revision.startswith("python-")
    from data_prep.verify import inspect

    text = inspect(m.root, n_tokens=60)
    assert "train" in text and "--- train chunk 0" in text and "(cannot decode" not in text


def test_cli_stage_verify_inspect(ray_local, corpus, tmp_path, ranks_file, capsys):
    from pipeline.cli import main

    out = tmp_path / "cli"
    assert main(["data", "stage", "--source", str(corpus), "--out", str(out), "--tokenizer",
                 str(ranks_file), "--workers", "2", "--chunk-tokens", "512", "--shard-mb",
                 "0.01", "--no-progress"]) == 0
    assert "staged 610 documents" in capsys.readouterr().out
    assert main(["data", "verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK" in text and "--- train chunk 0, first 64 tokens ---" in text
    assert main(["data", "inspect", str(out), "--split", "val", "--tokens", "40"]) == 0
    text = capsys.readouterr().out
    assert "tokenizer" in text and "--- val chunk 0, first 40 tokens ---" in text
    m = Manifest.load(out)
    assert m.chunk_tokens == 512


def test_cli_errors_are_one_line(tmp_path, corpus, capsys):
    from pipeline.cli import main

    assert main(["data", "stage", "--source", str(corpus), "--out", str(tmp_path / "o"),
                 "--tokenizer", "gpt5_base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("walsh: error: unknown tokenizer 'gpt5_base'") and "\n" == err[-1]
    assert main(["data", "verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_progress_bars_per_input_and_totals(ray_local, corpus, tmp_path, ranks_file, capsys):
    stage(cfg_for([corpus], tmp_path / "p", ranks_file, workers=2), progress=True)
    err = capsys.readouterr().err
    assert "inputs: 100%" in err and "tok/s" in err and "packing: 100%" in err
