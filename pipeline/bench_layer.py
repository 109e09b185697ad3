"""``walsh bench layer``: one structured linear layer and each of its kernels against a roofline.

Every row is timed inside a CUDA graph (triton's ``do_bench_cudagraph``, mean of replays; a
layer row's forward + backward is recorded whole, its gradients cleared before each recorded
call so that they are written, never accumulated): without one, a kernel of a few microseconds
times the host's launch, not the GPU, and an eager Walsh layer's dozen launches made it read
0.22-0.58x dense on a slow host where its kernels were faster (session 10). Replays do not
flush L2 (50 MB on an H100 / H200), so a kernel whose operands fit there (the quantizer; the
transforms at 768 features, 25 MB per [16k, 768] tensor) can read under its HBM roofline.
``--flush-l2`` times each kernel row as a model step sees it: each call inside the graph
follows a write of ``FLUSH_BYTES``, and the same graph of the writes alone is timed and
subtracted (the 125M's gain passes ran 2.1-3.5x their roofline so, against 1.9-2.6x with L2
warm; session 22). The layer rows are never flushed: a layer's own launches reuse what the
previous one left in L2, as in the model.
The ceilings (one large kernel each; ``do_bench``, median, L2 flushed) are measured first, on
the device at hand: the copy bandwidth (a 1 GiB device to device copy, read + write bytes over
time) and the bf16 GEMM rate (an 8192^3 matmul). Each kernel's roofline time is then
``max(FLOPs / GEMM rate, bytes / bandwidth)`` with the bytes it must move at least once
(inputs read, outputs written), INT8 operations at twice the GEMM rate (``pipeline.roofline``'s
counts and rule); ``x roof`` is the measured time over that. The layer rows time forward +
backward of the whole layer per ``--impls``, against ``nn.Linear`` in bf16 of the same shape
(``x dense``: dense time over the layer's, so > 1 is faster than dense).

Shapes: N = ``--tokens`` rows (16 x 1024 by default, the model benchmark's batch), the layer
``--in-features -> --out-features`` with A = ``--blocks``. bf16 autocast, as in training.
A benchmark, never a test: record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F

from pipeline.roofline import Kernel, linear_kernels
from walsh.kernels import TRANSFORM_MIXES
from walsh.layers import TernaryLinear, WalshLinear


def _time_ms(fn) -> float:
    """Median ms of ``fn`` by triton's ``do_bench`` (warm-up, L2 flushed before each call)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def _graph_ms(fn, grads=None) -> float:
    """Mean ms of one ``fn`` replayed inside a CUDA graph (triton's ``do_bench_cudagraph``;
    it warms ``fn`` up on a side stream first, so compiled thunks compile before capture;
    ``grads`` are reset to None before each call inside the graph)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, grad_to_none=grads)


# the write before each flushed call: 256 MiB, five times the H200's 50 MB L2 (triton's
# do_bench flushes with the same size)
FLUSH_BYTES = 256 * 2**20


def _flushed_graph_ms(fn, flush: torch.Tensor) -> float:
    """``_graph_ms`` of ``fn`` after a write of ``flush`` (evicting L2), less the write's own
    time: the kernel as it runs with its operands in HBM (<= 0 where a kernel of a few
    microseconds sits within the two means' spread)."""
    def both():
        flush.zero_()
        fn()

    return _graph_ms(both) - _graph_ms(flush.zero_)


def measure_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 GEMM TFLOP/s) measured on this device."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 2 / (ms * 1e-3) / 1e9
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: m @ m)
    return bw, 2 * 8192**3 / (ms * 1e-3) / 1e12


