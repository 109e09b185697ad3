"""MLflow tracking of training runs, for real: the default sqlite store in the run directory, a
resumed job appending to its run, a tracking server that is down from the start, and a real
`mlflow server` on 127.0.0.1 that receives a run and is then killed mid-run.

The training runs are `walsh train --launcher none` subprocesses (one process: the tracker is
rank 0's alone, whatever launched it; the Ray path is covered in test_ray_launch.py). The
results are read back with ``MlflowClient``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from _helpers import (
    finish_walsh,
    kill_session,
    pattern_run_config,
    read_metrics,
    start_walsh,
    walsh_env,
    write_yaml,
)

from data_prep.local_ray import free_port
from pipeline.config_load import from_dict
from pipeline.tracking import RUN_ID_FILE, Tracker, artifact_root, default_uri
from walsh.models import WalshLM

UNAVAILABLE = "MLflow tracking unavailable"


def tracked_config(data: Path, run_dir: Path, uri: str | None = None, **train) -> dict:
    cfg = pattern_run_config(data, run_dir, **{"steps": 8, "eval_interval": 4, **train})
    cfg["tracking"] = {"enabled": True, "experiment": "walsh-test", "uri": uri}
    cfg["cluster"]["workers"] = 1
    return cfg


def train(config: Path, tmp: Path, *overrides: str, timeout: float = 180, **env: str) -> str:
    log = tmp / f"log-{time.monotonic_ns()}.txt"
    proc = start_walsh(["train", config, *overrides, "--launcher", "none"], log,
                       walsh_env(**env))
    try:
        return finish_walsh(proc, log, timeout)
    finally:
        kill_session(proc.pid)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def all_runs(c) -> list:
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_run_has_params_metrics_tags_and_a_resumed_job_continues_it(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", tracked_config(data_dir, run_dir))
    sampling = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # default 10 s: longer than a run
    first = train(config, tmp_path, "train.steps=8", **sampling)
    assert UNAVAILABLE not in first
    run_id = (run_dir / RUN_ID_FILE).read_text()
    c = client(default_uri(run_dir))  # the default store: sqlite:///<run_dir>/mlflow.db
    (run,) = all_runs(c)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "walsh-test"

    # params: the flattened resolved config and the parameter breakdown
    p = run.data.params
    assert p["optim.lr"] == "0.02" and p["train.steps"] == "8" and p["train.zero_stage"] == "2"
    assert p["model.preset"] == "tiny" and p["model.overrides.n_embd"] == "64"
    counts = WalshLM(from_dict(tracked_config(data_dir, run_dir)).walsh_config()).num_params()
    assert p["params.total"] == str(counts["total"])
    assert {f"params.{k}" for k in counts} <= p.keys()
    # tags: git, package versions, hardware
    t = run.data.tags
    assert re.fullmatch("[0-9a-f]{40}", t["git.commit"]) and t["git.dirty"] in ("true", "false")
    assert t["version.torch"] == torch.__version__
    assert {"version.deepspeed", "version.ray", "version.mlflow", "hardware.cpu_count"} <= t.keys()
    # metrics, with their steps; system metrics from MLflow's sampler
    m = run.data.metrics
    assert {"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "val_loss"} <= m.keys()
    assert any(k.startswith("system/") for k in m), sorted(m)
    loss = [(x.step, x.value) for x in c.get_metric_history(run_id, "loss")]
    assert [s for s, _ in sorted(loss)] == [2, 4, 6, 8]
    jsonl = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert dict(loss) == pytest.approx(jsonl)
    assert sorted(x.step for x in c.get_metric_history(run_id, "val_loss")) == [4, 8]
    # artifact: the resolved config, kept beside the database (not in the current directory)
    assert [f.path for f in c.list_artifacts(run_id)] == ["config.yaml"]
    assert c.get_experiment(run.info.experiment_id).artifact_location == artifact_root(
        default_uri(run_dir))
    assert (run_dir / "config.yaml").read_text() == Path(
        c.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()

    # the same job resumed with more steps appends to the same run
    second = train(config, tmp_path, "train.steps=12")
    assert f"continuing run {run_id}" in second and "resumed from step_00000008" in second
    (run,) = all_runs(c)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert sorted(x.step for x in c.get_metric_history(run_id, "loss")) == [2, 4, 6, 8, 10, 12]
    assert run.data.params["train.steps"] == "8"  # params are the run's first config


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_dead_server_does_not_stop_training(data_dir, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", tracked_config(data_dir, run_dir, dead))
    out = train(config, tmp_path)
    assert out.count(UNAVAILABLE) == 1, out[-3000:]
    assert f"{UNAVAILABLE} at {dead}" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [2, 4, 6, 8]
    assert not (run_dir / RUN_ID_FILE).exists()


def start_mlflow_server(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """A lean `mlflow server` on a free loopback port with a sqlite backend in ``tmp``, ready
    (``/health`` answers). Returns (process, its URI, the backend's URI)."""
    port, backend = free_port(), f"sqlite:///{tmp / 'server.db'}"
    env = walsh_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(tmp / "server.txt", "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", backend,
             "--artifacts-destination", str(tmp / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, (tmp / "server.txt").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri, backend
        except OSError:
            time.sleep(0.25)
    kill_session(proc.pid)
    raise AssertionError("mlflow server not ready:\n" + (tmp / "server.txt").read_text()[-3000:])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_real_server_receives_the_run_and_its_death_does_not_stop_training(data_dir,
                                                                              tmp_path):
    steps = 40
    server, uri, backend = start_mlflow_server(tmp_path)
    try:
        run_dir = tmp_path / "run"
        config = write_yaml(tmp_path / "run.yaml",
                            tracked_config(data_dir, run_dir, uri, steps=steps, eval_interval=8))
        log = tmp_path / "train.txt"
        proc = start_walsh(["train", config, "--launcher", "none"], log)
        try:
            # wait until the server has the run's first losses, then kill it mid-run
            c, id_file, received = client(uri), run_dir / RUN_ID_FILE, []
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and not received:
                if id_file.is_file():
                    received = c.get_metric_history(id_file.read_text(), "loss")
                time.sleep(0.1)
            assert received, "the server never received a loss:\n" + log.read_text()[-3000:]
            kill_session(server.pid)
            assert proc.poll() is None, "the run ended before the server was killed"
            out = finish_walsh(proc, log, timeout=240)
        finally:
            kill_session(proc.pid)
    finally:
        kill_session(server.pid)

    # training went on to the end, and said once that tracking stopped
    assert out.count(UNAVAILABLE) == 1, out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == steps
    # what the server stored before it died: the run with its params, tags, artifact, metrics
    c = client(backend)
    (run,) = all_runs(c)
    assert run.info.run_id == (run_dir / RUN_ID_FILE).read_text()
    assert run.data.params["optim.lr"] == "0.02" and "params.total" in run.data.params
    assert run.data.tags["version.torch"] == torch.__version__
    loss_steps = sorted(x.step for x in c.get_metric_history(run.info.run_id, "loss"))
    assert loss_steps and loss_steps[0] == 2 and loss_steps[-1] < steps  # cut off mid-run
    assert list((tmp_path / "artifacts").rglob("config.yaml"))  # uploaded through the server


def test_a_run_id_unknown_to_the_store_starts_a_new_run(data_dir, tmp_path, capsys,
                                                        monkeypatch):
    """A job resumed against another tracking URI than it started with (its stored run id is
    not there) gets a new run instead of losing tracking."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # the tracker sets the last two if unset
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef")
    cfg = from_dict(tracked_config(data_dir, run_dir))
    tracker = Tracker(cfg, run_dir, {"total": 123})
    try:
        assert tracker.active, capsys.readouterr().out
        tracker.log({"loss": 1.5, "note": "text is skipped", "flag": True}, 1)
    finally:
        tracker.close()
    assert "is not at" in capsys.readouterr().out
    c = client(default_uri(run_dir))
    (run,) = all_runs(c)
    assert run.info.run_id == tracker.run_id == (run_dir / RUN_ID_FILE).read_text()
    assert run.data.params["params.total"] == "123"
    assert {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")} == {
        "loss": 1.5}
