"""``walsh train --launcher ray``: the training function inside a Ray Train ``TorchTrainer``.

- Cluster: ``--address`` / ``RAY_ADDRESS`` / ``cluster.address`` joins a running cluster;
  otherwise Ray is embedded (``ray.init`` in this process), kept on 127.0.0.1 with token auth off
  (a laptop or CI box), and sized so the workers' CPUs plus Ray Train's own actors fit: on a
  2-core machine 2 workers at 1 CPU each would otherwise wait for a CPU forever.
- Workers: ``cluster.workers`` (1 per GPU when ``cluster.gpus_per_worker`` > 0), gloo on CPU,
  NCCL on GPU; Ray Train creates the process group, the trainer reuses it.
- Fault tolerance: ``FailureConfig(max_failures=cluster.max_failures)``. A failed worker group is
  restarted by Ray and the training function resumes from ``<run_dir>/checkpoints/latest``
  (the run directory is the single source of truth, on storage all nodes share).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.config import RunConfig, load

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _worker(loop_cfg: dict) -> None:
    """Runs in every Ray Train worker: rebuild the config, set the torch env, train."""
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

    cfg = load(loop_cfg["config"], loop_cfg["overrides"])
    train(cfg, report_fn=lambda metrics, step: ray.train.report(metrics),
          trace_data=loop_cfg["trace_data"])


def init_ray(cfg: RunConfig, address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or cfg.cluster.address
    if address:
        ray.init(address=address)
        return
    for key, val in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, val)
    need = math.ceil(cfg.cluster.workers * cfg.cluster.cpus_per_worker) + 1  # + Train's actors
    ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
             _node_ip_address="127.0.0.1")


def run(config_path: str, overrides: list[str], address: str | None = None,
        trace_data: bool = False) -> dict:
    """Validate, start or join Ray, fit; returns the last reported metrics."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = load(config_path, overrides)
    init_ray(cfg, address)
    gpus = cfg.cluster.gpus_per_worker
    import torch

    use_gpu = gpus > 0 and torch.cuda.is_available()
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus
    run_dir = Path(cfg.train.run_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": str(Path(config_path).resolve()), "overrides": overrides,
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
    return dict(result.metrics or {})
