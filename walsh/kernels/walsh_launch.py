"""Launch configuration of the Walsh transform kernel (``walsh.kernels.walsh_transform_kernel``):
tiles, warps and pipelining stages by pass and row width, each with the sweep that chose it
(H200, CUDA graphs; docs/benchmarks.md), and the block-major row width. The launcher that uses
them is ``walsh.kernels.walsh_transform._launch``.
"""

from __future__ import annotations

import contextlib
import sys

import triton

from walsh.kernels import TRANSFORM_MIXES

# a program's slab holds a tile of padded lanes of every block: tile // LB tokens of LB =
# next_pow2(L) lanes, or one token's lanes in chunks of the tile when L > tile; a token of
# between one and two tiles' lanes and no whole number of tiles is one chunk of two tiles, up
# to MAX_CHUNK lanes (``_slab``: 172 lanes, the 1.3B FFN, as 256 rather than 128 + 44).
# Tiles of (128, 256) lanes x (4, 8) warps x (1, 2, 4) slabs per program were swept in CUDA
# graphs at 24, 64, 86, 172 and 256 lanes, transforms and gain passes (session 9,
# docs/benchmarks.md): 4 warps and one slab were best or within 3% everywhere; walsh_out (and
# walsh_out + dalpha) ran faster with 256-lane tiles at every width but 24 (6% slower there),
# walsh_in with 128 at all but 172. int32 offsets (the kernel's ``WIDE``) took 2-13% off the
# transforms.
IN_TILE, OUT_TILE, TILE_WARPS = 128, 256, 4


# with a fused gain gradient, a program loops over slabs of BT tokens until it has covered at
# least this many tokens: its partial sums ([N / GAIN_TOKENS, A*L] fp32) then cost 4 / (6 *
# GAIN_TOKENS) of the pass's bytes (1% at 64). Swept over 4-128 (H200, N = 16k, A = 32, bf16,
# CUDA graphs; docs/benchmarks.md, session 8): 64 had the lowest sum over 24, 64 and 256 lanes
# of both passes' times over their rooflines (13.5 against 15.5 at 16); walsh-h-1b3 trained
# at the same speed with 16 and 64
GAIN_TOKENS = 64


