"""The training function: one process of a data-parallel DeepSpeed ZeRO run.

``train(cfg)`` runs inside whatever launched it (torchrun, the deepspeed launcher, a Ray Train
worker, or a plain single process, for which it sets up a world of one). Every rank:

1. validates the config against the manifest (before any engine exists),
2. builds the single-device ``WalshLM`` with the same seed on every rank, applies the
   parallelism (``pipeline.parallelize``) and ``deepspeed.initialize`` (ZeRO 0-3),
3. resumes from ``<run_dir>/checkpoints/latest`` if present (weights, optimizer, loader, RNG),
4. loops over micro steps: forward (bf16 autocast inside the engine), backward,
   ``engine.step()`` (DeepSpeed accumulates; ZeRO 1-3 clip inside DeepSpeed, ZeRO 0 clips
   here with torch's foreach ``clip_grad_norm_``; the lr and weight decay of the schedule are
   set just before each optimizer step; the NaN/inf guard, ``pipeline.guard``, skips a step
   whose loss or gradients are not finite, without a host sync per step),
5. logs, evaluates, checkpoints every k steps and at the end.

Host overhead (measured on one H100, docs/benchmarks.md): a 125M step is ~45 ms of GPU work and
the host must keep up, so nothing in the loop may wait for the GPU: DeepSpeed's throughput
timer (a device synchronize at every forward and step) is switched off, and the NaN guard keeps
its flag on the device. DeepSpeed's stage-0 clipping runs one norm kernel per parameter and its
world-of-one all-reduce flattens and copies every gradient, together 10-15% of a walsh-h step;
so at stage 0 the trainer clips with one foreach norm and, in a world of one, skips the
all-reduce. With loader workers (``data.num_workers``), batches arrive pinned.

Precision: ``bf16`` keeps fp32 master weights in the engine and runs the forward under
``torch.autocast(bfloat16)`` (the ternary quantizers see fp32 latents, as MODEL_SPEC asks);
``auto`` means bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.local_ray import free_port
from data_prep.manifest import Manifest
from pipeline import checkpoint
from pipeline.config import (
    RunConfig,
    check_against_manifest,
    resolve_batch,
    resolved_precision,
    total_steps,
)
from pipeline.guard import StepGuard
from pipeline.launch import multicast_env
from pipeline.loader import TokenLoader
from pipeline.metrics import Throughput, device_peak_tflops, memory_stats
from pipeline.optim import apply_schedule, build_optimizer
from pipeline.parallelize import parallelize
from pipeline.profiling import StepProfiler
from pipeline.tracking import Tracker
from walsh.models import WalshLM

log = logging.getLogger("walsh.train")

MetricsFn = Callable[[dict, int], None]


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """Join (or create, for a lone process) the process group; returns rank, world, device.
    Every launcher passes through here before the first collective (NCCL creates its
    communicators lazily), so the multicast setting is applied here for all of them."""
    import deepspeed

    os.environ.update(multicast_env(cfg))

    if "RANK" not in os.environ:  # a plain single process: a world of one on loopback
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    use_cuda = torch.cuda.is_available() and cfg.cluster.gpus_per_worker > 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def deepspeed_config(cfg: RunConfig, micro: int, accum: int, global_batch: int,
                     dtype: torch.dtype | None) -> dict:
    """DeepSpeed's config. Mixed precision is DeepSpeed's ``torch_autocast`` (fp32 master
    weights, bf16 compute): an autocast opened around the engine is switched *off* inside it
    (that silently ran the first GPU trainer runs in fp32, 8x slower). Gradients are reduced
    in fp32 (no module is listed as lower-precision safe)."""
    return {
        "torch_autocast": {"enabled": dtype is not None, "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # stage 0: clipped by the trainer (one foreach norm, not DeepSpeed's per-parameter loop)
        "gradient_clipping": cfg.train.grad_clip if cfg.train.zero_stage > 0 else 0.0,
        "zero_optimization": {**cfg.train.zero_options, "stage": cfg.train.zero_stage},
        "bf16": {"enabled": False},  # fp32 master params; bf16 compute comes from torch_autocast
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer calls cuda.synchronize() at every forward and every
        # step(): it drained the GPU queue twice per micro step (the trainer meters tokens/s
        # itself, pipeline.metrics.Throughput)
        "timers": {"throughput": {"enabled": False}},
    }


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if resolved_precision(cfg, device.type) == "bf16" else None


def _all_mean(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def _finite_mean(losses: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the finite losses (those of skipped steps left out); NaN if there are none."""
    x = torch.stack(losses).float()
    return torch.where(torch.isfinite(x), x, torch.nan).nanmean()


