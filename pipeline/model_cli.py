"""``walsh model info`` and ``walsh model smoke``: look at a preset, or prove the library works.

``smoke`` trains the ``tiny`` preset (shrunk to a 512-token vocab) for a few dozen AdamW steps on
a repeating random token pattern: a correct model memorizes it, so the loss must fall far below
ln(V) and greedy generation must continue the pattern. It needs no data and no network.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pipeline.bench_train import parse_overrides
from pipeline.roofline import breakdown_table
from walsh.generate import generate
from walsh.models import WalshLM, get_preset, presets

# the ceilings measured on the H200s lent to this project (sessions 13-19, docs/benchmarks.md):
# an 8192^3 bf16 GEMM and a device-to-device copy; `walsh bench train` measures its own
H200_TFLOPS, H200_GBS = 789.0, 4249.0


def _batch(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"batch must be >= 1, got {text}")
    return int(text)


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help=f"one of: {', '.join(sorted(presets))}")
    p.add_argument("--seq-len", type=int, default=None, help="T for FLOPs (default block_size)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--roofline", type=_batch, default=None, metavar="BATCH",
                   help="also print a training step's roofline at BATCH sequences of --seq-len, "
                        "by kernel (pipeline.roofline; no device needed)")
    p.add_argument("--peak-tflops", type=float, default=H200_TFLOPS,
                   help=f"bf16 ceiling for --roofline (default {H200_TFLOPS:g}: an H200's "
                        "8192^3 GEMM, docs/benchmarks.md)")
    p.add_argument("--bandwidth-gbs", type=float, default=H200_GBS,
                   help=f"memory ceiling for --roofline (default {H200_GBS:g}: an H200's copy)")


def info(args: argparse.Namespace) -> None:
    cfg = get_preset(args.preset, **parse_overrides(args.set))
    with torch.device("meta"):
        model = WalshLM(cfg)
    t = args.seq_len or cfg.block_size
    print(f"preset {args.preset}")
    for key, val in cfg.to_dict().items():
        print(f"  {key:<20} {val}")
    print("parameters")
    for key, val in model.num_params().items():
        print(f"  {key:<20} {val:,}")
    print(f"flops/token (train, T={t}): {model.flops_per_token(t):,}")
    print(f"flops/token (fwd,   T={t}): {model.flops_per_token(t, training=False):,}")
    if args.roofline is not None:
        print(breakdown_table(model, args.roofline, t, args.peak_tflops, args.bandwidth_gbs),
              end="")


def add_smoke_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)


def smoke(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    vocab, period, seq = 512, 24, 96
    cfg = get_preset(args.preset, vocab_size=vocab, block_size=128)
    model = WalshLM(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    pattern = torch.randint(0, vocab, (period,), generator=gen)
    stream = pattern.repeat(seq // period + 2)  # the pattern, repeated
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    n = model.num_params()
    print(f"smoke: preset={args.preset} (vocab {vocab}) params={n['total']:,} "
          f"ternary={n['ternary']:,}; learning a {period}-token pattern, "
          f"ln(V)={math.log(vocab):.2f}")
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        offs = torch.randint(0, period, (8,), generator=gen)
        batch = torch.stack([stream[o : o + seq + 1] for o in offs.tolist()])
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"  step {step:>4}  loss {loss.item():.3f}")
    prompt = stream[None, :period]
    out = generate(model, prompt, max_new_tokens=period)[0, period:]
    match = (out == pattern).float().mean().item()
    print(f"greedy continuation matches the pattern on {match:.0%} of {period} tokens "
          f"({time.perf_counter() - t0:.1f}s)")
    if loss.item() > 0.5 * math.log(vocab):
        raise SystemExit(f"smoke FAILED: loss {loss.item():.3f} did not fall")
