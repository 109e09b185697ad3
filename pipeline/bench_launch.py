"""``walsh bench launch``: one Walsh pass over a grid of launches (and block mixes), against
its launch table and its roofline.

``walsh.kernels.walsh_launch`` fixes each pass's launch (lanes per chunk, tokens per slab,
warps, pipelining stages, tokens per program of a looping pass): ``MLP_CHAIN`` the Walsh MLP's
chained pass (``walsh.kernels.walsh_mlp``) by padded row width and direction, ``_launch_params``
the transform kernel's passes (``walsh.kernels.walsh_transform``) by mode, group and width.
Their entries are the best of sweeps on one H200 (docs/benchmarks.md; sessions 9, 16, 22-23,
28-29), where a launch off the best ran up to 25x slower (a slab whose values spill). Another
GPU or Triton version may want other entries, and so may the other block mix (session 33's
butterflies moved the narrow rows' passes, whose launches were swept on the dot): this command
times one pass at one width over a grid of launches, the table's own first, and prints the
fastest, each with its time over the pass's roofline (its bytes over the measured copy
bandwidth; the passes are memory-bound). ``--pass``: ``chain`` (the default; ``--direction``),
``walsh_in`` (with ``--group`` P: a group's one pass over x), ``walsh_out``, ``walsh_in_gain``
(walsh_in + dbeta: a walsh_out's backward) or ``walsh_out_gain`` (dx + dalpha: a walsh_in's
backward; ``--group`` P: the group's). ``--mixes`` also sweeps how the passes mix their blocks
(``walsh_launch.transform_mix``: rule, dot, butterflies). Not covered: the SwiGLU and RoPE
variants of the passes. To change an entry, edit the table and record the run in
docs/benchmarks.md.

Each launch runs on the same random inputs as the table's and must give its outputs (the pass's
result, and its gain sums) within ``MATCH`` relative of the table's launch under the same mix
(the result buffers are filled with NaN first, so an entry a launch leaves unwritten shows; the
gain's fp32 partial table is the launcher's own allocation and is not): a launch that covers
other tokens per program sums the gain gradients in another order, and nothing else may differ;
another mix may differ by the dot's bf16 operands, within ``MIX_MATCH``. Launches whose fp32
slab (A x tokens per slab x lanes per chunk) passes ``MAX_SLAB`` elements are skipped (at 32
blocks and 256 lanes one token's slab spilled already); launches that fail to compile (out of
shared memory) are reported and skipped. Timing: CUDA graphs (``pipeline.bench_layer``'s
``_graph_ms``), L2 warm, or flushed before each call (``--flush-l2``, as ``walsh bench
layer``'s: a 768-feature pass's operands fit the H200's L2).

Shapes: N = ``--tokens`` rows, A = ``--blocks``, rows of ``--lanes`` lanes (the presets at A =
32: 24, 32 and 64 lanes for the model width, 64, 86 and 172 for the MLP's hidden rows; padded to
``row_width``). bf16. A benchmark, never a test: record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from walsh.kernels import TRANSFORM_MIXES

MATCH = 1e-5  # outputs of every launch against the table's, relative (fp32 sums' order)
MIX_MATCH = 2e-2  # another block mix against the rule's: the dot rounds its operands to bf16
MAX_SLAB = 16384  # fp32 elements of a program's slab
PASSES = ("chain", "walsh_in", "walsh_out", "walsh_in_gain", "walsh_out_gain")
GROUP_PASSES = ("walsh_in", "walsh_out_gain")  # the passes a group of layers runs as one


def _inputs(n: int, a: int, lanes: int, dev: str):
    """Random bf16 operands of both directions at rows of ``row_width(lanes)``."""
    from walsh.kernels.walsh_transform import row_width

    bf, width = torch.bfloat16, row_width(lanes)
    y_g, y_u, du = (torch.randn(a, n, width, device=dev, dtype=bf) for _ in range(3))
    gains = [(1 + 0.1 * torch.randn(a, lanes, device=dev)).to(bf) for _ in range(3)]
    return y_g, y_u, du, gains


def _runner(call, bufs):
    """``run(launch, poison)``: ``call(launch)`` into ``bufs``, first filled with NaN if
    ``poison`` (an entry a launch leaves unwritten then shows); its outputs as a tuple."""
    def run(launch=None, poison=False):
        for t in bufs if poison else ():
            t.fill_(float("nan"))
        out = call(launch)
        return out if isinstance(out, tuple) else (out,)
    return run


def chain_fn(fwd: bool, n: int, a: int, lanes: int, dev: str = "cuda"):
    """(run, bytes, table launch) of the MLP's chained pass: ``run`` as ``_runner``'s;
    ``bytes`` the pass's HBM bytes (each operand read or written once)."""
    from walsh.kernels import walsh_mlp as wm
    from walsh.kernels.walsh_launch import mlp_chain_params
    from walsh.kernels.walsh_transform import row_width

    y_g, y_u, du, (bg, bu, ad) = _inputs(n, a, lanes, dev)
    gate = torch.empty(n, a * lanes, device=dev, dtype=y_g.dtype)
    up = torch.empty_like(gate)
    wm.mlp_chain_fwd_raw(y_g, y_u, bg, bu, ad, lanes, out=(gate, up, None))  # the saved pair
    bufs = [torch.empty_like(y_g) for _ in range(2)]
    # either way three block-major [A, N, W] tensors and the token-major gate and up: forward
    # y_g, y_u read, u_d, gate, up written; backward du_d, gate, up read, dy_g, dy_u written
    nbytes = 3 * y_g.numel() * y_g.element_size() + 2 * gate.numel() * gate.element_size()
    table = mlp_chain_params(fwd, row_width(lanes))
    if fwd:
        outs = (torch.empty_like(gate), torch.empty_like(up), bufs[0])
        return _runner(lambda launch: wm.mlp_chain_fwd_raw(
            y_g, y_u, bg, bu, ad, lanes, out=outs, launch=launch), outs), nbytes, table
    return _runner(lambda launch: wm.mlp_chain_bwd_raw(
        du, gate, up, bg, bu, ad, out=tuple(bufs), launch=launch), bufs), nbytes, table