def evaluate(engine, cfg: RunConfig, manifest: Manifest, rank: int, world: int, micro: int,
             device: torch.device) -> float:
    """Mean loss over ``eval_batches`` fixed validation batches per rank (same every time).

    A small validation split may hold fewer chunks than there are ranks: then ranks share
    streams (rank r reads stream r mod chunks), which only repeats work, never hangs."""
    n_chunks = sum(s.samples for s in manifest.split(cfg.data.val_split))
    eval_world = min(world, n_chunks)
    loader = TokenLoader(manifest, cfg.data.val_split, cfg.data.seq_len, micro,
                         rank % eval_world, eval_world, 0, cfg.train.seed, shuffle=False,
                         interleave=False)
    engine.eval()
    total = torch.zeros((), device=device)
    # Under CUDA graphs (compile_mode reduce-overhead / max-autotune) with the blocks compiled
    # apart (compile_scope blocks) the blocks share one compiled graph, and without a backward
    # pass between calls torch's graph trees start a new generation at each block, freeing the
    # previous block's output before the next reads it (measured on an H200: "accessing
    # tensor output of CUDAGraphs that has been overwritten"). Evaluation is a few batches: it
    # runs eager instead, under either scope (one rule; no eval-only graph to record).
    eager = torch.compiler.set_stance("force_eager") if cfg.train.cuda_graphs \
        else contextlib.nullcontext()
    with torch.no_grad(), eager:
        for _ in range(cfg.train.eval_batches):
            batch = next(loader).to(device)
            total += engine(batch[:, :-1], batch[:, 1:]).float()
    engine.train()
    return _all_mean(total / cfg.train.eval_batches)