def kernel_rows(n: int, fin: int, fout: int, a: int, dev: str = "cuda"
                ) -> list[tuple[str, object, Kernel]]:
    """(name, thunk, its FLOPs and bytes) for each kernel of a Walsh layer's forward and
    backward, and of the dense-shape bf16 and INT8 GEMMs beside them. The FLOPs and bytes are
    ``pipeline.roofline``'s for the same layers, so this table and ``walsh bench train``'s
    roofline column count alike."""
    from walsh.kernels import block_matmul as bm
    from walsh.kernels import int8_linear as ik
    from walsh.kernels import ternary as tk
    from walsh.kernels import walsh_linear as wf
    from walsh.kernels import walsh_transform as wt

    def counts(layer) -> dict[str, Kernel]:  # one layer's kernels by name
        return {k.name: k for k in linear_kernels(layer, n)}

    with torch.device("meta"):  # the layers whose kernels are timed, for their counts only
        three = counts(WalshLinear(fin, fout, blocks=a, impl="triton", ternary=True))
        # the du and dW GEMMs apart (the triton path counts them as one pass up to 96 lanes)
        blocks = counts(WalshLinear(fin, fout, blocks=a, impl="blocks", ternary=True))
        one = counts(WalshLinear(fin, fout, blocks=a, impl="fused", ternary=True))
        dense = counts(TernaryLinear(fin, fout, ternary=False))
        int8 = counts(TernaryLinear(fin, fout, ternary=True, act_bits=8, int8_matmul=True,
                                    int8_dx=True))
    bf = torch.bfloat16
    lin, lout = fin // a, fout // a
    x = torch.randn(n, fin, device=dev, dtype=bf)
    # block-major rows as the three-kernel layer stores them: lanes rounded up to 8 (16 bytes)
    u = torch.randn(a, n, wt.row_width(lin), device=dev, dtype=bf)
    y = torch.randn(a, n, wt.row_width(lout), device=dev, dtype=bf)
    dout = torch.randn(n, fout, device=dev, dtype=bf)
    out = torch.randn(n, fout, device=dev, dtype=bf)  # the forward's output, saved for dbeta
    alpha, beta = (torch.ones(a, k, device=dev, dtype=bf) for k in (lin, lout))
    w = torch.randn(a, lout, lin, device=dev) * 0.02  # fp32 latent weights
    wq = w.to(bf)
    wp = wf.padded_weight(wq)  # [A, row_width(lout), row_width(lin)], as the layer's bmm has it
    wd = (torch.randn(fout, fin, device=dev) * 0.02).to(bf)  # a dense [out, in] weight
    xq, inv_s = ik.quantize_rows_torch(x)
    gq, inv_sg = ik.quantize_rows_torch(dout)
    quantize = torch.compile(ik.quantize_rows_torch)  # alone: inside a model it fuses
    codes = torch.randint(-1, 2, (fout, fin), device=dev, dtype=torch.int8)
    codes_t = codes.t().contiguous()
    gamma = torch.full((1,), 0.02, device=dev)
    return [
        # one read of the input, one write of the output; H applied by a tensor-core dot or,
        # on rows of at most walsh_launch.BUTTERFLY_MAX_LANES lanes, by butterflies
        ("walsh_in", lambda: wt.walsh_in_raw(x, alpha, a, width=u.shape[2]), three["walsh_in"]),
        ("walsh_out", lambda: wt.walsh_out_raw(y, beta, a, lanes=lout), three["walsh_out"]),
        # the backward's transforms with their gains' gradients (dbeta, dalpha) in one pass
        ("walsh_in + dbeta", lambda: wt.walsh_in_gain_raw(dout, beta, out, a, width=y.shape[2]),
         three["walsh_in (dout) + dbeta"]),
        ("walsh_out + dalpha", lambda: wt.walsh_out_gain_raw(u, alpha, x, a),
         three["walsh_out (du) + alpha + dalpha"]),
        ("ternary_ste", lambda: tk.ternary_ste(w, False, bf), three["ternary quantize"]),
        # the per-block GEMMs by their own rules (walsh.kernels.block_matmul: Triton up to 64
        # lanes, 32 for dw; cuBLAS past), as the backward runs du and dW (one pass up to 96
        # lanes), and as cuBLAS's batched GEMM alone
        ("block GEMM fwd", lambda: bm.block_mm(u, wp.transpose(1, 2)), three["bmm fwd"]),
        ("block GEMM dx", lambda: bm.block_mm(y, wp), blocks["bmm dx"]),
        ("block GEMM dw", lambda: bm.block_mm_tn(y, u), blocks["bmm dw"]),
        # (a row only where the layer takes the one pass: past 96 lanes it is the two above)
        *([("block GEMM dx + dw", lambda: bm.block_mm_dual(y, wp, u), three["bmm dx + dw"])]
          if "bmm dx + dw" in three else []),
        ("bmm fwd (cuBLAS)", lambda: torch.bmm(u, wp.transpose(1, 2)), three["bmm fwd"]),
        ("bmm dx (cuBLAS)", lambda: torch.bmm(y, wp), blocks["bmm dx"]),
        ("bmm dw (cuBLAS)", lambda: torch.bmm(y.transpose(1, 2), u), blocks["bmm dw"]),
        # the one-kernel layer: x and w in, out written; FLOPs = the GEMMs and both H dots
        ("fused fwd", lambda: wf.walsh_linear_raw(x, wq, alpha, beta), one["walsh fused fwd"]),
        ("fused dx+dalpha", lambda: wf.walsh_linear_dx_raw(dout, x, wq, alpha, beta),
         one["walsh fused dx+dalpha"]),
        ("fused dbeta", lambda: wf.walsh_linear_dbeta_raw(dout, x, wq, alpha),
         one["walsh fused dbeta"]),
        # the dense-shape INT8 path (int8_matmul) beside the bf16 GEMM it replaces, INT8 at
        # twice the bf16 rate (the codes come from x's or dout's producer under compile; the
        # row quant row times them compiled alone, the cost when nothing fuses them)
        ("int8 GEMM fwd", lambda: ik.int8_matmul(xq, inv_s, codes, gamma, bf),
         int8["int8 GEMM fwd"]),
        ("bf16 GEMM fwd (dense)", lambda: x @ wd.t(), dense["GEMM fwd"]),
        ("int8 row quant (alone)", lambda: quantize(dout),
         Kernel("row quant", 0, 0, n * fout * (2 + 1) + 4 * n)),
        ("int8 GEMM dx", lambda: ik.int8_matmul(gq, inv_sg, codes_t, gamma, bf),
         int8["int8 GEMM dx"]),
        ("bf16 GEMM dx (dense)", lambda: dout @ wd, dense["GEMM dx"]),
    ]


