"""The Walsh-Hadamard layer's two block transforms, each fused with its gain and layout change.

WalshLinear (``walsh.layers.hadamard``) computes, for x [N, A*n_in], alpha [A, n_in],
beta [A, n_out] and S = 1/sqrt(A), H the Sylvester Hadamard matrix (+-1):
    u = walsh_in(x, alpha)    [A, N, n_in]   u[h,i,j] = S sum_g H[h,g] alpha[g,j] x[i, g n_in + j]
    y = bmm(u, W^T)           [A, N, n_out]  the A small GEMMs (cuBLAS, batched)
    out = walsh_out(y, beta)  [N, A*n_out]   out[i, h n_out + j] = beta[h,j] S sum_g H[h,g] y[g,i,j]
Each transform is one kernel pass over tiles of whole tokens: read the [A, tokens, lanes] slab
once, scale, multiply by H on the tensor cores (``tl.dot``; A >= 16) or by broadcast sums
(A < 16), write in the other layout.
The naive references (``walsh_in_naive``, ``walsh_out_naive``) are the layer's ``blocks`` path
(``walsh.layers.hadamard``), re-exported here.

Backward reuses the forward kernel (H is symmetric, so each transform's adjoint is the other
one), with the gain's gradient summed in the same pass (``GAIN``): d walsh_in: dx = alpha *
walsh_out(du) and dalpha = sum_i x * walsh_out(du) (``walsh_out_gain_raw``: du and x read, dx
written); d walsh_out: dy = walsh_in(dout, beta) and dbeta = sum_i dout * z with z = S H y,
the forward's result before beta, taken as out / beta from the forward's own output
(``walsh_in_gain_raw``: dout and out read, dy written; each program divides its share by
beta). Each program writes its share of the sum (fp32) and a second kernel adds the shares in
a fixed order (``walsh.kernels.column_sum``): deterministic, no atomics.
Why out / beta: dbeta needs S H y, and the saved tensor that gives it has changed twice.
Until session 10 y was saved, and the backward recomputed S H y with a second tensor-core dot
on the block-major y, converted in registers to dout's token-major layout (2.0-3.8x its
roofline, session 9). Sessions 10-13 had walsh_out write z = S H y beside out, one more
[N, A*n_out] write per forward, saved instead of y. Since session 14 the op saves its output
out itself: out = beta * z is written anyway, and the consumers of the gate, up and value
projections (SwiGLU, attention) keep that very tensor for their own backward, so nothing more
is stored for them. Dividing by beta is as accurate as the saved z was: out rounds beta * z
once, so out / beta is z with the relative error of z rounded to the saved dtype (bf16 and fp32
at any beta; fp16 while beta * z stays in fp16's normal range: below it, fp16's subnormals
lose bits that z itself would have kept); the division (the GPU's fp32 divide, within 2 ulp)
is of each program's fp32 sum, not of each element. A lane whose beta is exactly 0 has
out = 0 there and no z to recover: its dbeta is 0 (the lane stays at 0; beta starts at 1 and
is not decayed, so training does not land on 0; a lane set to 0 by hand stays dead under
this path, where the ``blocks``, ``dense`` and ``fused`` paths would revive it). (Before
session 8 the sums were a third kernel reading the transform's output back, and dbeta's
walsh_out(y) a fourth that wrote it.)

Precision: the slab is held in fp32, products accumulate in fp32, and S and beta are applied in
fp32 before the one rounding to the output dtype (the naive butterfly rounds at each of its
log2(A) stages). The dot's operands (A >= 16) follow the input dtype:
- bf16: a bf16 ``tl.dot``. H (+-1) and bf16 inputs are exact in bf16; walsh_in rounds alpha * x
  to bf16 first, as the naive path does. Before session 11 this was a TF32 dot (alpha * x kept
  10 mantissa bits); bf16 operands take fewer registers (the TF32 slabs spilled at 172 lanes),
  and on an H200 the plain transforms and walsh_out + dalpha took 3-11% less time, walsh_in +
  dbeta 21-28% less with its 3-stage loop (``GAIN_STAGES``; docs/benchmarks.md, session 11).
  Under the Triton interpreter (CI) the same bf16-rounded operands go through an fp32 dot
  (``_bf16_values``): the interpreter's bf16 dot multiplies the raw bits (triton 3.9).
- fp16: a TF32 dot (fp16 values are exact in TF32, not in bf16).
- fp32: an IEEE dot (no TF32): fp32 matches the reference to ~1e-7.
dbeta sums dout times the saved out, in the input dtype (bf16 in training), and divides by beta
in fp32: z to the precision of bf16, as the naive path has it (its autograd saves the bf16
S H y), where the second dot had used S H y in fp32 (session 10 measured the two dbeta 1.6e-3
apart, relative, at 16k tokens).

Code order: naive references, kernels, launchers, autograd (ops), functional.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from walsh.kernels.column_sum import column_sum
from walsh.kernels.registry import INTERPRETED, WIDE_NUMEL, kernel_op, wrap_triton

# the naive references (same signatures), re-exported beside their kernels
from walsh.layers.hadamard import walsh_in_naive, walsh_out_naive  # noqa: F401

# a program's slab holds a tile of padded lanes of every block: tile // LB tokens of LB =
# next_pow2(L) lanes, or one token's lanes in chunks of the tile when L > tile; a token of
# between one and two tiles' lanes and no whole number of tiles is one chunk of two tiles, up
# to MAX_CHUNK lanes (``_slab``: 172 lanes, the 1.3B FFN, as 256 rather than 128 + 44).
# Tiles of (128, 256) lanes x (4, 8) warps x (1, 2, 4) slabs per program were swept in CUDA
# graphs at 24, 64, 86, 172 and 256 lanes, transforms and gain passes (session 9,
# docs/benchmarks.md): 4 warps and one slab were best or within 3% everywhere; walsh_out (and
# walsh_out + dalpha) ran faster with 256-lane tiles at every width but 24 (6% slower there),
# walsh_in with 128 at all but 172. int32 offsets (below) took 2-13% off the transforms.
IN_TILE, OUT_TILE, TILE_WARPS = 128, 256, 4


def gain_grad_naive(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    """a, b [N, A*L] -> fp32 [A, L] = sum over tokens of a * b: the gradient of a per-lane gain
    (alpha or beta) given the upstream gradient and the tensor it multiplied."""
    return (a.float() * b.float()).sum(0).view(blocks, -1)


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _hadamard(A: tl.constexpr, LOG_A: tl.constexpr):
    """H [A, A] fp32 with H[h, g] = (-1)^popcount(h & g), built in registers."""
    bits = tl.arange(0, A)[:, None] & tl.arange(0, A)[None, :]
    par = tl.zeros([A, A], dtype=tl.int32)
    for b in tl.static_range(LOG_A):
        par += (bits >> b) & 1
    return 1.0 - 2.0 * (par & 1).to(tl.float32)


@triton.jit
def _bf16_values(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32: the interpreter's
    stand-in for a bf16 dot's operand. Under TRITON_INTERPRET=1 (triton 3.9) a bf16 ``tl.dot``
    multiplies the raw bits and ``.to(tl.bfloat16)`` truncates, where the GPU rounds to
    nearest. Bit arithmetic on the fp32 pattern (finite x): add half an ulp of bf16, less one
    unless the kept last bit is odd, and clear the low 16 bits. A NaN whose low 16 bits are set
    would come out wrong; the operands here are bf16 values times a bf16 gain (exact in fp32),
    whose NaNs have those bits clear."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _transform(x, h_mat, inv_sqrt_a, A: tl.constexpr, BT: tl.constexpr, LB: tl.constexpr,
               USE_DOT: tl.constexpr, IEEE: tl.constexpr, BF16_DOT: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """[A, BT, LB] fp32 -> S H x along axis 0, fp32."""
    x2 = tl.reshape(x, [A, BT * LB])
    if USE_DOT:
        if BF16_DOT:  # bf16 inputs: x rounded to bf16 (+-1 is exact), fp32 accumulation
            if INTERPRETED:  # the same products, through an fp32 dot (see _bf16_values)
                y = tl.dot(h_mat, _bf16_values(x2), input_precision="ieee")
            else:
                y = tl.dot(h_mat.to(tl.bfloat16), x2.to(tl.bfloat16))  # [A, BT * LB]
        elif IEEE:  # fp32 inputs: exact products, no TF32
            y = tl.dot(h_mat, x2, input_precision="ieee")
        else:  # fp16 inputs: +-1 and fp16 values are exact in TF32, so TF32 loses nothing
            y = tl.dot(h_mat, x2, input_precision="tf32")
    else:
        y = tl.sum(h_mat[:, :, None] * x2[None, :, :], axis=1)
    # S cast to fp32: compiled, inductor passes Python floats as fp64
    return tl.reshape(y, [A, BT, LB]) * tl.cast(inv_sqrt_a, tl.float32)


@triton.jit
def _pick(a, b, c, p: tl.constexpr):
    """The p-th of three values (p a compile-time constant): a group member's gain, source
    or sum. Those past the group's size are never defined and never picked."""
    if p == 0:
        r = a
    elif p == 1:
        r = b
    else:
        r = c
    return r


