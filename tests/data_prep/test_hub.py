"""The hub source: offline fails fast with a message that says what to do; the streaming path
itself runs against a local folder laid out like a hub dataset (no network)."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from data_prep import hub
from data_prep.sources import StageError
from data_prep.stage import stage

PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def online_env(monkeypatch):
    for var in (*hub.OFFLINE_VARS, *PROXIES, "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# The bounds below tell "gave up at once" from "waited on the network" (the hub client's own
# timeouts and retries take tens of seconds); they are not a speed goal, and are loose enough
# for a loaded 2-core CI machine (a 1.0 s bound there is one slow import from failing).
FAST_S = 5.0


def _expect_fast_failure(tmp_path, source: dict) -> str:
    t0 = time.perf_counter()
    with pytest.raises(StageError) as info:
        stage({"source": source, "out": str(tmp_path / "out")})  # default tokenizer: r50k_base
    assert time.perf_counter() - t0 < FAST_S
    assert not (tmp_path / "out").exists()
    msg = str(info.value)
    assert "use local files" in msg and "walsh data stage --source DIR --out OUT" in msg
    assert "huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset" in msg
    return msg


def test_offline_variables_fail_at_once(online_env, tmp_path):
    online_env.setenv("HF_HUB_OFFLINE", "1")
    msg = _expect_fast_failure(tmp_path, {"type": "hub"})
    assert "(HF_HUB_OFFLINE=1)" in msg
    online_env.delenv("HF_HUB_OFFLINE")
    online_env.setenv("HF_DATASETS_OFFLINE", "true")
    assert "HF_DATASETS_OFFLINE=true" in _expect_fast_failure(tmp_path, {"type": "hub"})


def test_an_unreachable_hub_fails_at_once(online_env, tmp_path):
    online_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on discard
    msg = _expect_fast_failure(tmp_path, {"type": "hub", "subset": "sample-100BT"})
    assert "cannot connect to 127.0.0.1:9" in msg


def test_a_silent_host_does_not_stall_the_check(online_env):
    """DNS or a firewall that never answers: the probe gives up after its timeout."""
    def silent(*args, **kwargs):
        time.sleep(30.0)  # in the probe's daemon thread, which the check leaves behind
        raise TimeoutError("timed out")

    online_env.setattr(hub.socket, "create_connection", silent)
    t0 = time.perf_counter()
    reason = hub.offline_reason(timeout=0.3)
    assert reason == "huggingface.co:443 did not answer within 0.3 s"
    assert time.perf_counter() - t0 < FAST_S


def test_the_cli_prints_one_line(online_env, tmp_path, capsys):
    from pipeline.cli import main

    online_env.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["data", "stage", "--source", "hub:HuggingFaceFW/fineweb-edu", "--subset",
                 "sample-10BT", "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - t0 < FAST_S
    err = capsys.readouterr().err
    assert err.startswith("walsh: error: the Hugging Face hub is unavailable (HF_HUB_OFFLINE=1)")


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_streams_a_local_hub_layout_one_task_per_file(ray_local, tmp_path, helpers, ranks_file,
                                                      reference_encoding):
    repo = tmp_path / "fineweb-edu-mini"
    docs = []
    for i in range(3):
        rows = helpers.make_docs(40 + i, 60, f"h{i}")
        helpers.write_parquet(repo / "data" / f"train-{i:05d}-of-00003.parquet", rows)
        docs += rows
    m = stage({"source": {"type": "hub", "repo": str(repo), "subset": None},
               "out": str(tmp_path / "ds"), "tokenizer": str(ranks_file), "workers": 2,
               "filters": {"min_int_score": 3}, "packing": {"chunk_tokens": 512}})
    kept = [d for d in docs if d["int_score"] >= 3]
    assert m.source["type"] == "hub" and m.source["files"] == 3
    assert m.totals["dropped"]["int_score"] == len(docs) - len(kept) > 0
    assert m.total_tokens == sum(len(reference_encoding.encode_ordinary(d["text"])) + 1
                                 for d in kept)
    assert pq.ParquetFile(next(repo.glob("data/*.parquet"))).metadata.num_rows == 60