class _Trace:
    """Optional record of every consumed micro batch: '<micro index> <sha1>' per line."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.file = None
        if enabled:
            (run_dir / "data_trace").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "data_trace" / f"rank{rank:05d}.txt", "a")  # noqa: SIM115

    def add(self, index: int, batch: torch.Tensor) -> None:
        if self.file:
            digest = hashlib.sha1(batch.numpy().tobytes()).hexdigest()
            self.file.write(f"{index} {digest}\n")
            self.file.flush()


def train(cfg: RunConfig, report_fn: MetricsFn | None = None, trace_data: bool = False) -> dict:
    """Train per ``cfg``; returns a summary dict (step, last loss, val loss, run dir).

    ``report_fn(metrics, step)`` is called on every rank at every log step (Ray Train's
    ``report`` wants all workers); MLflow tracking and ``metrics.jsonl`` are rank 0's."""
    import deepspeed

    manifest = Manifest.load(cfg.data.path)
    check_against_manifest(cfg, manifest, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = init_distributed(cfg)
    micro, accum, global_batch = resolve_batch(cfg, world)
    total = total_steps(cfg, world)
    run_dir = Path(cfg.train.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        print(f"[walsh] resolved config (world {world}, device {device}):\n{cfg.to_yaml()}",
              flush=True)

    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model = WalshLM(cfg.walsh_config())
    if rank == 0:
        print(f"[walsh] linear layers: {model.linear_paths()}", flush=True)
    flops = model.flops_per_token(cfg.data.seq_len)
    tracker = Tracker(cfg, run_dir, model.num_params()) if rank == 0 else None
    # on the device first: optimizers (ComponentMuon's per-component views) hold its storage
    model = parallelize(model, cfg, device)
    optimizer = build_optimizer(model, cfg, device)
    ds_config = deepspeed_config(cfg, micro, accum, global_batch, autocast_dtype(cfg, device))
    if checkpoint.needs_universal(run_dir, world):  # saved by another world size
        ds_config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=ds_config)
    own_clip = cfg.train.zero_stage == 0 and cfg.train.grad_clip > 0
    if cfg.train.zero_stage == 0 and world == 1:
        engine.enable_backward_allreduce = False  # nothing to reduce; spares a flatten + copy
    loader = TokenLoader(manifest, cfg.data.train_split, cfg.data.seq_len, micro, rank, world,
                         cfg.data.num_workers, cfg.train.seed, pin_memory=device.type == "cuda")

    step, micro_index = 0, 0
    t_load = time.perf_counter()
    state = checkpoint.load_latest(engine, run_dir)  # converts to universal first if needed
    load_s = time.perf_counter() - t_load
    if state is not None:
        step, micro_index = state["step"], state["micro_index"]
        loader.load_state_dict(state["loader"])
        if "rng" in state:  # absent after a world-size change: fresh draws
            checkpoint.set_rng_state(state["rng"])
        if rank == 0:
            print(f"[walsh] resumed from {checkpoint.latest_tag(run_dir)} at step {step}",
                  flush=True)

    def save() -> None:
        rank_state = {"micro_index": micro_index, "loader": loader.state_dict(),
                      "rng": checkpoint.rng_state(), "guard": guard.state_dict()}
        t0 = time.perf_counter()
        checkpoint.save(engine, run_dir, step, rank_state, cfg.to_yaml(), cfg.train.keep_last)
        if rank == 0:
            emit({"checkpoint_s": time.perf_counter() - t0}, step)

    metrics_file = run_dir / "metrics.jsonl"

    def emit(values: dict, at: int) -> None:
        if rank != 0:
            return
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": at, **values}) + "\n")
        tracker.log(values, at)

    if state is not None:
        emit({"checkpoint_load_s": load_s}, step)
    trace = _Trace(run_dir, rank, trace_data)
    profiler = StepProfiler(run_dir, rank, cfg.train.profile_steps, device)
    meter = Throughput(flops, world, device_peak_tflops(device, cfg.train.peak_tflops))
    tokens_per_step = global_batch * cfg.data.seq_len
    guard = StepGuard(engine, cfg.train.zero_stage, world, cfg.train.max_bad_steps, device,
                      verbose=rank == 0)
    if state is not None and "guard" in state:  # absent in checkpoints before the counters
        guard.load_state_dict(state["guard"])
    # skipped starts at the restored count (0 on a fresh run)
    skipped, losses, step_losses, last, val = guard.reported, [], [], float("nan"), None
    grad_norm: torch.Tensor | None = None  # stage 0: the trainer's own pre-clip norm
    graphs = cfg.train.cuda_graphs
    while step < total:
        batch = next(loader)
        trace.add(micro_index, batch)
        micro_index += 1
        batch = batch.to(device, non_blocking=True)
        loss = engine(batch[:, :-1], batch[:, 1:])  # bf16 autocast inside, per deepspeed_config
        engine.backward(loss)
        # Under CUDA graphs the loss lives in the graph's output pool and the next replay
        # overwrites it (torch raises on a later read): keep a copy (one 4-byte kernel).
        step_losses.append(loss.detach().clone() if graphs else loss.detach())
        boundary = engine.is_gradient_accumulation_boundary()
        lr = apply_schedule(engine.optimizer, cfg, step, total) if boundary else None
        if boundary:
            if own_clip:  # gradients are already reduced by engine.backward
                grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(),
                                                           cfg.train.grad_clip, foreach=True)
            guard.before_step(step_losses, grad_norm)
        engine.step()
        if not boundary:
            continue
        guard.after_step()
        losses += step_losses
        step_losses = []
        step += 1
        meter.add(tokens_per_step)
        profiler.after_step(step)
        log_now = step % cfg.train.log_interval == 0 or step == total
        if log_now or guard.due(step):
            skipped = guard.check(step)
        if log_now:
            last = _all_mean(_finite_mean(losses))
            gn = grad_norm if own_clip else engine.get_global_grad_norm()
            emit({"loss": last, "lr": lr, "grad_norm": float(gn) if gn is not None else None,
                  "tokens_seen": step * tokens_per_step, "skipped_steps": skipped,
                  "epoch": loader.epoch, **meter.read(), **memory_stats(device)}, step)
            if rank == 0:
                print(f"[walsh] step {step}/{total} loss {last:.4f} lr {lr:.3e}", flush=True)
            if report_fn is not None:
                report_fn({"loss": last, "step": step}, step)
            losses = []
        if step % cfg.train.eval_interval == 0 or step == total:
            val = evaluate(engine, cfg, manifest, rank, world, micro, device)
            emit({"val_loss": val}, step)
            meter.read()  # evaluation time stays out of the next tokens/s reading
        if step % cfg.train.ckpt_interval == 0 or step == total:
            save()
            meter.read()
    if tracker is not None:
        tracker.close()
    return {"step": step, "loss": last, "val_loss": val, "run_dir": str(run_dir),
            "skipped_steps": skipped}
