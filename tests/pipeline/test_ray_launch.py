"""`walsh train` through Ray Train (the default launcher), for real: an embedded Ray on
127.0.0.1, 2 `RayTrainWorker`s running DeepSpeed ZeRO-2 on gloo, MLflow's sqlite store; a
worker SIGKILLed mid-run and restarted by Ray from the latest checkpoint, bit-identically; and a
cluster started by `ray start --head`, joined with `--address`.

Every run is a `python -m pipeline.cli train` subprocess in a session of its own, so that the
test can find (and in the end kill) exactly the processes it started, Ray's included. Results
are read from files (metrics.jsonl, checkpoints, data traces, the MLflow database), not from
Ray's voluminous output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _helpers import (
    finish_walsh,
    kill_session,
    pattern_run_config,
    read_metrics,
    read_trace,
    session_procs,
    start_walsh,
    wait_for_checkpoint,
    walsh_env,
    write_yaml,
)

from data_prep.local_ray import LOCAL_RAY_ENV, free_ports
from pipeline.checkpoint import export_fp32
from pipeline.config_load import from_dict
from walsh.models import WalshLM

pytestmark = pytest.mark.multiprocess
STEPS = 16  # checkpoints every 4: a kill after the first one lands mid-run
# Ray folds repeated log lines of different workers into one; the report lines are counted
ENV = walsh_env(RAY_DEDUP_LOGS="0")


def ray_config(data: Path, run_dir: Path, **train) -> dict:
    cfg = pattern_run_config(data, run_dir, **{
        "steps": STEPS, "ckpt_interval": 4, "eval_interval": 8, **train})
    cfg["tracking"] = {"enabled": True}  # the default store: sqlite:///<run_dir>/mlflow.db
    cfg["cluster"].update(workers=2, cpus_per_worker=1, max_failures=2)
    return cfg


def mlflow_runs(run_dir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def loss_steps(run_dir: Path, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted run through Ray with a data trace: checked by the first test, the
    reference of the fault-tolerance test. Returns (run dir, output). Its paths are relative
    to the driver's directory, as in configs/train/ (Ray Train moves workers elsewhere)."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = ray_config(Path(os.path.relpath(data_dir, tmp)), Path("run"))
    write_yaml(tmp / "run.yaml", cfg)
    proc = start_walsh(["train", "run.yaml", "--trace-data"], tmp / "log.txt", ENV, cwd=tmp)
    try:
        out = finish_walsh(proc, tmp / "log.txt", timeout=240)
    finally:
        kill_session(proc.pid)
    return tmp / "run", out


@pytest.mark.timeout(300)
def test_ray_train_with_two_workers_trains_checkpoints_and_reports(straight, data_dir, tmp_path):
    run_dir, out = straight
    # trains: rank 0 alone writes metrics.jsonl, one line per log step, and the loss falls
    rows = read_metrics(run_dir)
    losses = [(m["step"], m["loss"]) for m in rows if "loss" in m]
    assert [s for s, _ in losses] == list(range(2, STEPS + 1, 2))
    assert losses[-1][1] < 0.5 * losses[0][1], losses
    assert [m["step"] for m in rows if "val_loss" in m] == [8, 16]
    assert all(m["tokens_per_s"] > 0 for m in rows if "loss" in m)
    # on 2 workers of an embedded Ray that stayed on loopback
    assert "Started a local Ray instance" in out
    assert out.count("ip=127.0.0.1, pid=") == 2, out[-3000:]
    # checkpoints: latest is the last step, keep_last = 2; the fp32 export loads into WalshLM
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000012", f"step_{STEPS:08d}"]
    state = torch.load(export_fp32(run_dir, tmp_path / "fp32.pt"), weights_only=True)
    WalshLM(from_dict(ray_config(data_dir, run_dir)).walsh_config()).load_state_dict(state)
    # reports: every rank called ray.train.report at every log step (Ray Train logs each one),
    # and rank 0's summary came back to the driver
    for rank in (0, 1):
        assert out.count(f"'step': {STEPS}}}, validation=False) from rank {rank}") == 1, rank
        reports = [line for line in out.splitlines()
                   if "Reporting training result" in line and f"from rank {rank}" in line]
        assert len(reports) == STEPS // 2, rank
    assert f'[walsh] Ray Train result: {{"step": {STEPS}, "loss": {losses[-1][1]}' in out
    # tracked in MLflow from inside a Ray worker: one run, artifacts beside the database (not
    # in the worker's scratch directory)
    (run,) = mlflow_runs(run_dir)
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text()
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.workers"] == "2"
    assert run.data.params["train.run_dir"] == str(run_dir)
    assert loss_steps(run_dir, run.info.run_id) == list(range(2, STEPS + 1, 2))
    assert (run_dir / "mlartifacts").is_dir()
    assert list((run_dir / "mlartifacts").rglob("config.yaml"))


def train_workers(sid: int) -> list:
    """The RayTrainWorker actor processes of the Ray that session ``sid`` started."""
    procs = []
    for p in session_procs(sid):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                procs.append(p)
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return procs


@pytest.mark.timeout(540)
def test_sigkilled_worker_is_restarted_and_resumes_bit_identically(straight, data_dir, tmp_path):
    straight_dir, _ = straight
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", ray_config(data_dir, run_dir))
    log = tmp_path / "log.txt"
    proc = start_walsh(["train", config, "--trace-data"], log, ENV)
    try:
        wait_for_checkpoint(run_dir, "step_00000004", proc)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
        workers = {p.pid: p for p in train_workers(proc.pid)}
        assert len(workers) == 2, workers
        # rank 0: the one that also writes metrics.jsonl and holds the MLflow run
        rank0 = re.search(r"pid=(\d+)\) world_rank=0,", log.read_text())
        victim = workers[int(rank0.group(1))]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        at_kill = (run_dir / "checkpoints" / "latest").read_text()
        assert at_kill in ("step_00000004", "step_00000008"), at_kill  # mid-run
        out = finish_walsh(proc, log, timeout=300)
    finally:
        kill_session(proc.pid)

    # Ray saw the failure, restarted the worker group, and training resumed from a checkpoint
    assert "resumed from step_0000000" in out, out[-4000:]
    assert out.count("Started training worker group of size 2") == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    # ... into the same state as the uninterrupted run: every tensor bit-identical
    a = torch.load(export_fp32(straight_dir, tmp_path / "a.pt"), weights_only=True)
    b = torch.load(export_fp32(run_dir, tmp_path / "b.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_trace(straight_dir) == read_trace(run_dir)  # the same batches, in order
    # the restarted rank 0 continued the job's MLflow run (steps redone after the resume are
    # logged again)
    (run,) = mlflow_runs(run_dir)
    assert run.info.status == "FINISHED"
    assert loss_steps(run_dir, run.info.run_id)[-1] == STEPS
    assert "[walsh] MLflow: continuing run " + run.info.run_id in out


@pytest.mark.timeout(300)
def test_joins_an_existing_cluster_with_address(data_dir, tmp_path):
    # a private temp dir: `ray start` records "the current cluster" there, not in /tmp/ray where
    # any other ray.init() on this machine would pick it up (short: Ray's socket paths live in it)
    ray_tmp = tempfile.mkdtemp(prefix="wr", dir="/tmp")
    port, dashboard_port = free_ports(2)
    env = walsh_env(**LOCAL_RAY_ENV)
    head_log = tmp_path / "ray-start.txt"
    with open(head_log, "w") as f:  # not a pipe: the daemons it leaves would hold it open
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
             "--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--disable-usage-stats",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--temp-dir", ray_tmp],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        head.wait(timeout=120)
        assert head.returncode == 0, head_log.read_text()[-3000:]
        run_dir = tmp_path / "run"
        cfg = ray_config(data_dir, run_dir, steps=4, eval_interval=4)
        cfg["tracking"] = {"enabled": False}
        config = write_yaml(tmp_path / "run.yaml", cfg)
        log = tmp_path / "log.txt"
        proc = start_walsh(["train", config, "--address", f"127.0.0.1:{port}"], log, env)
        try:
            out = finish_walsh(proc, log, timeout=200)
        finally:
            kill_session(proc.pid)
        assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{port}" in out
        assert "Started a local Ray instance" not in out
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
        assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [2, 4]
        # the cluster outlives the job that joined it
        assert any("gcs_server" in p.name() for p in session_procs(head.pid))
    finally:
        kill_session(head.pid)  # never `ray stop`: it stops every Ray on the machine
        shutil.rmtree(ray_tmp, ignore_errors=True)
