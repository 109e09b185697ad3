"""``walsh bench launch``: the Walsh MLP's chained pass over a grid of launches, against its
launch table and its roofline.

``walsh.kernels.walsh_launch.MLP_CHAIN`` fixes the chained pass's launch (``walsh.kernels.
walsh_mlp``: lanes per chunk, tokens per slab, warps, pipelining stages, tokens per program)
by padded row width and direction. Its entries are the best of sweeps on one H200
(docs/benchmarks.md, sessions 28-29), where a launch off the best ran up to 25x slower (a slab
whose values spill). Another GPU or Triton version may want other entries: this command times
the pass at one hidden width over a grid of launches, the table's own first, and prints the
fastest, each with its time over the pass's roofline (its bytes over the measured copy
bandwidth; the pass is memory-bound). To change an entry, edit the table and record the run in
docs/benchmarks.md.

Each launch runs on the same random inputs as the table's and must give its outputs (gate, up
and u_d forward; dy_g, dy_u and the three gain sums backward) within ``MATCH`` relative: a
launch that covers other tokens per program sums the gain gradients in another order, and
nothing else may differ. Launches whose fp32 slab (A x tokens per slab x lanes per chunk)
passes ``MAX_SLAB`` elements are skipped (at 32 blocks and 256 lanes one token's slab spilled
already); launches that fail to compile (out of shared memory) are reported and skipped.
Timing: CUDA graphs (``pipeline.bench_layer``'s ``_graph_ms``), L2 warm.

Shapes: N = ``--tokens`` rows, A = ``--blocks``, hidden rows of ``--lanes`` lanes (the
presets: 64, 86 and 172 at A = 32; rows padded to ``row_width``). bf16.
A benchmark, never a test: record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools

import torch

MATCH = 1e-5  # outputs of every launch against the table's, relative (fp32 sums' order)
MAX_SLAB = 16384  # fp32 elements of a program's slab


def _inputs(n: int, a: int, lanes: int, dev: str):
    """Random bf16 operands of both directions at rows of ``row_width(lanes)``."""
    from walsh.kernels.walsh_transform import row_width

    bf, width = torch.bfloat16, row_width(lanes)
    y_g, y_u, du = (torch.randn(a, n, width, device=dev, dtype=bf) for _ in range(3))
    gains = [(1 + 0.1 * torch.randn(a, lanes, device=dev)).to(bf) for _ in range(3)]
    return y_g, y_u, du, gains


def pass_fn(fwd: bool, n: int, a: int, lanes: int, dev: str = "cuda"):
    """(run, bytes): ``run(launch, poison)`` runs the pass with ``launch`` (None: the table's)
    into buffers of its own, first filled with NaN if ``poison`` (an entry a launch leaves
    unwritten then shows), and returns its outputs; ``bytes`` the pass's HBM bytes (each
    operand read or written once)."""
    from walsh.kernels import walsh_mlp as wm

    y_g, y_u, du, (bg, bu, ad) = _inputs(n, a, lanes, dev)
    gate = torch.empty(n, a * lanes, device=dev, dtype=y_g.dtype)
    up = torch.empty_like(gate)
    wm.mlp_chain_fwd_raw(y_g, y_u, bg, bu, ad, lanes, out=(gate, up, None))  # the saved pair
    bufs = [torch.empty_like(y_g) for _ in range(2)]
    # either way three block-major [A, N, W] tensors and the token-major gate and up: forward
    # y_g, y_u read, u_d, gate, up written; backward du_d, gate, up read, dy_g, dy_u written
    nbytes = 3 * y_g.numel() * y_g.element_size() + 2 * gate.numel() * gate.element_size()

    if fwd:
        outs = (torch.empty_like(gate), torch.empty_like(up), bufs[0])

        def run(launch=None, poison=False):
            for t in outs if poison else ():
                t.fill_(float("nan"))
            return wm.mlp_chain_fwd_raw(y_g, y_u, bg, bu, ad, lanes, out=outs, launch=launch)
        return run, nbytes

    def run(launch=None, poison=False):
        for t in bufs if poison else ():
            t.fill_(float("nan"))
        return wm.mlp_chain_bwd_raw(du, gate, up, bg, bu, ad, out=tuple(bufs), launch=launch)
    return run, nbytes


def launch_grid(args: argparse.Namespace, a: int, width: int):
    """The launches to time: (lanes per chunk, tokens per slab, warps, stages, tokens per
    program); a chunk of 0 stands for the whole row padded to a power of two."""
    import triton

    for lb, bt, warps, stages, tokens in itertools.product(
            args.chunks, args.slab_tokens, args.warps, args.stages, args.loop_tokens):
        lb = lb or triton.next_power_of_2(width)
        if a * bt * lb <= MAX_SLAB and tokens >= bt:
            yield lb, bt, warps, stages, tokens


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sweep(fwd: bool, args: argparse.Namespace, bandwidth_gbs: float, time_ms):
    """[(ms, launch, rel err)] of the table's launch (first) and the grid's, fastest first
    after the table's; ``time_ms(thunk)`` times one call."""
    from walsh.kernels.walsh_launch import mlp_chain_params
    from walsh.kernels.walsh_transform import row_width

    n, a, lanes = args.tokens, args.blocks, args.lanes
    run, nbytes = pass_fn(fwd, n, a, lanes, args.device)
    table = mlp_chain_params(fwd, row_width(lanes))
    ref = [t.clone() for t in run(poison=True)]
    rows = [(time_ms(run), table, 0.0)]
    for launch in launch_grid(args, a, row_width(lanes)):
        try:
            got = run(launch, poison=True)
        except Exception as e:  # out of resources: report, keep sweeping
            print(f"#   {launch}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        err = max(_rel(g, r) for g, r in zip(got, ref))
        if not err <= MATCH:  # NaN: an entry left unwritten
            raise RuntimeError(f"launch {launch} gives other results than the table's "
                               f"{table} (relative error {err:.2e} > {MATCH})")
        rows.append((time_ms(lambda launch=launch: run(launch)), launch, err))
    roof_ms = nbytes / (bandwidth_gbs * 1e9) * 1e3
    return rows[:1] + sorted(rows[1:]), roof_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lanes", type=int, default=172,
                   help="hidden lanes a block (hidden / blocks: 64, 86, 172 in the presets)")
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows N (batch x sequence)")
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--direction", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 32],
                   help="lanes per chunk (powers of two; 0: the whole padded row)")
    p.add_argument("--slab-tokens", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 3],
                   help="pipelining stages of a program's loop (0: the compiler's default)")
    p.add_argument("--loop-tokens", type=int, nargs="+", default=[1, 64],
                   help="tokens a program covers (looping over its slabs)")
    p.add_argument("--top", type=int, default=8, help="launches printed per direction")
    p.add_argument("--device", default="cuda")


def main(args: argparse.Namespace) -> None:
    from pipeline.bench_layer import _graph_ms, measure_ceilings

    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("walsh bench launch needs a CUDA device (it times Triton launches)")
    bw, _ = measure_ceilings()
    print(f"# device={torch.cuda.get_device_name()} torch={torch.__version__} "
          f"N={args.tokens} A={args.blocks} lanes={args.lanes}; copy {bw:,.0f} GB/s")
    for fwd in {"fwd": [True], "bwd": [False], "both": [True, False]}[args.direction]:
        rows, roof = sweep(fwd, args, bw, _graph_ms)
        print(f"{'fwd' if fwd else 'bwd'}: roofline {roof * 1e3:.1f} us; "
              f"(lanes per chunk, tokens per slab, warps, stages, tokens per program)")
        for k, (ms, launch, err) in enumerate(rows[:args.top + 1]):
            tag = "table" if k == 0 else f"#{k}"
            print(f"  {tag:<6}{ms * 1e3:>9.1f} us {ms / roof:>6.2f}x roof  {launch}"
                  f"  err {err:.1e}", flush=True)