def transform_fn(kind: str, group: int, n: int, a: int, lanes: int, dev: str = "cuda"):
    """(run, bytes, table launch) of one transform-kernel pass (``PASSES`` but chain), as
    ``chain_fn``'s; ``group`` layers for the passes a group runs as one (``GROUP_PASSES``)."""
    from walsh.kernels import walsh_group as wg
    from walsh.kernels import walsh_transform as wt
    from walsh.kernels.walsh_launch import _launch_params

    bf, width = torch.bfloat16, wt.row_width(lanes)
    x, fwd = (torch.randn(n, a * lanes, device=dev, dtype=bf) for _ in range(2))  # token-major
    ys = [torch.randn(a, n, width, device=dev, dtype=bf) for _ in range(group)]  # block-major
    gains = (1 + 0.1 * torch.randn(group, a, lanes, device=dev)).to(bf)
    gain = gains[0] if group == 1 else gains
    in_mode = kind in ("walsh_in", "walsh_in_gain")
    # each operand read or written once, N x A*L bf16 elements each (block-major ones without
    # their padded lanes, as pipeline.roofline counts them, so both benches' "x roof" agree):
    # walsh_in x -> P u; walsh_out y -> out; walsh_in_gain dout, out -> dy; walsh_out_gain P
    # du, x -> dx (the gain's fp32 partial sums left out)
    operands = {"walsh_in": 1 + group, "walsh_out": 2, "walsh_in_gain": 3,
                "walsh_out_gain": group + 2}[kind]
    nbytes = operands * x.numel() * x.element_size()
    table = _launch_params(in_mode, group, width, kind.endswith("_gain"), False)
    if in_mode:
        dst = torch.empty(*(() if group == 1 else (group,)), a, n, width, device=dev, dtype=bf)
    else:
        dst = torch.empty_like(x)
    call = {
        "walsh_in": lambda launch: (
            wt.walsh_in_raw(x, gain, a, out=dst, width=width, launch=launch) if group == 1 else
            wg.walsh_in_group_raw(x, gain, width, out=dst, launch=launch)),
        "walsh_out": lambda launch: wt.walsh_out_raw(ys[0], gain, a, out=dst, lanes=lanes,
                                                     launch=launch),
        "walsh_in_gain": lambda launch: wt.walsh_in_gain_raw(x, gain, fwd, a, out=dst,
                                                             width=width, launch=launch),
        "walsh_out_gain": lambda launch: (
            wt.walsh_out_gain_raw(ys[0], gain, x, a, out=dst, launch=launch) if group == 1 else
            wg.walsh_out_group_gain_raw(ys, gain, x, out=dst, launch=launch)),
    }[kind]
    return _runner(call, [dst]), nbytes, table