def layer_rows(n: int, fin: int, fout: int, a: int, impls: list[str], compile_: bool):
    """(name, thunk running forward + backward, its gradients) per implementation, dense
    nn.Linear first."""
    dev = "cuda"
    x = torch.randn(n, fin, device=dev, requires_grad=True)
    g = torch.randn(n, fout, device=dev, dtype=torch.bfloat16)
    dense_w = torch.nn.Parameter(torch.randn(fout, fin, device=dev) / math.sqrt(fin))

    def run(f):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = f(x)
            out.backward(g)
        return step

    rows = [("dense nn.Linear bf16", run(lambda t: F.linear(t, dense_w)), [x, dense_w])]
    for impl in impls:
        layer = WalshLinear(fin, fout, blocks=a, impl=impl, ternary=True).to(dev)
        grads = [x, *layer.parameters()]
        rows.append((f"walsh {impl}", run(layer), grads))
        if compile_:
            rows.append((f"walsh {impl} compiled", run(torch.compile(layer)), grads))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows N (batch x sequence)")
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=3072)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--impls", nargs="+", default=["fused", "triton", "blocks", "dense"],
                   help="WalshLinear implementations to time")
    p.add_argument("--compile", action="store_true", help="also time each layer compiled")
    p.add_argument("--flush-l2", action="store_true",
                   help="time each kernel row with L2 flushed before each call, as a model "
                   "step's kernels meet their operands (layer rows: not flushed)")
    add_mix_argument(p)


def add_mix_argument(p: argparse.ArgumentParser) -> None:
    """``--transform-mix``, shared with ``walsh bench train``."""
    p.add_argument("--transform-mix", choices=TRANSFORM_MIXES, default="rule",
                   help="how walsh_impl=triton's passes mix their blocks: the launch "
                        "table's rule (butterflies on rows of at most 32 lanes, the "
                        "tensor-core dot on wider ones), or one way at every width, to time "
                        "the rule's choice (walsh.kernels.walsh_launch.transform_mix; the "
                        "fused one-kernel layer keeps its dot)")


def mix_context(mix: str):
    """The context that runs a benchmark under ``mix`` (nothing to import for the rule: the
    CPU benches need no Triton)."""
    if mix == "rule":
        return contextlib.nullcontext()
    try:
        from walsh.kernels.walsh_launch import transform_mix
    except ImportError as e:  # triton (Linux only), as walsh_impl=triton reports it
        raise SystemExit(f"--transform-mix {mix} needs the triton package: {e}") from e

    return transform_mix(mix)


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("walsh bench layer needs a CUDA device (its kernels are Triton)")
    with mix_context(args.transform_mix):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    n, fin, fout, a = args.tokens, args.in_features, args.out_features, args.blocks
    bw, tflops = measure_ceilings()
    print(f"# device={torch.cuda.get_device_name()} torch={torch.__version__} N={n} "
          f"{fin}->{fout} A={a} transform_mix={args.transform_mix}; measured ceilings: copy "
          f"{bw:,.0f} GB/s, bf16 GEMM {tflops:,.0f} TFLOP/s; kernel rows with L2 "
          f"{'flushed' if args.flush_l2 else 'warm'}")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if args.flush_l2 else None
    print(f"{'kernel':<24}{'ms':>9}{'roof ms':>9}{'x roof':>8}{'GB/s':>8}{'TFLOP/s':>9}")
    for name, fn, k in kernel_rows(n, fin, fout, a):
        ms = _graph_ms(fn) if flush is None else _flushed_graph_ms(fn, flush)
        roof = k.ms(tflops, bw)
        if ms <= 0:  # flushed, and within the spread of the flush's own time
            print(f"{name:<24}{'-':>9}{roof:>9.3f}")
            continue
        print(f"{name:<24}{ms:>9.3f}{roof:>9.3f}{ms / roof:>8.2f}"
              f"{k.bytes / ms / 1e6:>8,.0f}{(k.flops + k.int8_ops) / ms / 1e9:>9.1f}")
    print(f"{'layer':<24}{'ms':>9}{'x dense':>9}")
    dense_ms = None
    for name, fn, grads in layer_rows(n, fin, fout, a, args.impls, args.compile):
        ms = _graph_ms(fn, grads)
        dense_ms = dense_ms or ms
        print(f"{name:<24}{ms:>9.3f}{dense_ms / ms:>9.2f}", flush=True)
