"""Checkpoints: DeepSpeed shards + per-rank loader and RNG state + step, with an atomic ``latest``.

Layout under ``<run_dir>/checkpoints/``::

    step_00000200/            DeepSpeed's files (model + optimizer shards of every rank)
        rank00000.pt ...      this rank's loader state and RNG states
        config.yaml           the resolved run config
    latest                    text: the tag of the newest *complete* checkpoint

Every rank saves its part, all ranks meet at a barrier, and only then rank 0 rewrites ``latest``
(temp file + rename) and prunes checkpoints beyond ``keep_last``. A run killed mid-save leaves
``latest`` on the previous complete checkpoint, so resuming never reads a partial one.

Resuming on another world size: ZeRO shards are per rank, so a checkpoint written by W ranks is
first converted by rank 0 with DeepSpeed's ``ds_to_universal`` into ``<tag>_universal/`` (temp
name, then rename) and loaded with ``checkpoint.load_universal``. The loader then restarts at the
epoch boundary its slowest saved stream had reached (``TokenLoader.load_state_dict`` warns), and
every rank draws fresh RNG states: the loss curve continues, the exact batch order does not.

``export_fp32`` consolidates a ZeRO checkpoint into one fp32 state dict (DeepSpeed's
zero_to_fp32) that loads into ``WalshLM``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.manifest import atomic_write_bytes

LATEST = "latest"
META = "meta.json"
UNIVERSAL = "_universal"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch_atomic(obj, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save(engine, run_dir: str | Path, step: int, rank_state: dict, config_yaml: str,
         keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root, tag = ckpt_root(run_dir), tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    _save_torch_atomic({"step": step, **rank_state}, root / tag / f"rank{rank:05d}.pt")
    if rank == 0:
        atomic_write_bytes(root / tag / "config.yaml", config_yaml.encode())
        meta = {"step": step, "world_size": dist.get_world_size()}
        atomic_write_bytes(root / tag / META, json.dumps(meta).encode())
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        atomic_write_bytes(root / LATEST, tag.encode())
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(UNIVERSAL))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(root / f"{old.name}{UNIVERSAL}", ignore_errors=True)


def latest_tag(run_dir: str | Path) -> str | None:
    path = ckpt_root(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_root(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} points at {tag!r}, which does not exist")
    return tag


def saved_world_size(run_dir: str | Path) -> int | None:
    """World size that wrote the latest checkpoint (None: no checkpoint, or one without meta)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    meta = ckpt_root(run_dir) / tag / META
    return json.loads(meta.read_text())["world_size"] if meta.is_file() else None


def needs_universal(run_dir: str | Path, world_size: int) -> bool:
    saved = saved_world_size(run_dir)
    return saved is not None and saved != world_size


def _convert_universal(root: Path, tag: str) -> str:
    """Rank 0 converts ``tag`` to DeepSpeed's universal format once; all ranks wait."""
    out = root / f"{tag}{UNIVERSAL}"
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = root / f".{tag}{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(root / tag), "--output_folder", str(tmp), "--inject_missing_state"],
            check=True, stdout=subprocess.DEVNULL,
        )
        tmp.rename(out)
    dist.barrier()
    return out.name


def load_latest(engine, run_dir: str | Path) -> dict | None:
    """Load the newest complete checkpoint into ``engine``; returns this rank's state or None.

    Written by another world size: load its universal conversion (the engine must have been
    built with ``checkpoint.load_universal``), return rank 0's loader state without RNG."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = ckpt_root(run_dir)
    rank = dist.get_rank()
    if needs_universal(run_dir, dist.get_world_size()):
        engine.load_checkpoint(str(root), tag=_convert_universal(root, tag),
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        _steps_to_param_device(engine.optimizer)
        state = torch.load(root / tag / "rank00000.pt", weights_only=False)
        state.pop("rng", None)
        return state
    engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    path = root / tag / f"rank{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no state for rank {rank} (and no {META} to tell "
                                "which world size wrote the checkpoint)")
    return torch.load(path, weights_only=False)


def _steps_to_param_device(optimizer) -> None:
    """The universal loader restores AdamW's ``step`` counters as CPU tensors; torch's fused
    (and capturable) AdamW wants them on the parameters' device ("state_steps is on cpu" on
    the first step after a GPU resume). ``optimizer`` is DeepSpeed's ZeRO wrapper (the torch
    optimizer is its ``.optimizer``) or the torch optimizer itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue  # the foreach/for-loop paths keep step on the CPU on purpose
        for p in group["params"]:
            state = inner.state.get(p, {})
            if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)


def export_fp32(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Consolidate checkpoint ``tag`` (default: latest) into ``out`` (a torch state dict of
    fp32 tensors keyed like ``WalshLM.state_dict()``), written atomically."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_root(run_dir)}: no checkpoint to export")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root(run_dir)), tag=tag)
    state = {k: v.float().contiguous() for k, v in state.items()}
    out = Path(out)
    _save_torch_atomic(state, out)
    return out