def launch_grid(args: argparse.Namespace, a: int, width: int, loops: bool = True):
    """The launches to time: (lanes per chunk, tokens per slab, warps, stages, tokens per
    program); a chunk of 0 stands for the whole row padded to a power of two, and chunks wider
    than that are left out (their extra lanes all masked). A pass that does not loop (``loops``
    False: the transforms without a gain) covers one slab a program without pipelining,
    whatever ``--loop-tokens`` and ``--stages`` say (``no_loop``). Each launch once."""
    import triton

    seen, row = set(), triton.next_power_of_2(width)
    for lb, bt, warps, stages, tokens in itertools.product(
            args.chunks, args.slab_tokens, args.warps, args.stages, args.loop_tokens):
        lb = lb or row
        launch = (lb, bt, warps, stages, tokens) if loops else no_loop((lb, bt, warps, 0, 0))
        if a * bt * lb <= MAX_SLAB and launch[4] >= bt and lb <= row and launch not in seen:
            seen.add(launch)
            yield launch


def no_loop(launch: tuple[int, int, int, int, int]) -> tuple[int, int, int, int, int]:
    """A launch of a pass that does not loop, as its kernel runs it: one slab a program (the
    tokens per program are the slab's) and no pipelining stages (the table's 0)."""
    lb, bt, warps, _, _ = launch
    return lb, bt, warps, 0, bt


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sweep(fwd: bool | None, args: argparse.Namespace, bandwidth_gbs: float, time_ms):
    """[(ms, mix, launch, rel err)] of the table's launch under the rule (first), then of each
    mix's table launch (mixes other than the rule) and the grid's launches under each of
    ``args.mixes``, fastest first (times <= 0, which a flushed timing gives within its noise,
    last), and the pass's roofline ms; ``fwd``: the chain's direction (None for the other
    passes); ``time_ms(thunk)`` times one call. A gain pass's time includes the sum of its
    partial table (``summed=True``; the models sum several in one launch)."""
    from pipeline.bench_layer import mix_context
    from walsh.kernels.walsh_transform import row_width

    n, a, lanes, kind = args.tokens, args.blocks, args.lanes, args.kind
    if kind == "chain":
        run, nbytes, table = chain_fn(fwd, n, a, lanes, args.device)
    else:
        run, nbytes, table = transform_fn(kind, args.group, n, a, lanes, args.device)
    loops = kind == "chain" or kind.endswith("_gain")
    table = table if loops else no_loop(table)  # as the grid writes it, to be found there
    rule = [t.clone() for t in run(poison=True)]
    rows = [(time_ms(run), "rule", table, 0.0)]
    for mix in dict.fromkeys(args.mixes):  # each once, in order
        with mix_context(mix):
            ref = rule
            if mix != "rule":  # this mix's own table launch: the reference of its launches
                ref = [t.clone() for t in run(poison=True)]
                err = max(_rel(g, r) for g, r in zip(ref, rule))
                if not err <= MIX_MATCH:
                    raise RuntimeError(f"block mix {mix} gives other results than the rule "
                                       f"(relative error {err:.2e} > {MIX_MATCH})")
                rows.append((time_ms(run), mix, table, err))
            for launch in launch_grid(args, a, row_width(lanes), loops):
                if launch == table:
                    continue  # timed above
                try:
                    got = run(launch, poison=True)
                except ValueError:  # a launch the launcher refuses (checked_launch): the args'
                    raise
                except Exception as e:  # out of resources: report, keep sweeping
                    print(f"#   {mix} {launch}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]}")
                    continue
                err = max(_rel(g, r) for g, r in zip(got, ref))
                if not err <= MATCH:  # NaN: an entry left unwritten
                    raise RuntimeError(f"launch {launch} ({mix}) gives other results than the "
                                       f"table's {table} (relative error {err:.2e} > {MATCH})")
                rows.append((time_ms(lambda launch=launch: run(launch)), mix, launch, err))
    roof_ms = nbytes / (bandwidth_gbs * 1e9) * 1e3
    return rows[:1] + sorted(rows[1:], key=lambda r: (r[0] <= 0, r[0])), roof_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="kind", choices=PASSES, default="chain",
                   help="the pass to sweep: the MLP's chained pass, or one of the transform "
                        "kernel's (walsh_in_gain: walsh_in + dbeta; walsh_out_gain: dx + "
                        "dalpha)")
    p.add_argument("--group", type=int, default=1,
                   help=f"layers sharing the input ({', '.join(GROUP_PASSES)}: up to 3)")
    p.add_argument("--mixes", nargs="+", choices=TRANSFORM_MIXES, default=["rule"],
                   help="block mixes to sweep each launch under (walsh_launch.transform_mix)")
    p.add_argument("--lanes", type=int, default=172,
                   help="lanes a block: features / blocks (the chain's hidden rows: 64, 86, "
                        "172 in the presets; the model width's: 24, 32, 64)")
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows N (batch x sequence)")
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--direction", choices=["fwd", "bwd", "both"], default="both",
                   help="the chain's (the other passes have one)")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 32],
                   help="lanes per chunk (powers of two; 0: the whole padded row)")
    p.add_argument("--slab-tokens", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 3],
                   help="pipelining stages of a program's loop (0: the compiler's default)")
    p.add_argument("--loop-tokens", type=int, nargs="+", default=[1, 64],
                   help="tokens a program covers (looping over its slabs; the chain and the "
                        "gain passes)")
    p.add_argument("--flush-l2", action="store_true",
                   help="time each launch with L2 flushed before each call")
    p.add_argument("--top", type=int, default=8, help="launches printed per pass (direction)")
    p.add_argument("--device", default="cuda")