# the token loop's software-pipelining depth in the gain passes, by IN_MODE (0: the compiler's
# default). Swept on an H200 with bf16 dots (session 11, docs/benchmarks.md; N = 16k, A = 32,
# CUDA graphs, x roof at 24 / 64 / 96 / 172 / 192 lanes): walsh_in + dbeta with 3 stages
# 2.15 / 1.39 / 1.42 / 1.65 / 1.41x, with the default 2.37 / 1.62 / 2.14 / 1.73 / 1.52x;
# walsh_out + dalpha with the default 2.15 / 1.55 / 1.67 / 2.11 / 1.62x, 5-33% slower with 3
# stages and 19-39% with 2
GAIN_STAGES = {True: 3, False: 0}  # keyed by IN_MODE
# walsh_in + dbeta with RoPE inside (a rotated walsh_out's backward: q, k) also holds the fp32
# tables c, s in each stage: 106 KiB of shared memory a program at 3 stages and 24 lanes, so 2
# programs an SM. Rows of at most ROPE_NARROW_LANES lanes take ROPE_NARROW_STAGES. H200, N =
# 16k, A = 32, L2 flushed before each call (session 22, docs/benchmarks.md), us at 1 / 2 / 3 /
# 4 stages: 24 lanes 48.5 / 65.8 / 62.1 / 78.7 (the pass without RoPE 37.4 / 41.4 / 36.5 /
# 37.5); 64 lanes 106.0 at 1 against 91.7 at 3, so wider rows keep GAIN_STAGES. 32 lanes (the
# 350M, the 24-lane slab [32, 4, 32] without its masked lanes) 52.0 at 1 against 45.7 at 3
# (session 24): only 24 take the one stage
ROPE_NARROW_LANES, ROPE_NARROW_STAGES = 24, 1
# one layer's walsh_out (the forward's, with RoPE or without; not SwiGLU's nor a group's) on
# rows of at most OUT_NARROW_LANES lanes takes tiles of OUT_NARROW_TILE; its dx + dalpha pass
# takes that tile and GAIN_NARROW_TOKENS tokens a program on rows of at most GAIN_NARROW_LANES
# (at 24 lanes neither alone helps, both do; at 32 both slow it: below). At 24 lanes a
# 256-lane tile is a [32, 8, 32] fp32 slab, 64 registers a thread per tensor: the dx pass held
# 254 registers (two programs an SM), and its grid of N / 64 = 256 programs could not fill
# more (ncu, session 23). H200, N = 16k, A = 32, L2 flushed (session 23, docs/benchmarks.md),
# us at 24 lanes with 256 / 128-lane tiles: walsh_out with RoPE and fp16 tables 29.7 / 25.1
# (fp32 tables 35.4 / 31.8), plain 19.6 / 19.1; dx + dalpha 42.5 / 45.1 at 64 tokens a program,
# 45.0 / 37.2 at 32 (37.4 in a second call), 49.4 / 41.4 at 16. At 64 lanes neither helped
# (dx + dalpha 79.0 against 82.2 with both). 32 lanes (session 24; 256-lane / 128-lane tile):
# walsh_out 22.2 / 19.9, with RoPE 27.5 / 26.1; dx + dalpha 43.7 at OUT_TILE and 64 tokens,
# 48.6 with 32 tokens, 47.2 with the narrow tile, 54.1 with both
OUT_NARROW_LANES, OUT_NARROW_TILE = 32, 128
GAIN_NARROW_LANES, GAIN_NARROW_TOKENS = 24, 32
# rows of at most BUTTERFLY_MAX_LANES lanes mix their A >= 16 blocks by butterflies in
# registers (log2(A) stages of split, add and subtract, join: ``walsh_transform_kernel.
# _butterfly``) instead of a tensor-core dot with H; wider rows keep the dot (butterflies not
# timed there), and A < 16 always takes butterflies. H200, N = 16k, A = 32, bf16, L2 flushed
# (session 33, docs/benchmarks.md): at 24 lanes walsh_out + dalpha 37 -> 29 us, walsh_in +
# dbeta 37 -> 38, the 768 -> 768 layer 0.224 -> 0.209 ms; walsh-h-125m 540,221 -> 546,976
# tok/s (+1.25%) with the MLP's chained pass (``walsh_mlp``) left on its dot: the rule moves
# that pass too, not timed (session 34's offline compile: its 24-lane backward spills 8
# bytes against the dot's 96). Compiled offline for sm_90 (triton 3.9), a [32, 8, 32] slab's
# transform took 40 / 26 shared-memory loads / stores against the dot's 44 / 34, and no more
# registers.
# The 350M's 32 lanes share the 24-lane slab [32, 8, 32] (not timed). Wider rows (session 35,
# same bench, us dot -> butterflies): 64 lanes (2048 -> 2048) walsh_out + dalpha 79 -> 66,
# walsh_out 38 -> 36, walsh_in 37 -> 36, the layer 0.478 -> 0.464 ms; 172 lanes mixed:
# walsh_in 123 -> 114 and walsh_in + dbeta 201 -> 196, but walsh_out 128 -> 150 and walsh_out
# + dalpha 270 -> 294 (layers 0.904 -> 0.909, 1.174 -> 1.180 ms). walsh-h-1b3 (blocks
# compiled, no CUDA graphs, one machine) trained at 128,948 / 129,134 tok/s with this rule,
# 129,091 with butterflies up to 64 lanes, 129,046 with butterflies everywhere: within noise,
# so the rule stays; the 125M's 64-lane MLP rows under butterflies were timed only on a noisy
# machine without CUDA graphs (inconclusive). `walsh bench layer` and `walsh bench train
# --transform-mix dot|butterflies` time either way at every width
BUTTERFLY_MAX_LANES = 32
BUTTERFLY_MAX_BLOCKS = 256  # the stages the kernel unrolls (``_transform``'s static_range(8))
# the widest one-chunk slab (``_slab``): 256 lanes were measured; 512 (an fp32 [32, 512] slab
# on 4 warps) were not
MAX_CHUNK = 256
# a group of layers that share their input (``walsh.kernels.walsh_group``: q, k, v; gate, up):
# at most three, and the tile of their walsh_out + dalpha pass, which holds a result and a sum
# per layer beside the slab (at OUT_TILE's 256 lanes that is 64 fp32 registers a tensor).
# Swept on an H200 (CUDA graphs, N = 16k, A = 32, bf16; docs/benchmarks.md, session 16), us
# at tiles of 64 / 128 / 256 lanes, 4 warps: 3 x 64 lanes 173 / 149 / 203, 2 x 64 lanes 137 /
# 117 / 110, 3 x 24 lanes 79 / 78 / 91
MAX_GROUP, GROUP_OUT_TILE = 3, 128
# the passes with SwiGLU's product inside (``walsh.kernels.walsh_swiglu``), keyed by the padded
# lanes (next_pow2 of the row width): walsh_in's warps, and the dx pass's (tile, warps,
# pipelining stages); the dx pass holds up, sigmoid(gate) and silu(gate) beside its result and
# sum, and spilled with 4 warps at 256 lanes (1026 us against 469). Swept on an H200 (CUDA
# graphs, N = 16k, A = 32, bf16; docs/benchmarks.md, session 17): walsh_in with 4 / 8 / 16
# warps at 172 lanes 267 / 236 / 227 us, 86 lanes 114 / 112 / 187, 64 lanes 57 / 58 / 96; the
# dx pass over tiles 128 / 256 x 4 / 8 / 16 warps x 0-3 stages, best 469 us at 172 lanes, 230
# at 86, 107 at 64 (the worst 1028, 805 and 178). Narrower rows take the plain passes' launch
SWIGLU_IN_WARPS = {256: 16, 128: 8, 64: 4}
SWIGLU_DX = {256: (256, 16, 3), 128: (128, 4, 0), 64: (256, 8, 1)}