@triton.jit
def _walsh_kernel(src_ptr, src1_ptr, src2_ptr, dst_ptr, scale_ptr, other_ptr, part_ptr, N,
                  ITERS, inv_sqrt_a, A: tl.constexpr, LOG_A: tl.constexpr, L: tl.constexpr,
                  LP: tl.constexpr, LB: tl.constexpr, BT: tl.constexpr, P: tl.constexpr,
                  IN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, GAIN: tl.constexpr,
                  USE_DOT: tl.constexpr, IEEE: tl.constexpr, BF16_DOT: tl.constexpr,
                  INTERPRETED: tl.constexpr, WIDE: tl.constexpr, STAGES: tl.constexpr):
    """ITERS consecutive [A, BT, LB] slabs: BT whole tokens each (program axis 0) times a chunk
    of LB lanes (axis 1; LB a power of 2; token-major lanes past L neither read nor written)
    of every block.
    IN_MODE: src token-major x[i, g*L + j], dst block-major u[h, i, j], alpha[g, j] before H;
    else src block-major y[g, i, j], dst token-major out[i, h*L + j], beta[h, j] after H.
    Block-major rows are LP >= L lanes wide: lanes L..LP-1 are written as zeros (IN_MODE), or
    read (16-byte runs) into result lanes that are never stored or summed.
    GAIN: also the gain gradient sum_i T[i, h*L + j] * Z[i, h*L + j] of two token-major
    tensors, this program's share written to part[program 0, h*L + j] (fp32): in IN_MODE
    T = src (before the scale) and Z = other / scale (other = the forward's out = beta * z; the
    share is divided, 0 where the scale is 0), or Z = other without a scale; else T = other
    and Z = S H src (the result before the scale).
    Offsets are affine in (g, i, j) with L a compile-time constant, so each token's lanes (and
    each block's run of tokens) are read and written as contiguous runs. Offsets are int64
    only when a tensor has 2**31 elements or more (``WIDE``): int32 index math is cheaper.
    STAGES: the token loop's software-pipelining depth (``tl.range``), 0 for the compiler's
    default (``GAIN_STAGES``).
    P (1-3): a group of P layers that share their input (``walsh.kernels.walsh_group``), with
    P gains scale [P, A, L]. IN_MODE: the x slab is read once and P results written, u[p] at
    dst + p * N * A * LP; GAIN needs P = 1. Else: the P block-major sources src, src1, src2
    are read in turn and one result written, out = sum_p scale[p] * S H src_p (the group's
    dx); GAIN: part[program 0, p, h*L + j] = sum_i other * (S H src_p) for each p."""
    g = tl.arange(0, A)[:, None, None]                                 # [A, 1, 1]
    j = (tl.program_id(1) * LB + tl.arange(0, LB))[None, None, :]      # [1, 1, LB]
    g64 = g.to(tl.int64) if WIDE else g
    if HAS_SCALE:  # the P gains [P, A, L] -> [A, 1, LB] each (hoisted out of the token loop)
        s0 = tl.load(scale_ptr + g * L + j, mask=j < L, other=0.0).to(tl.float32)
        s1 = s0  # stand-ins past the group's size (never picked)
        s2 = s0
        if P > 1:
            s1 = tl.load(scale_ptr + (A + g) * L + j, mask=j < L, other=0.0).to(tl.float32)
        if P > 2:
            s2 = tl.load(scale_ptr + (2 * A + g) * L + j, mask=j < L, other=0.0).to(tl.float32)
    # one group member's block-major plane, A * N * LP elements
    plane = (N.to(tl.int64) if WIDE else N) * (A * LP)
    h_mat = _hadamard(A, LOG_A)                                        # [A, A]
    acc0 = tl.zeros([A, BT, LB], dtype=tl.float32)  # GAIN's sums, one per group member
    acc1 = acc0  # stand-ins past the group's size (never picked)
    acc2 = acc0
    if P > 1:
        acc1 = tl.zeros([A, BT, LB], dtype=tl.float32)
    if P > 2:
        acc2 = tl.zeros([A, BT, LB], dtype=tl.float32)
    for it in tl.range(0, ITERS, num_stages=STAGES if STAGES > 0 else None):
        i = ((tl.program_id(0) * ITERS + it) * BT + tl.arange(0, BT))[None, :, None]  # [1, BT, 1]
        mask = (i < N) & (j < L)                                       # [1, BT, LB]
        i64 = i.to(tl.int64) if WIDE else i
        token_major = i64 * (A * L) + g64 * L + j                      # [A, BT, LB]
        block_major = g64 * N * LP + i64 * LP + j
        if GAIN:  # T * Z's token-major operand (IN_MODE: Z = other / scale; else T = other)
            o = tl.load(other_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
        if IN_MODE:
            x = tl.load(src_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            if GAIN:  # T = x before alpha
                acc0 += x * o
            for p in tl.static_range(P):
                xs = x
                if HAS_SCALE:
                    xs = x * _pick(s0, s1, s2, p)
                y = _transform(xs, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT,
                               INTERPRETED)                            # [A, BT, LB]
                # block-major rows take the padding lanes' zeros too
                tl.store(dst_ptr + p * plane + block_major, y.to(dst_ptr.dtype.element_ty),
                         mask=(i < N) & (j < LP))
        else:
            for p in tl.static_range(P):
                # block-major rows are read with their padding lanes (j < LP): a mask of
                # j < L would split each row into runs of gcd(L, 8) lanes (4 at the 1.3B FFN's
                # 172, 2 at the 350M's 86), where LP's rows are 16-byte runs. The transform
                # mixes blocks, never lanes, so whatever the padding holds stays in lanes past
                # L, which are never stored or summed. Measured on an H200 (session 13,
                # docs/benchmarks.md), bit-equal: walsh_out + dalpha 260 -> 226 us at 172
                # lanes, 139 -> 116 us at 86
                src = _pick(src_ptr, src1_ptr, src2_ptr, p)
                x = tl.load(src + block_major, mask=(i < N) & (j < LP),
                            other=0.0).to(tl.float32)                  # [A, BT, LB]
                y = _transform(x, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT,
                               INTERPRETED)
                if GAIN:  # Z = S H src_p, before the scale
                    if p == 0:
                        acc0 += o * y
                    if p == 1:
                        acc1 += o * y
                    if p == 2:
                        acc2 += o * y
                if HAS_SCALE:
                    y = y * _pick(s0, s1, s2, p)
                if p == 0:
                    total = y
                else:
                    total += y
            tl.store(dst_ptr + token_major, total.to(dst_ptr.dtype.element_ty), mask=mask)
    if GAIN:  # [A, LB]: masked tokens added zeros; lanes past L (0 * padding, maybe NaN) unstored
        gj = tl.reshape(g, [A, 1])
        jj = tl.reshape(j, [1, LB])
        row = tl.program_id(0).to(tl.int64) * (P * A * L)  # once per program: int64 either way
        for p in tl.static_range(P):
            share = tl.sum(_pick(acc0, acc1, acc2, p), axis=1)         # [A, LB]
            if IN_MODE and HAS_SCALE:  # sum dout * out / beta: z's share (0 where beta is 0)
                s2d = tl.reshape(s0, [A, LB])
                share = tl.where(s2d != 0.0, share / tl.where(s2d != 0.0, s2d, 1.0), 0.0)
            tl.store(part_ptr + row + (p * A + gj) * L + jj, share, mask=jj < L)


# -- launcher ---------------------------------------------------------------------------------
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


def _slab(lanes: int, tile: int) -> tuple[int, int]:
    """(LB lanes per chunk, tokens per slab) for a tile of ``tile`` padded lanes."""
    lb = triton.next_power_of_2(lanes)
    if lb > tile and (lanes % tile == 0 or lb > min(2 * tile, MAX_CHUNK)):
        lb = tile  # chunks of the tile
    return lb, max(1, tile // lb)


def row_width(lanes: int) -> int:
    """Block-major row width for ``lanes`` lanes: a multiple of 8, so that bf16 rows start on
    16-byte boundaries, as cuBLAS's tensor-core GEMMs and vector loads want (the 1.3B FFN's 172
    lanes: a bmm over 344-byte rows ran at 3.6x its roofline, session 9)."""
    return -(-lanes // 8) * 8


def _launch(src: torch.Tensor, scale: torch.Tensor | None, a: int, lanes: int, n_tok: int,
            in_mode: bool, out: torch.Tensor | None = None, other: torch.Tensor | None = None,
            width: int | None = None, group: int = 1, more: tuple[torch.Tensor, ...] = ()
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dst, fp32 partial sums [rows, group * A*L] of the gain gradient or None without
    ``other``); ``width``: the block-major tensors' row width (>= lanes; default lanes);
    ``other``: the gain's token-major [N, A*L] operand. ``group`` > 1 (``_walsh_kernel``'s P):
    scale is [group, A, L]; in_mode writes dst [group, A, N, width]; else the sources are src
    and ``more`` (group in all, each [A, N, width])."""
    if not 1 <= group <= MAX_GROUP or (not in_mode and len(more) != group - 1) or (
            in_mode and (more or (group > 1 and other is not None))):
        raise ValueError(f"a group of {group} layers (at most {MAX_GROUP}) needs one source "
                         "per layer without a gain gradient (walsh_in) or with (walsh_out); got "
                         f"{1 + len(more)} sources, gain gradient {other is not None}")
    srcs = [t.contiguous() for t in (src, *more)]
    width = lanes if width is None else width
    if width < lanes:
        raise ValueError(f"block-major rows of {width} lanes cannot hold {lanes}")
    if not in_mode and any(tuple(t.shape) != (a, n_tok, width) for t in srcs):
        raise ValueError(f"block-major sources must be {(a, n_tok, width)} for {n_tok} tokens, "
                         f"got {[tuple(t.shape) for t in srcs]}")
    shape = (a, n_tok, width) if in_mode else (n_tok, a * lanes)
    shape = (group, *shape) if in_mode and group > 1 else shape
    dst = torch.empty(shape, device=src.device, dtype=src.dtype) if out is None else out
    if dst.shape != shape or not dst.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(shape)} tensor, got {tuple(dst.shape)}")
    tile = IN_TILE if in_mode else OUT_TILE if group == 1 else GROUP_OUT_TILE
    lb, bt = _slab(max(width, 1), tile)
    # a group's dx pass on a slab wider than its tile (172 lanes, 5504 input features, as one
    # chunk of 256; no preset has such a group: theirs are at 24, 32 and 64 lanes) holds a
    # result and P sums of that width: with 4 warps it spilled (H200, P = 2: 628 us, against
    # 423 us with 8). At the presets' widths 4 warps were faster (3 x 64 lanes 149 against
    # 181 us, 3 x 24 78 against 98) or within 4% (2 x 64: 117 against 113); single layers'
    # passes with 8 warps were at most 7% faster and up to 32% slower (session 16)
    warps = 2 * TILE_WARPS if group > 1 and not in_mode and lb * bt > tile else TILE_WARPS
    chunks = triton.cdiv(width, lb)
    iters = 1 if other is None else max(1, GAIN_TOKENS // bt)
    rows = triton.cdiv(n_tok, bt * iters)
    part = None
    if other is not None:  # read beside src: token-major, src's dtype
        want = (n_tok, a * lanes)
        if tuple(other.shape) != want or other.dtype != src.dtype:
            raise ValueError(f"the gain's other operand must be {want} {src.dtype}, got "
                             f"{tuple(other.shape)} {other.dtype}")
        # every entry written (masked lanes past L are not entries); no rows without tokens
        part = torch.empty(rows, group * a * lanes, device=src.device, dtype=torch.float32)
    want = (a, lanes) if group == 1 else (group, a, lanes)
    if scale is not None and tuple(scale.shape) != want:
        raise ValueError(f"the gain must be {want} for {lanes} lanes of {a} blocks, got "
                         f"{tuple(scale.shape)}")
    if n_tok * width == 0:
        return dst, part
    # unused pointers get empties of their own, never aliases of used ones
    def arg(t, dtype=src.dtype):
        return t.contiguous() if t is not None else src.new_empty(0, dtype=dtype)

    srcs += [arg(None) for _ in range(MAX_GROUP - len(srcs))]
    wrap_triton(_walsh_kernel)[(rows, chunks)](
        *srcs, dst, arg(scale), arg(other), arg(part, torch.float32), n_tok, iters,
        1.0 / math.sqrt(a), A=a, LOG_A=int(math.log2(a)), L=lanes, LP=width, LB=lb, BT=bt,
        P=group, IN_MODE=in_mode, HAS_SCALE=scale is not None, GAIN=other is not None,
        USE_DOT=a >= 16, IEEE=src.dtype == torch.float32, BF16_DOT=src.dtype == torch.bfloat16,
        INTERPRETED=INTERPRETED, WIDE=group * n_tok * a * width >= WIDE_NUMEL,
        STAGES=GAIN_STAGES[in_mode] if other is not None else 0, num_warps=warps)
    return dst, part


def _check(name: str, t: torch.Tensor, scale: torch.Tensor) -> None:
    a = scale.shape[0]
    if a < 2 or a & (a - 1):
        raise ValueError(f"{name}: blocks must be a power of two >= 2, got {a}")
    if scale.dtype != t.dtype:
        raise ValueError(f"{name}: gain dtype {scale.dtype} != input dtype {t.dtype}")


def walsh_in_raw(x: torch.Tensor, alpha: torch.Tensor | None, a: int,
                 out: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """[N, A*L] -> [A, N, width] (no autograd; width >= L, default L, lanes past L zeros);
    ``out``: a buffer to write into (tests poison it)."""
    lanes = x.shape[-1] // a
    return _launch(x, alpha, a, lanes, x.shape[0], in_mode=True, out=out, width=width)[0]


def walsh_out_raw(y: torch.Tensor, beta: torch.Tensor | None, a: int,
                  out: torch.Tensor | None = None, lanes: int | None = None) -> torch.Tensor:
    """[A, N, W] -> [N, A*L] from the first L = ``lanes`` (default W) lanes of each row (no
    autograd)."""
    lanes = y.shape[2] if lanes is None else lanes
    return _launch(y, beta, a, lanes, y.shape[1], in_mode=False, out=out, width=y.shape[2])[0]


def walsh_in_gain_raw(x: torch.Tensor, alpha: torch.Tensor | None, fwd: torch.Tensor, a: int,
                      out: torch.Tensor | None = None, width: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(walsh_in_raw(x, alpha, width=width), fp32 [A, L] sum over tokens of x * fwd / alpha)
    in one pass, fwd token-major like x (without alpha: sum x * fwd): a walsh_out's backward,
    dy and dbeta from dout = x, beta = alpha and the forward's output fwd = beta * S H y
    (lanes where beta is 0 get 0: the module doc)."""
    lanes = x.shape[-1] // a
    dst, part = _launch(x, alpha, a, lanes, x.shape[0], in_mode=True, out=out, other=fwd,
                        width=width)
    return dst, column_sum(part).view(a, lanes)


def walsh_out_gain_raw(y: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor, a: int,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(walsh_out_raw(y, scale), fp32 [A, L] sum over tokens of x * walsh_out_raw(y, None)) in
    one pass: a walsh_in's backward, dx = alpha * S H du and dalpha from du = y, alpha = scale
    and the saved input x [N, A*L]; y's rows may be wider than L (what lies past L reaches no
    result)."""
    lanes = x.shape[-1] // a
    dst, part = _launch(y, scale, a, lanes, y.shape[1], in_mode=False, out=out, other=x,
                        width=y.shape[2])
    return dst, column_sum(part).view(a, lanes)


# -- autograd: ops (``walsh.kernels.registry``) --------------------------------------------------
# The gains' gradients are computed inside ops (the transforms' backward passes below). Written
# as torch ops (a product, a sum over N, a view to [A, L]) inside the backward, the compiled
# backward under torch 2.11 returned a flat [A*L] gradient once N reached 16k tokens
# ("CompiledFunctionBackward returned an invalid gradient ... got [768] but expected [32, 24]";
# 2k and 4k tokens passed); as ops they did not. The cause inside inductor was not pinned down.
def _walsh_in_fake(x, alpha):
    a = alpha.shape[0]
    return x.new_empty(a, x.shape[0], x.shape[1] // a)


@kernel_op("walsh::walsh_in", _walsh_in_fake)
def _walsh_in_op(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return walsh_in_raw(x, alpha, alpha.shape[0])


def _in_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _in_backward(ctx, du):
    x, alpha = ctx.saved_tensors
    # the op (not the raw launcher), so that compile can trace the backward with fake tensors
    dx, dalpha = _walsh_out_gain_op(du, alpha, x)  # alpha * S H du, sum x * S H du
    return dx, dalpha.to(alpha.dtype)


_walsh_in_op.register_autograd(_in_backward, setup_context=_in_setup)


def _walsh_out_fake(y, beta):
    return y.new_empty(y.shape[1], y.shape[0] * beta.shape[1])


@kernel_op("walsh::walsh_out", _walsh_out_fake)
def _walsh_out_op(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return walsh_out_raw(y, beta, beta.shape[0], lanes=beta.shape[1])


def _out_setup(ctx, inputs, output):
    ctx.width = inputs[0].shape[2]  # dy's rows are as wide as y's
    ctx.save_for_backward(output, inputs[1])  # out (= beta * S H y) for dbeta, not y


def _out_backward(ctx, dout):
    out, beta = ctx.saved_tensors
    # S H (beta dout), sum dout * out / beta
    dy, dbeta = _walsh_in_gain_op(dout, beta, out, ctx.width)
    return dy, dbeta.to(beta.dtype)


_walsh_out_op.register_autograd(_out_backward, setup_context=_out_setup)


# the backward passes: a transform with its gain's gradient in the same pass (no autograd)
def _walsh_in_gain_fake(x, alpha, fwd, width):
    a, lanes = alpha.shape
    return (x.new_empty(a, x.shape[0], width), x.new_empty(a, lanes, dtype=torch.float32))


@kernel_op("walsh::walsh_in_gain", _walsh_in_gain_fake)
def _walsh_in_gain_op(x: torch.Tensor, alpha: torch.Tensor, fwd: torch.Tensor, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return walsh_in_gain_raw(x, alpha, fwd, alpha.shape[0], width=width)


def _walsh_out_gain_fake(y, scale, x):
    a = scale.shape[0]
    return (y.new_empty(y.shape[1], x.shape[1]),  # x's lanes (y's rows may be wider)
            y.new_empty(a, x.shape[1] // a, dtype=torch.float32))


@kernel_op("walsh::walsh_out_gain", _walsh_out_gain_fake)
def _walsh_out_gain_op(y: torch.Tensor, scale: torch.Tensor, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return walsh_out_gain_raw(y, scale, x, scale.shape[0])


# -- functional -------------------------------------------------------------------------------
def walsh_in(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x [N, A*L], alpha [A, L] (x's dtype) -> u [A, N, L] = S H (alpha * x) per token."""
    _check("walsh_in", x, alpha)
    return _walsh_in_op(x, alpha)


def walsh_out(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """y [A, N, L], beta [A, L] (y's dtype) -> out [N, A*L] = beta * (S H y), token-major
    (saved for dbeta: an in-place change of it before the backward raises autograd's error)."""
    _check("walsh_out", y, beta)
    if y.ndim != 3 or beta.shape[1] != y.shape[2]:
        raise ValueError(f"walsh_out: y {tuple(y.shape)} and beta {tuple(beta.shape)} do not fit "
                         "y [A, N, L], beta [A, L]")
    return _walsh_out_op(y, beta)
