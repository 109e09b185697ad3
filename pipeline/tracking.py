"""MLflow tracking, rank 0 only: one MLflow run per training job, continued on resume.

- Where: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db``.
- Identity: the run id is stored in ``<run_dir>/mlflow_run_id``; a resumed job (a restart after
  a kill, a Ray retry) reopens that run and appends metrics to it.
- Params: the flattened resolved config and the parameter breakdown (logged once, when the run is
  created: MLflow params are immutable). Tags: git commit and dirty flag, package versions,
  hardware. Artifact: the resolved config. System metrics on (MLflow's own sampler).
- Never fatal: tracking errors are reported once and training goes on without tracking. HTTP
  retries are capped (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 0, timeout 5 s, unless the user set
  them) so a dead server costs seconds, not the minutes of MLflow's default backoff.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from data_prep.manifest import atomic_write_bytes
from pipeline.config import RunConfig

RUN_ID_FILE = "mlflow_run_id"


def configured_uri(cfg: RunConfig) -> str | None:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else None (the run's own sqlite file);
    the one place the precedence lives (the Tracker and the Ray launcher both ask here)."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are the cwd's), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlartifacts`` beside the
    database (as ``mlflow server`` does). MLflow's own default is ``./mlruns`` of whatever the
    current directory is, which is a Ray Train worker's scratch directory under Ray. None for
    a server (it decides) or any other store."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def _git() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
        return {"git.commit": sha, "git.dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def run_tags() -> dict[str, str]:
    tags = _git()
    for pkg in ("walsh", "torch", "deepspeed", "ray", "mlflow", "webdataset", "tiktoken"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    tags["hardware.cpu_count"] = str(os.cpu_count())
    tags["hardware.platform"] = platform.platform()
    if torch.cuda.is_available():
        tags["hardware.gpu"] = torch.cuda.get_device_name(0)
        tags["hardware.gpu_count"] = str(torch.cuda.device_count())
    return tags


class Tracker:
    """Rank 0's MLflow client for one job. ``log`` never raises."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, param_counts: dict[str, int]) -> None:
        self.active, self.run_dir = cfg.tracking.enabled, Path(run_dir)
        self.uri = configured_uri(cfg) or default_uri(run_dir)
        self.run_id: str | None = None
        if not self.active:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        try:
            self._start(cfg, param_counts)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._disable(err)

    def _start(self, cfg: RunConfig, param_counts: dict[str, int]) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self._experiment(cfg.tracking.experiment)
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():  # a resumed job continues its run
            run_id = id_file.read_text().strip()
            if run_id and self._exists(run_id):
                self.run_id = run_id
                mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
                print(f"[walsh] MLflow: continuing run {self.run_id} at {self.uri}", flush=True)
                return
            print(f"[walsh] MLflow: run {run_id} (from {id_file}) is not at {self.uri}; "
                  "starting a new run", flush=True)
        run = mlflow.start_run(run_name=cfg.tracking.run_name or cfg.name,
                               log_system_metrics=True)
        self.run_id = run.info.run_id
        atomic_write_bytes(id_file, self.run_id.encode())
        params = {k: str(v)[:6000] for k, v in cfg.flat().items()}
        params.update({f"params.{k}": v for k, v in param_counts.items()})
        mlflow.log_params(params)
        mlflow.set_tags(run_tags())
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        print(f"[walsh] MLflow: run {self.run_id} at {self.uri}", flush=True)

    def _experiment(self, name: str) -> None:
        """Select experiment ``name``, creating it with ``artifact_root`` if it is new."""
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient(self.uri)
        if client.get_experiment_by_name(name) is None:
            try:
                client.create_experiment(name, artifact_location=artifact_root(self.uri))
            except MlflowException as err:  # created meanwhile by another job: fine
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        mlflow.set_experiment(name)

    def _exists(self, run_id: str) -> bool:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            mlflow.MlflowClient(self.uri).get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _disable(self, err: Exception) -> None:
        if self.active:
            print(f"[walsh] MLflow tracking unavailable at {self.uri} ({type(err).__name__}: "
                  f"{str(err)[:200]}); training continues without tracking", flush=True)
        self.active = False

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, int | float) and not isinstance(v, bool)}
        try:
            import mlflow

            mlflow.log_metrics(values, step=step)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def close(self) -> None:
        if not self.active:
            return
        try:
            import mlflow

            mlflow.end_run()
        except Exception as err:  # noqa: BLE001
            self._disable(err)
