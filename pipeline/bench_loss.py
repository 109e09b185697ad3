"""``walsh bench loss``: peak memory and time of the chunked linear cross-entropy vs full CE.

Runs forward + backward of ``walsh.loss.linear_cross_entropy`` (per ``--impls``: the chunk
pass on the Triton kernel, in torch ops, or auto) and of the naive reference
(full [N, V] logits, ``F.cross_entropy``) on random h [N, C] and a [V, C] weight, and prints
peak memory above the inputs, time per call and the loss difference. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from walsh.loss import LOSS_IMPLS, linear_cross_entropy, naive_linear_cross_entropy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16 * 1024, help="N = batch * seq_len")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", nargs="+", choices=LOSS_IMPLS, default=["auto"],
                   help="the chunk pass: triton (the kernel), torch, auto (triton on CUDA)")


def _measure(fn, h, w, t, chunk, repeats, device) -> tuple[float, float, float]:
    """(peak GiB above the live inputs, ms per forward+backward, loss)."""
    cuda = device.type == "cuda"
    for _ in range(2):  # warm up (allocator, kernels)
        fn(h, w, t, chunk).backward()
        h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        loss = fn(h, w, t, chunk)
        loss.backward()
        h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / repeats
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return peak, ms, loss.item()


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(args.tokens, args.dim, generator=gen).to(device, dtype).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, args.dim, generator=gen)).to(device).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    print(f"# device={device} N={args.tokens} C={args.dim} V={args.vocab} h dtype={args.dtype}, "
          f"weight fp32; peak = memory above the inputs during forward+backward")
    rows = []
    peak, ms, ref = _measure(naive_linear_cross_entropy, h, w, t, 0, args.repeats, device)
    rows.append({"impl": "full CE", "chunk": None, "peak_gib": peak, "ms": ms, "loss": ref})
    for impl in args.impls:
        def fn(h, w, t, chunk, impl=impl):
            return linear_cross_entropy(h, w, t, chunk, impl=impl)

        for chunk in args.chunks:
            peak, ms, loss = _measure(fn, h, w, t, chunk, args.repeats, device)
            rows.append({"impl": impl, "chunk": chunk, "peak_gib": peak, "ms": ms, "loss": loss})
    print(f"{'impl':<10}{'chunk':>8}{'peak GiB':>10}{'ms':>9}{'loss':>10}{'|dloss|':>10}")
    for r in rows:
        print(f"{r['impl']:<10}{str(r['chunk'] or '-'):>8}{r['peak_gib']:>10.2f}{r['ms']:>9.1f}"
              f"{r['loss']:>10.4f}{abs(r['loss'] - ref):>10.1e}")
    return rows