def main(args: argparse.Namespace) -> None:
    from pipeline.bench_layer import FLUSH_BYTES, _flushed_graph_ms, _graph_ms, measure_ceilings

    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("walsh bench launch needs a CUDA device (it times Triton launches)")
    if not 1 <= args.group <= 3 or (args.group > 1 and args.kind not in GROUP_PASSES):
        raise SystemExit(f"--group {args.group}: 1, or 2-3 with --pass "
                         f"{' or '.join(GROUP_PASSES)}")
    bw, _ = measure_ceilings()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if args.flush_l2 else None

    def time_ms(fn) -> float:
        return _graph_ms(fn) if flush is None else _flushed_graph_ms(fn, flush)

    print(f"# device={torch.cuda.get_device_name()} torch={torch.__version__} pass={args.kind} "
          f"group={args.group} N={args.tokens} A={args.blocks} lanes={args.lanes}; copy "
          f"{bw:,.0f} GB/s; L2 {'flushed' if args.flush_l2 else 'warm'}")
    dirs = {"fwd": [True], "bwd": [False], "both": [True, False]}[args.direction]
    for fwd in dirs if args.kind == "chain" else [None]:
        rows, roof = sweep(fwd, args, bw, time_ms)
        name = args.kind if fwd is None else ("fwd" if fwd else "bwd")
        print(f"{name}: roofline {roof * 1e3:.1f} us; block mix, (lanes per chunk, tokens per "
              f"slab, warps, stages, tokens per program)")
        for k, (ms, mix, launch, err) in enumerate(rows[:args.top + 1]):
            tag = "table" if k == 0 else f"#{k}"
            t = (f"{ms * 1e3:>9.1f} us {ms / roof:>6.2f}x roof" if ms > 0
                 else f"{'-':>9} us {'-':>6}x roof")  # within the flushed timing's noise
            print(f"  {tag:<6}{t}  {mix:<12}{launch}  err {err:.1e}", flush=True)
