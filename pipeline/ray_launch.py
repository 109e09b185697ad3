"""``walsh train --launcher ray``: the training function inside a Ray Train ``TorchTrainer``.

- Cluster: ``--address`` / ``RAY_ADDRESS`` / ``cluster.address`` joins a running cluster;
  otherwise Ray is embedded (``ray.init(address="local")`` in this process: a `ray start`
  cluster elsewhere on the machine is never joined silently), kept on 127.0.0.1 with token auth
  off (a laptop or CI box), and sized so the workers' CPUs plus Ray Train's own actors fit: on a
  2-core machine 2 workers at 1 CPU each would otherwise wait for a CPU forever.
- Loopback: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is *imported*, so the local
  environment is set before the first ``import ray``; otherwise ``127.0.0.1`` is silently
  replaced by the host's routable address. A loopback ``--address`` gets the same setting (the
  driver must see itself on the head's 127.0.0.1 node).
- The embedded cluster's address is given to every process of the job as ``RAY_ADDRESS``, with
  the dashboard (its state API) on a free loopback port: Ray Train's placement-group cleaner
  looks its controller up through the state API of "the" local cluster, which without these is
  whatever other Ray instance the machine runs (a crash in its thread at best; at worst an
  "actor not found" there, and it removes this run's placement group, killing the workers);
  without a dashboard it warns every second for the whole run. A loopback ``--address`` (a
  cluster on this one machine) is pinned the same way; a real cluster's head runs one Ray.
- Workers: ``cluster.workers`` (1 per GPU when ``cluster.gpus_per_worker`` > 0), gloo on CPU,
  NCCL on GPU; Ray Train creates the process group, the trainer reuses it. Workers get the
  *resolved* config from the driver, with ``data.path`` / ``train.run_dir`` made absolute (Ray
  Train moves each worker into a directory of its own, where relative paths mean nothing) and
  the tracking URI fixed from the driver's ``MLFLOW_TRACKING_URI`` (a remote cluster's workers
  do not see the driver's environment), a relative ``sqlite:///`` path made absolute.
- Fault tolerance: ``FailureConfig(max_failures=cluster.max_failures)``. A failed worker group is
  restarted by Ray and the training function resumes from ``<run_dir>/checkpoints/latest``
  (the run directory is the single source of truth, on storage all nodes share).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from data_prep.local_ray import free_ports, use_local_ray_env
from pipeline.config import RunConfig
from pipeline.config_load import from_dict, load
from pipeline.tracking import configured_uri, sqlite_path

# Ray Train tees every print() of a worker into its logger as well: each line twice on the
# console. Propagated to the workers by Ray Train itself.
QUIET_RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _worker(loop_cfg: dict) -> dict:
    """Runs in every Ray Train worker: rebuild the config, set the torch env, train. Rank 0's
    return value (the trainer's summary) comes back to the driver as ``Result.return_value``."""
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
    )
    # the process group already exists (Ray made it); these only satisfy DeepSpeed's env check
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from pipeline.trainer import train

    cfg = from_dict(loop_cfg["config"], loop_cfg["source"])
    return train(cfg, report_fn=lambda metrics, step: ray.train.report(metrics),
                 trace_data=loop_cfg["trace_data"])


def resolve_address(cfg: RunConfig, address: str | None) -> str | None:
    """The cluster to join (``--address``, ``RAY_ADDRESS``, ``cluster.address``), or None."""
    return address or os.environ.get("RAY_ADDRESS") or cfg.cluster.address or None


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK


def prepare_env(address: str | None) -> None:
    """Environment Ray must see before it is imported (see the module docstring)."""
    for key, val in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, val)
    if address is None:
        use_local_ray_env()
    elif _is_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cfg: RunConfig, address: str | None) -> None:
    """Join ``address``, or start the embedded local instance. Call ``prepare_env`` first.
    A Ray this process already runs (the caller's own ``ray.init``) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    if address:
        pin = "://" not in address and _is_loopback(address)  # a one-machine cluster
        ray.init(address=address,
                 runtime_env={"env_vars": {"RAY_ADDRESS": address}} if pin else None)
        return
    need = math.ceil(cfg.cluster.workers * cfg.cluster.cpus_per_worker) + 1  # + Train's actors
    gcs_port, dashboard_port = free_ports(2)  # outside the ephemeral range: see free_ports
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by the head node only
    try:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                 _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}})
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before


def worker_config(cfg: RunConfig) -> RunConfig:
    """The config the workers run: absolute paths, the driver's tracking URI made explicit."""
    update_train = {"run_dir": str(Path(cfg.train.run_dir).resolve())}
    update_data = {"path": str(Path(cfg.data.path).resolve())}
    tracking = cfg.tracking
    uri = configured_uri(cfg)
    db = sqlite_path(uri) if uri else None
    if db is not None and not db.is_absolute():  # relative to the driver's cwd, not a worker's
        uri = f"sqlite:///{db.resolve()}"
    if uri != tracking.uri:
        tracking = tracking.model_copy(update={"uri": uri})
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update=update_train),
        "data": cfg.data.model_copy(update=update_data),
        "tracking": tracking,
    })


def run(config_path: str, overrides: list[str], address: str | None = None,
        trace_data: bool = False) -> dict:
    """Validate, start or join Ray, fit; returns rank 0's summary (``trainer.train``'s: step,
    loss, val_loss, run_dir, ...). Raises ``ray.train.TrainingFailedError`` when the run fails
    more than ``cluster.max_failures`` times."""
    cfg = load(config_path, overrides)
    address = resolve_address(cfg, address)
    prepare_env(address)  # before the first `import ray`

    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg, address)
    gpus = cfg.cluster.gpus_per_worker
    import torch

    use_gpu = gpus > 0 and torch.cuda.is_available()
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus
    wcfg = worker_config(cfg)
    run_dir = Path(wcfg.train.run_dir)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": wcfg.model_dump(mode="json"),
                           "source": f"{config_path} (resolved by the driver)",
                           "trace_data": trace_data},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        ),
    )
    result = trainer.fit()
    summary = dict(getattr(result, "return_value", None) or result.metrics or {})
    print(f"[walsh] Ray Train result: {json.dumps(summary, default=str)}", flush=True)
    return summary