def use_dot(a: int, lanes: int) -> bool:
    """Whether a pass on rows of ``lanes`` lanes of ``a`` blocks mixes them by a tensor-core dot
    with H (the kernels' ``USE_DOT``), or by butterflies (``BUTTERFLY_MAX_LANES``; the kernel
    unrolls their stages for up to ``BUTTERFLY_MAX_BLOCKS`` blocks)."""
    return a >= 16 and (lanes > BUTTERFLY_MAX_LANES or a > BUTTERFLY_MAX_BLOCKS)



@contextlib.contextmanager
def transform_mix(mix: str):
    """Within the block, the passes of ``walsh_impl=triton`` (``use_dot``'s callers; not the
    fused one-kernel layer) mix their A >= 16 blocks as ``mix`` says: "rule" by ``use_dot``'s
    rule as it stands, "dot" by the tensor-core dot at every width, "butterflies" by
    butterflies at every width (up to ``BUTTERFLY_MAX_BLOCKS`` blocks). For ``walsh bench
    layer`` and ``walsh bench train --transform-mix``, which time the choice at widths the rule
    was not measured on (the 1.3B's 64 and 172 lanes), both printed in their headers; never a
    model or training setting. Launches already traced (a compiled graph, a CUDA graph) keep
    the mix they were traced with."""
    global BUTTERFLY_MAX_LANES
    if mix not in TRANSFORM_MIXES:
        raise ValueError(f"transform mix {mix!r}: expected one of {', '.join(TRANSFORM_MIXES)}")
    saved = BUTTERFLY_MAX_LANES
    BUTTERFLY_MAX_LANES = {"rule": saved, "dot": 0, "butterflies": sys.maxsize}[mix]
    try:
        yield
    finally:
        BUTTERFLY_MAX_LANES = saved


def _slab(lanes: int, tile: int) -> tuple[int, int]:
    """(LB lanes per chunk, tokens per slab) for a tile of ``tile`` padded lanes."""
    lb = triton.next_power_of_2(lanes)
    if lb > tile and (lanes % tile == 0 or lb > min(2 * tile, MAX_CHUNK)):
        lb = tile  # chunks of the tile
    return lb, max(1, tile // lb)


def program_slabs(tokens: int, bt: int, n: int) -> int:
    """Slabs of ``bt`` tokens a looping program covers (a gain pass, the MLP's chained pass):
    ``tokens`` worth, but no more than ``n`` tokens fill. Past them a slab is masked whole:
    free on a GPU at the tables' 16k tokens, where the bound never binds, but Triton's
    interpreter pays for each, and tests run a few tokens (session 29: CI's interpreter ran
    the chain's 64 tokens a program at 16 tokens 2x slower per call)."""
    return max(1, min(tokens // bt, triton.cdiv(n, bt)))


def row_width(lanes: int) -> int:
    """Block-major row width for ``lanes`` lanes: a multiple of 8, so that bf16 rows start on
    16-byte boundaries, as cuBLAS's tensor-core GEMMs and vector loads want (the 1.3B FFN's 172
    lanes: a bmm over 344-byte rows ran at 3.6x its roofline, session 9)."""
    return -(-lanes // 8) * 8


def _launch_params(in_mode: bool, group: int, width: int, gain: bool, swiglu: bool,
                   rope: bool = False) -> tuple[int, int, int, int, int]:
    """(LB lanes per chunk, tokens per slab, warps, pipelining stages, tokens per program of a
    gain pass) of a pass: the tile and stages by mode (``ROPE_NARROW_STAGES`` for walsh_in +
    dbeta with RoPE on narrow rows; ``OUT_NARROW_TILE`` for one layer's walsh_out on narrow
    rows, and with ``GAIN_NARROW_TOKENS`` for its dx pass on narrower ones), a group's dx
    pass's tile (``GROUP_OUT_TILE``), and the SwiGLU passes' table entries
    (``SWIGLU_IN_WARPS``, ``SWIGLU_DX``)."""
    tile = IN_TILE if in_mode else OUT_TILE if group == 1 else GROUP_OUT_TILE
    tokens = GAIN_TOKENS
    if not in_mode and group == 1 and not swiglu:
        if gain and width <= GAIN_NARROW_LANES:
            tile, tokens = OUT_NARROW_TILE, GAIN_NARROW_TOKENS
        elif not gain and width <= OUT_NARROW_LANES:
            tile = OUT_NARROW_TILE
    warps, stages = TILE_WARPS, GAIN_STAGES[in_mode] if gain else 0
    if rope and in_mode and gain and width <= ROPE_NARROW_LANES:
        stages = ROPE_NARROW_STAGES
    if swiglu:  # SwiGLU's product inside: measured per padded width
        # int: a dict key cannot be a SymInt (compiled with dynamic shapes); the width is a
        # compile-time constant of the kernel (LP) anyway. Rows wider than MAX_CHUNK run in
        # chunks of at most that many lanes: they take its entry (not measured)
        key = min(triton.next_power_of_2(max(int(width), 1)), MAX_CHUNK)
        if in_mode:
            warps = SWIGLU_IN_WARPS.get(key, warps)
        else:
            tile, warps, stages = SWIGLU_DX.get(key, (tile, warps, stages))
    lb, bt = _slab(max(width, 1), tile)
    # a group's dx pass on a slab wider than its tile (172 lanes, 5504 input features, as one
    # chunk of 256; no preset has such a group: theirs are at 24, 32 and 64 lanes) holds a
    # result and P sums of that width: with 4 warps it spilled (H200, P = 2: 628 us, against
    # 423 us with 8). At the presets' widths 4 warps were faster (3 x 64 lanes 149 against
    # 181 us, 3 x 24 78 against 98) or within 4% (2 x 64: 117 against 113); single layers'
    # passes with 8 warps were at most 7% faster and up to 32% slower (session 16). Session 35
    # timed the 125M's group dx passes (24-lane rows, butterflies, whose 4-warp build spills
    # when compiled offline) at 8 warps in the model: walsh-h-125m 424,601 / 429,650 tok/s
    # against 440,940 / 435,583 with 4 (compiled blocks, no CUDA graphs, one machine)
    if group > 1 and not in_mode and lb * bt > tile:
        warps = 2 * TILE_WARPS
    return lb, bt, warps, stages, tokens


# the Walsh MLP's chained middle pass (``walsh.kernels.walsh_mlp``), keyed by (forward, padded
# lanes): (tile, warps, pipelining stages, tokens per program, chunked); a program loops over
# its tokens' slabs, pipelined by the stages (the forward too, unlike the plain passes). A
# chunked entry cuts a row wider than its tile into chunks of the tile over the grid, where
# ``_slab`` would make a row of between one and two tiles one slab of two tiles (88 lanes and
# a 64-lane tile: one 128-lane slab, 872.5 us a backward against 331.5, session 29; at 176
# lanes the 64-lane tile gives chunks either way: 192 lanes, 16 dead, against one 256-lane
# slab a token with 80 dead beside three transforms' values, which spilled); otherwise
# ``_slab`` picks. Swept on an H200 (N = 16k, A = 32, bf16, CUDA graphs; docs/benchmarks.md),
# us, against the passes apart (the group's two walsh_out and the SwiGLU walsh_in; the SwiGLU
# dx pass and the two walsh_in + dbeta):
# - session 28, tiles 128 / 256 / 512 x 4 / 8 / 16 warps (x 1 / 3 stages backward): 64 lanes
#   (the 125M) forward 105.3 against 131.7, backward 157.2 against 212.2; 88 (hidden 2816)
#   227.4 against 237.9, 309.6 against 426.1; 176 (the 1.3B) 511.3 against 485.6, 1027.6
#   against 816.4 (one 256-lane slab a token; its worst launches 10-15 ms);
# - session 29, lane chunks of 32 / 64 x 1-8 tokens a slab x 2 / 4 / 8 warps x 1-4 stages x
#   64-256 tokens a program: the backward at 176 lanes 496.3 in 64-lane chunks against 1024.2
#   as one slab; at 88 (the 350M's 86 lanes) 331.5 against 367.6; at 64 143.1 against 156.0
#   (one token of 64 lanes a slab, against two). The forward ran slower in chunks (176: 660.9
#   against 507.5; 88: 356.0 against 245.6) and keeps session 28's tiles, but now loops: one
#   slab a program took 507.9 / 245.0 / 104.2 at 176 / 88 / 64 lanes, 16-256 tokens a program
#   with 3 stages 387.5 (8 warps, 64 tokens) / 191.3 (4 warps, 16) / 99.4 (8 warps, 64).
#   The plain passes (walsh_in, walsh_out with or without RoPE, a group's walsh_in) looping
#   so (4 / 8 warps, 2 / 3 stages, 4 / 16 slabs a program) were slower at 24, 32 and 64 lanes
#   (walsh_out 17.4 -> 23.7 us at 24 lanes, with RoPE 22.7 -> 52.0), but for a group of 3's
#   walsh_in at 24 and 32 lanes (45.7 -> 43.7, 41.3 -> 39.0; 76.6 -> 77.0 at 64), too little
#   for a rule: they keep one slab a program.
# ``walsh bench launch`` (``pipeline.bench_launch``) re-runs such a sweep on the device at hand.
# Hence MLP_MAX_LANES (``walsh.layers.hadamard.fuse_mlp``): the MLP runs as one op on hidden
# rows of at most that many lanes, the widest measured (the 1.3B's 172, padded to 176); wider
# rows (up to the table's 256-lane key) were never timed chained, so they keep the two ops
MLP_CHAIN = {(True, 256): (128, 8, 3, 64, False), (True, 128): (128, 4, 3, 16, False),
             (True, 64): (128, 8, 3, 64, False), (False, 256): (64, 8, 4, 128, True),
             (False, 128): (64, 8, 3, 256, True), (False, 64): (64, 4, 4, 64, True)}
MLP_MAX_LANES = 176


def checked_launch(launch: tuple[int, int, int, int, int], kernel: str
                   ) -> tuple[int, int, int, int, int]:
    """A launch given in place of a table's (``walsh bench launch`` sweeps them): (LB lanes per
    chunk, tokens per slab, warps, stages, tokens per program), LB and the tokens per slab
    powers of two (the kernels' tl.arange extents)."""
    lb, bt = launch[:2]
    if lb < 1 or lb & (lb - 1) or bt < 1 or bt & (bt - 1):
        raise ValueError(f"{kernel} launch {tuple(launch)}: lanes per chunk and tokens per slab "
                         f"must be powers of two, got {lb} and {bt}")
    return launch


def mlp_chain_params(fwd: bool, width: int) -> tuple[int, int, int, int, int]:
    """(LB lanes per chunk, tokens per slab, warps, stages, tokens per program) of the MLP's
    chained pass on block-major rows of ``width`` lanes (``MLP_CHAIN``; narrower rows take the
    64-lane entry, wider ones MAX_CHUNK's)."""
    key = min(max(triton.next_power_of_2(max(int(width), 1)), 64), MAX_CHUNK)
    tile, warps, stages, tokens, chunked = MLP_CHAIN[(fwd, key)]
    lb, bt = _slab(max(width, 1), tile)
    if chunked and lb > tile:
        lb, bt = tile, 1
    return lb, bt, warps, stages, max(tokens, bt)
