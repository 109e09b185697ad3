"""``walsh bench train``: time forward + backward + AdamW step on random tokens.

For each preset (and each compile setting asked for) this builds the model with fp32 master
weights, runs ``--warmup`` untimed steps, then ``--steps`` timed steps under bf16 autocast
(fp32 on CPU unless ``--dtype bf16``), and prints tokens/s, ms/step, peak memory and the model's
own FLOPs per token (so MFU against a given peak is one division away). Random tokens are fine:
the cost of these layers does not depend on the data.

A benchmark, never a test: record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.parallelize import compile_blocks
from walsh.models import WalshLM, get_preset, presets


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings -> dict, values parsed as JSON where possible (true, 8, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def bench_one(
    name: str, overrides: dict, seq_len: int, batch: int, steps: int, warmup: int,
    compile_model: bool, device: torch.device, dtype: torch.dtype | None,
    compile_scope: str = "blocks",
) -> dict:
    cfg = get_preset(name, **overrides)
    if cfg.block_size < seq_len:
        cfg = cfg.replace(block_size=seq_len)
    torch.manual_seed(0)
    model = WalshLM(cfg).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    fwd_bwd = model
    if compile_model and compile_scope == "model":
        fwd_bwd = torch.compile(model)
    elif compile_model:
        compile_blocks(model)  # exactly what the trainer does (pipeline.parallelize)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
        for _ in range(4)
    ]

    def step(i: int) -> None:
        tok = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = fwd_bwd(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * seq_len
    flops = model.flops_per_token(seq_len)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "preset": name, "overrides": overrides, "compile": compile_model,
        "compile_scope": compile_scope if compile_model else None, "seq_len": seq_len,
        "batch": batch, "tok_s": tokens / dt, "ms_step": 1e3 * dt, "peak_gib": peak,
        "tflops": flops * tokens / dt / 1e12, "flops_per_token": flops, "warmup_s": warm_s,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", default=["dense-125m", "walsh-o-125m", "walsh-h-125m"],
                   help=f"model presets (known: {', '.join(sorted(presets))})")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="compile each transformer block (default) or the whole model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides applied to every preset, e.g. walsh_impl=dense")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = parse_overrides(args.set)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# device={dev_name} torch={torch.__version__} dtype={dtype_name} "
          f"T={args.seq_len} B={args.batch} steps={args.steps} overrides={overrides} "
          f"compile_scope={args.compile_scope}")
    header = (f"{'preset':<16}{'compile':>8}{'tok/s':>12}{'ms/step':>10}{'TFLOP/s':>10}"
              f"{'peak GiB':>10}{'warmup s':>10}")
    rows = []
    for name in args.presets:
        for comp in modes:
            r = bench_one(name, overrides, args.seq_len, args.batch, args.steps, args.warmup,
                          comp, device, dtype, args.compile_scope)
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the finished model is garbage now
            print(f"{r['preset']:<16}{str(comp):>8}{r['tok_s']:>12,.0f}{r['ms_step']:>10.1f}"
                  f"{r['tflops']:>10.1f}{r['peak_gib']:>10.2f}{r['warmup_s']:>10.1f}", flush=True)
    print(header)
    for r in rows:
        print(f"{r['preset']:<16}{str(r['compile']):>8}{r['tok_s']:>12,.0f}{r['ms_step']:>10.1f}"
              f"{r['tflops']:>10.1f}{r['peak_gib']:>10.2f}{r['warmup_s']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows
