"""``walsh train CONFIG [key=value ...]``: validate, then launch the training function.

Launchers (``--launcher``):
- ``ray`` (default): a Ray Train ``TorchTrainer`` with ``cluster.workers`` workers on an
  embedded local Ray, or on the cluster named by ``--address`` / ``RAY_ADDRESS`` /
  ``cluster.address`` (``pipeline.ray_launch``).
- ``torchrun``: ``torch.distributed.run --standalone``
  with ``cluster.workers`` processes on this machine, each running ``pipeline.train_entry``;
  for several nodes run ``torchrun ... -m pipeline.train_entry`` yourself (see its docstring).
- ``none``: the training function in this process (a world of one; debugging).

Every config error (unknown key, wrong type, model dims, manifest vocab, batch divisibility)
is raised here, before any process or engine starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from data_prep.manifest import Manifest
from pipeline.config import RunConfig, check_against_manifest, resolve_batch
from pipeline.config_load import load

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM (cluster.nvlink_multicast)
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_env(cfg: RunConfig) -> dict[str, str]:
    """What every training process's environment must hold before its first collective: the
    multicast-off variables unless ``cluster.nvlink_multicast`` is true (then nothing is set)."""
    return {} if cfg.cluster.nvlink_multicast else dict(MULTICAST_OFF_ENV)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/train/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.steps=100 optim.lr=1e-3")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameters, FLOPs, batch and memory estimate")
    p.add_argument("--launcher", choices=["ray", "torchrun", "none"], default="ray")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, cluster.address, else local)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (default: cluster.workers)")
    p.add_argument("--trace-data", action="store_true",
                   help="record a sha1 of every consumed micro batch under RUN_DIR/data_trace/")


def main(args: argparse.Namespace) -> int:
    cfg = load(args.config, args.overrides)
    nproc = args.nproc or cfg.cluster.workers
    if args.launcher == "none":
        nproc = 1
    if args.dry_run:
        from pipeline.dry_run import describe

        # the device the run would use: CUDA only when the config asks for GPUs
        device = "cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu"
        print(describe(cfg, world_size=nproc, device=device))
        return 0
    resolve_batch(cfg, nproc)
    check_against_manifest(cfg, Manifest.load(cfg.data.path), nproc)
    extra = ["--trace-data"] if args.trace_data else []
    if args.launcher == "none":
        from pipeline.trainer import train

        train(cfg, trace_data=args.trace_data)
        return 0
    if args.launcher == "ray":
        from pipeline.ray_launch import run

        run(args.config, args.overrides, args.address, args.trace_data)
        print(f"[walsh] finished; metrics in {cfg.train.run_dir}/metrics.jsonl", flush=True)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "pipeline.train_entry", args.config,
           *args.overrides, *extra]
    print("[walsh] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env={**os.environ, **multicast_env(cfg)})
    if rc:
        raise SystemExit(rc)
    return 0
