"""``walsh quickstart``: the whole product on a laptop-sized machine, with no network needed.

1. stage ``builtin:python-docs`` (text that ships with Python) with the GPT-2 tokenizer into
   ``DIR/data`` (configs/data/python-docs.yaml),
2. train the ``tiny`` preset with Ray Train workers and DeepSpeed ZeRO-2
   (configs/train/quickstart.yaml; on CPU: gloo, fp32) into ``DIR/run``,
   tracked in MLflow (``sqlite:///DIR/run/mlflow.db``),
3. export the consolidated fp32 weights, load them into ``WalshLM`` and print a sample,
4. say where to look: ``mlflow ui --backend-store-uri ...``.

The configs are read from the repository checkout (the README installs it in editable mode);
``--data-config`` / ``--train-config`` point elsewhere. Reruns reuse staged data and resume
training from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/quickstart", help="where data and run go")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default 200)")
    p.add_argument("--data-config", default=str(REPO / "configs/data/python-docs.yaml"))
    p.add_argument("--train-config", default=str(REPO / "configs/train/quickstart.yaml"))
    p.add_argument("--launcher", choices=["ray", "torchrun"], default="ray")


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def main(args: argparse.Namespace) -> int:
    from data_prep import config as data_config
    from data_prep import stage, tokenizer
    from pipeline import launch
    from pipeline.checkpoint import export_fp32
    from pipeline.config_load import load
    from walsh.generate import generate
    from walsh.models import WalshLM

    root = Path(args.dir).resolve()
    data_dir, run_dir = root / "data", root / "run"
    t0 = time.perf_counter()
    print(f"== 1/4 staging builtin:python-docs into {data_dir}", flush=True)
    manifest = stage.stage(data_config.load(args.data_config, out=str(data_dir)),
                           progress=True, log=print)
    print(f"   {manifest.total_tokens:,} tokens, {len(manifest.shards)} shards "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    overrides = [f"data.path={data_dir}", f"train.run_dir={run_dir}"]
    if args.steps:
        overrides += [f"train.steps={args.steps}",
                      f"train.ckpt_interval={max(1, args.steps // 3)}",
                      f"train.eval_interval={max(1, args.steps // 3)}"]
    cfg = load(args.train_config, overrides)
    print(f"== 2/4 training {cfg.model.preset} for {cfg.train.steps} steps with "
          f"{cfg.cluster.workers} workers ({args.launcher}, ZeRO-{cfg.train.zero_stage})",
          flush=True)
    launch.main(argparse.Namespace(
        config=args.train_config, overrides=overrides, dry_run=False, launcher=args.launcher,
        nproc=None, address=None, trace_data=False,
    ))
    losses = _losses(run_dir)
    first, last = losses[0], losses[-1]
    ln_v = math.log(cfg.walsh_config().vocab_size)
    print(f"   loss {first:.3f} -> {last:.3f} (ln V = {ln_v:.2f}) "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    print("== 3/4 exporting fp32 weights and sampling", flush=True)
    weights = export_fp32(run_dir, run_dir / "model_fp32.pt")
    model = WalshLM(cfg.walsh_config())
    model.load_state_dict(torch.load(weights, weights_only=True))
    enc = tokenizer.load(manifest.tokenizer.name)
    prompt = "The Python language"
    idx = torch.tensor([enc.encode_ordinary(prompt)])
    gen = torch.Generator().manual_seed(0)
    out = generate(model, idx, max_new_tokens=40, temperature=0.8, top_k=40,
                   eos_id=manifest.tokenizer.eot_id, generator=gen)
    print(f"   {enc.decode(out[0].tolist())!r}", flush=True)

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    print(f"== 4/4 done in {time.perf_counter() - t0:.0f}s. Look at the run with:\n"
          f"   mlflow ui --backend-store-uri {uri}\n"
          f"   metrics: {run_dir / 'metrics.jsonl'}; weights: {weights}", flush=True)
    if not last < first - 1.0:
        raise SystemExit(f"quickstart FAILED: the loss did not fall clearly ({first} -> {last})")
    return 0
