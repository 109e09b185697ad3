"""The Walsh-Hadamard layer as one op (forward and backward), in three kernels or in one.

WalshLinear (``walsh.layers.hadamard``) computes, for x [N, A*LI], the effective weight
w [A, LO, LI], alpha [A, LI], beta [A, LO] and S = 1/sqrt(A), H the Sylvester Hadamard matrix:
    out[i, h*LO + j] = beta[h, j] S sum_g H[h, g] sum_k w[g, j, k] u[g, i, k]
    u[g, i, k]       = S sum_g' H[g, g'] alpha[g', k] x[i, g'*LI + k]

Why one op: an op call costs host time in eager mode, and a 125M model on these kernels can
be bound by the host. Written as one op per transform, a layer made about 7 such calls per
training step; here it makes 2 (forward, backward) and every launch happens inside them. Under
torch.compile the ops are ``triton_op``s (``walsh.kernels.registry``): inductor launches the
kernels from its generated code. Measured on an H200 (docs/benchmarks.md, sessions 7-8), the
walsh-h-125m triton path ran at 0.60x dense on a fast host in either form (the custom-op form
at 261k and 137k tok/s on two lent hosts; CUDA graphs remove the host's share: 0.79x with the
session-8 backward, 0.81x with session 9's tiles, 0.84x with session 11's bf16 dots and 3-stage
gain pass, 0.87x with session 14's dbeta from the saved out, 0.85x without and 0.87x with
session 16's groups, ``walsh.kernels.walsh_group``, on another host, 0.90x with session 17's
SwiGLU product in the down projection, ``walsh.kernels.walsh_swiglu``, 0.92x in session 18,
0.99x with session 21's block GEMM kernels, ``walsh.kernels.block_matmul``: +10.0%, 1.00x
with session 22's RoPE backward at one pipelining stage, ``walsh_launch``: +1.0%, 1.02x with
session 26's gradient copy, 1.04x with session 27's du and dW in one pass: +3.0%);
walsh-h-1b3 (24 x 2048) at 1.81x in session 21, and 1.81-1.82x with RoPE inside q's and k's
passes (session 18,
``rope``: +1.0-2.1%), 1.78-1.80x with the SwiGLU product (session 17, against two dense runs
on its host; the change's own share +0.4-1.0%, the rest is the host), 1.74x with the groups
(session 16: +4.8% over 1.66x without them on one host; 1.73x in session 14, with 11 GiB less
peak memory from saving out instead of writing z; 1.31-1.36x in session 8, 1.50x in session
9, 1.56-1.58x in session 10, 1.64-1.66x in sessions 11-12, 1.65x in session 13).

Two ways to run it (``one_kernel``; the layer's ``walsh_impl`` picks: ``triton`` -> three,
``fused`` -> one):
- three kernels: ``walsh_in`` (alpha, H, layout change), one block GEMM over the A blocks
  (``walsh.kernels.block_matmul``: Triton on rows of up to 64 lanes, cuBLAS past them),
  ``walsh_out`` (H, beta, layout change) from ``walsh.kernels.walsh_transform``. The
  activations cross HBM four times (x, u, y, out). u and out are saved for the backward,
  whose two transforms also sum dbeta (= sum dout * out / beta, the module doc of
  ``walsh_transform`` says why) and dalpha in the same pass (``walsh_in_gain_raw``,
  ``walsh_out_gain_raw``), and whose two block GEMMs (du = dy W, dW = dy^T u) share one
  pass over dy where the rows allow (``block_matmul.block_mm_dual``: up to 96 lanes). The
  block-major u, y, du and dy have rows of the lanes rounded up to 8 (``row_width``; u's and
  dy's padding is zeros, y's and du's reaches no result) and the GEMM a zero-padded weight,
  so that every row starts 16-byte aligned.
- one kernel per token tile: one program owns BM tokens and BD output lanes of every block. It
  reads its x tile once per BC-lane chunk, applies alpha and H (an [A, A] tensor-core dot) in
  registers, multiplies by the weight tile with a batched dot over the A blocks
  ([A, BM, BC] @ [A, BC, BD], fp32 accumulation), and applies H, S and beta before the one
  store. HBM traffic is x, w and out, as for a dense layer; only x and w are saved. Measured
  on an H200, Triton's batched dot makes it slower than the three kernels (docs/benchmarks.md):
  6-18x its roofline. ncu (session 12, 768 -> 3072): 255 registers per thread with 1.9M
  local-memory spill requests and 139 KB of shared memory per program, so one program of 8
  warps per SM; memory units 63% busy (L1/TEX 67%), DRAM 11%. bf16 dots (in place of TF32)
  with retuned tiles took 10-16% off, not enough to keep.

The one-kernel backward uses the same kernel twice; H is symmetric, so the layer's adjoint is
the layer with the weight transposed and the gains swapped:
- dx = alpha * S H (w^T (S H (beta * dout))): the kernel on dout with w^T, pre-gain beta and
  post-gain alpha; it also writes per-tile partial sums of x * (dx before alpha) = dalpha.
- dbeta = sum_i dout * (S H w u): the forward recomputed without its store, with per-tile
  partial sums of dout * (out before beta).
- dw = sum_i dy_g^T u_g with dy = S H (beta * dout), u = S H (alpha * x): the two block-major
  transforms of ``walsh.kernels.walsh_transform`` (rows padded as the three-kernel path's) and
  one block GEMM (``block_matmul.block_mm_tn``, ``_weight_grad``); the three-kernel
  backward computes dw in its du pass instead (``backward_to_du``).
Partial sums are added in a fixed order (``walsh.kernels.column_sum``; no atomics), so every
gradient is deterministic; the three-kernel backward sums its three tables (dw, dbeta, dalpha)
in one launch. Nothing [N, out]-sized is saved for the backward: only x and the weight.

Precision: slabs in fp32, every dot of this kernel in TF32 for 16-bit inputs and IEEE for fp32.
bf16 weights are exact in TF32, and u is rounded to TF32's 10 mantissa bits where the unfused
path stores it in bf16 (7). The GEMM runs at the TF32 rate (half of bf16's), which is ample: the
layer does in*out/A multiply-adds per token and is bound by its bytes. (A bf16 dot would be
wrong under TRITON_INTERPRET=1 in triton 3.9, whose interpreter multiplies the raw bf16 bits;
CI tests the kernel there. The three-kernel path's transforms, which dw's backward here
shares, use bf16 dots for bf16 inputs since session 11, with an fp32 stand-in under the
interpreter: ``walsh_transform``'s precision notes. The output's bf16 store rounds to nearest
under the interpreter too, through ``walsh.kernels.bf16_round._stored``.)
The naive reference with the same signature is ``walsh_linear_naive`` (the ``blocks`` path).

Code order: naive reference, kernel, launchers, autograd (ops), functional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from walsh.kernels.bf16_round import _stored
from walsh.kernels.block_matmul import block_mm, block_mm_dual, block_mm_tn, dw_from_sum
from walsh.kernels.column_sum import column_sum, column_sums
from walsh.kernels.registry import INTERPRETED, kernel_op, wrap_triton
from walsh.kernels.walsh_transform import (
    _hadamard,
    row_width,
    walsh_in_gain_raw,
    walsh_in_raw,
    walsh_out_gain_raw,
    walsh_out_raw,
)
from walsh.layers.hadamard import walsh_in_naive, walsh_out_naive

# token rows per program, the most lanes per contraction chunk / output tile, warps per program
# (the best of a sweep on an H200, docs/benchmarks.md; 3 stages overflow shared memory at 2048)
BLOCK_M, MAX_LANES, NUM_WARPS, NUM_STAGES = 16, 32, 8, 2


def walsh_linear_naive(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
                       beta: torch.Tensor) -> torch.Tensor:
    """x [N, A*LI], w [A, LO, LI], alpha [A, LI], beta [A, LO] -> out [N, A*LO] (the layer's
    ``blocks`` path: transform, bmm, transform)."""
    u = walsh_in_naive(x, alpha)                                    # [A, N, LI]
    return walsh_out_naive(torch.bmm(u, w.transpose(1, 2)), beta)  # [N, A*LO]


# -- kernel -----------------------------------------------------------------------------------
@triton.jit
def _mix(h, t, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """H [A, A] (fp32, +-1) times t [A, X] (fp32) -> [A, X]."""
    if USE_DOT:
        if IEEE:
            r = tl.dot(h, t, input_precision="ieee")
        else:  # 16-bit data: TF32 keeps 10 mantissa bits, more than bf16's 7
            r = tl.dot(h, t, input_precision="tf32")
    else:  # A < 16: below the tensor cores' smallest tile
        r = tl.sum(h[:, :, None] * t[None, :, :], axis=1)
    return r


@triton.jit
def _walsh_linear_kernel(src_ptr, w_ptr, pre_ptr, post_ptr, dst_ptr, other_ptr, part_ptr,
                         N, LC, LD, w_sc, w_sd, inv_sqrt_a,
                         A: tl.constexpr, LOG_A: tl.constexpr, HAS_POST: tl.constexpr,
                         STORE: tl.constexpr, GAIN: tl.constexpr, USE_DOT: tl.constexpr,
                         IEEE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                         BD: tl.constexpr, INTERPRETED: tl.constexpr):
    """dst[i, h*LD + d] = post[h, d] S sum_g H[h, g] sum_c w[g, c, d] S (H (pre * src))[g, i, c]
    for BM tokens i and BD lanes d of every block h; src is token-major [N, A*LC], w [A, ., .]
    read through strides (w_sc along the contraction c, w_sd along d, LC*LD per block).
    GAIN: part[tile, h*LD + d] = sum over the tile's tokens of other[i, h*LD + d] * (the
    value before ``post``)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    g3 = tl.arange(0, A)[:, None, None]                               # [A, 1, 1]
    i3 = (pid_m * BM + tl.arange(0, BM))[None, :, None]               # [1, BM, 1]
    d3 = (pid_d * BD + tl.arange(0, BD))[None, None, :]               # [1, 1, BD]
    h_mat = _hadamard(A, LOG_A)                                       # [A, A]
    acc = tl.zeros([A, BM, BD], dtype=tl.float32)
    for c0 in range(0, LC, BC):
        c_row = (c0 + tl.arange(0, BC))[None, None, :]                # [1, 1, BC]
        s_mask = (i3 < N) & (c_row < LC) & (g3 < A)
        s = tl.load(src_ptr + i3.to(tl.int64) * (A * LC) + g3 * LC + c_row, mask=s_mask,
                    other=0.0).to(tl.float32)                        # [A, BM, BC]
        s = s * tl.load(pre_ptr + g3 * LC + c_row, mask=(c_row < LC) & (g3 < A),
                        other=0.0).to(tl.float32)
        u = tl.reshape(_mix(h_mat, tl.reshape(s, [A, BM * BC]), USE_DOT, IEEE), [A, BM, BC])
        u = u * tl.cast(inv_sqrt_a, tl.float32)  # compiled, inductor passes floats as fp64
        c_col = (c0 + tl.arange(0, BC))[None, :, None]                # [1, BC, 1]
        w_mask = (c_col < LC) & (d3 < LD) & (g3 < A)
        wt = tl.load(w_ptr + g3 * (LC * LD) + c_col * w_sc + d3 * w_sd, mask=w_mask,
                     other=0.0).to(tl.float32)                        # [A, BC, BD]
        if IEEE:
            acc = tl.dot(u, wt, acc, input_precision="ieee")          # [A, BM, BD]
        else:  # bf16 weights are exact in TF32; u is rounded to TF32 (finer than bf16)
            acc = tl.dot(u, wt, acc, input_precision="tf32")
    z = tl.reshape(_mix(h_mat, tl.reshape(acc, [A, BM * BD]), USE_DOT, IEEE), [A, BM, BD])
    z = z * tl.cast(inv_sqrt_a, tl.float32)
    o_mask = (i3 < N) & (d3 < LD) & (g3 < A)
    o_off = i3.to(tl.int64) * (A * LD) + g3 * LD + d3
    if GAIN:
        o = tl.load(other_ptr + o_off, mask=o_mask, other=0.0).to(tl.float32)
        p = tl.sum(o * z, axis=1)                                     # [A, BD]
        g2 = tl.arange(0, A)[:, None]
        d2 = (pid_d * BD + tl.arange(0, BD))[None, :]
        tl.store(part_ptr + pid_m * (A * LD) + g2 * LD + d2, p, mask=(d2 < LD) & (g2 < A))
    if STORE:
        if HAS_POST:
            z = z * tl.load(post_ptr + g3 * LD + d3, mask=(d3 < LD) & (g3 < A),
                            other=0.0).to(tl.float32)
        tl.store(dst_ptr + o_off, _stored(z, dst_ptr, INTERPRETED), mask=o_mask)


# -- launchers --------------------------------------------------------------------------------
def _tile(lanes: int, dtype: torch.dtype) -> int:
    """Lanes per tile: a power of two in [16, MAX_LANES] (16: the tensor cores' smallest K/N);
    16 for fp32 data, whose IEEE dots need twice the shared memory (32 lanes asked for 456 KiB
    on an H200, against 227 KiB)."""
    cap = 16 if dtype == torch.float32 else MAX_LANES
    return min(max(triton.next_power_of_2(lanes), 16), cap)


def _launch(src, w, pre, post, other, transpose_w: bool, store: bool, gain: bool,
            out: torch.Tensor | None = None):
    """Run the kernel over src [N, A*LC]; w [A, LO, LI] is used as [A, LI->LO] (forward) or,
    with ``transpose_w``, as [A, LO->LI]. Returns (dst [N, A*LD] or None, fp32 gain
    partial sums reduced to [A, LD] or None)."""
    a, lo, li = w.shape
    lc, ld = (lo, li) if transpose_w else (li, lo)
    w_sc, w_sd = (li, 1) if transpose_w else (1, li)
    n = src.shape[0]
    src, w = src.contiguous(), w.contiguous()
    dst = None
    if store:
        dst = torch.empty(n, a * ld, device=src.device, dtype=src.dtype) if out is None else out
        if dst.shape != (n, a * ld) or not dst.is_contiguous():
            raise ValueError(f"out must be a contiguous {(n, a * ld)} tensor, "
                             f"got {tuple(dst.shape)}")
    tiles = triton.cdiv(n, BLOCK_M)
    part = None
    if gain:  # every entry written by the kernel (no rows without tokens: column_sum gives 0)
        part = torch.empty(tiles, a * ld, device=src.device, dtype=torch.float32)
    if n > 0:
        bc, bd = _tile(lc, src.dtype), _tile(ld, src.dtype)
        def unused():  # a pointer the kernel never reads: its own empty, never an alias
            return src.new_empty(0)

        wrap_triton(_walsh_linear_kernel)[(tiles, triton.cdiv(ld, bd))](
            src, w, pre.contiguous(), post.contiguous() if post is not None else unused(),
            dst if store else unused(), other.contiguous() if gain else unused(),
            part if gain else unused(), n, lc, ld, w_sc, w_sd, 1.0 / math.sqrt(a),
            A=a, LOG_A=int(math.log2(a)), HAS_POST=post is not None, STORE=store, GAIN=gain,
            USE_DOT=a >= 16, IEEE=src.dtype == torch.float32, BM=BLOCK_M, BC=bc, BD=bd,
            INTERPRETED=INTERPRETED, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dst, (column_sum(part).view(a, ld) if gain else None)


def walsh_linear_raw(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The one-kernel forward (no autograd); ``out``: a buffer to write into (tests poison it)."""
    return _launch(x, w, alpha, beta, None, False, store=True, gain=False, out=out)[0]


def walsh_linear_dx_raw(dout, x, w, alpha, beta):
    """(dx [N, A*LI], dalpha fp32 [A, LI]): the kernel on dout with w^T, beta before, alpha
    after, and the partial sums of x * (dx before alpha)."""
    return _launch(dout, w, beta, alpha, x, True, store=True, gain=True)


def walsh_linear_dbeta_raw(dout, x, w, alpha):
    """dbeta fp32 [A, LO]: the forward recomputed without beta or a store, summed against dout."""
    return _launch(x, w, alpha, None, dout, False, store=False, gain=True)[1]


def walsh_linear_backward_raw(dout, x, w, alpha, beta):
    """The one-kernel path's backward: (dx [N, A*LI], dw [A, LO, LI], dalpha fp32 [A, LI],
    dbeta fp32 [A, LO]), recomputing from x alone."""
    dx, dalpha = walsh_linear_dx_raw(dout, x, w, alpha, beta)
    dbeta = walsh_linear_dbeta_raw(dout, x, w, alpha)
    a, lo, li = w.shape
    dy = walsh_in_raw(dout, beta, a, width=row_width(lo))             # [A, N, LOp]
    u = walsh_in_raw(x, alpha, a, width=row_width(li))                # [A, N, LIp]
    return dx, _weight_grad(dy, u, lo, li), dalpha, dbeta


def _weight_grad(dy: torch.Tensor, u: torch.Tensor, lo: int, li: int) -> torch.Tensor:
    """dw [A, LO, LI] = sum over tokens of dy_g^T u_g, one block GEMM over block-major dy
    [A, N, LOp] and u [A, N, LIp] whose rows may be padded (``row_width``, zeros past LO, LI)."""
    return _unpadded(block_mm_tn(dy, u), lo, li)            # block_mm_tn's [A, LOp, LIp]


def _unpadded(dw: torch.Tensor, lo: int, li: int) -> torch.Tensor:
    """A weight gradient [A, LOp, LIp] of padded rows -> [A, LO, LI]."""
    return dw if dw.shape[1:] == (lo, li) else dw[:, :lo, :li].contiguous()


def padded_weight(w: torch.Tensor) -> torch.Tensor:
    """w [A, LO, LI] -> [A, row_width(LO), row_width(LI)], zeros past (LO, LI): the three-kernel
    path's block-major rows are 16-byte multiples (``row_width``), so that the bmm's rows are
    aligned (cuBLAS ran the 1.3B FFN's 172-lane rows at 3.6x its roofline, session 9). u's and
    dy's padding lanes are zeros (written by the transforms), so the padded products add
    nothing to y, du or dw within (LO, LI); y's and du's own padding lanes reach no result."""
    lo, li = w.shape[1:]
    if row_width(lo) == lo and row_width(li) == li:
        return w
    return F.pad(w, (0, row_width(li) - li, 0, row_width(lo) - lo))


def three_kernel_forward(x, w, alpha, beta, up=None, rope=None):
    """The three-kernel forward: (out [N, A*LO], u [A, N, LIp]) with LIp the lanes rounded up
    to a multiple of 8 (``row_width``; u is zero past LI); y [A, N, LOp] is not kept. With
    ``up``, the layer's input is silu(x) * up (``walsh.kernels.walsh_swiglu``); with ``rope``
    (per-lane cos, sin [T, A*LO], ``rope_lanes``), out is rotated by RoPE in walsh_out's pass."""
    a, lo = w.shape[:2]
    wp = padded_weight(w)                                            # [A, LOp, LIp]
    u = walsh_in_raw(x, alpha, a, width=wp.shape[2], up=up)           # [A, N, LIp]
    y = block_mm(u, wp.transpose(1, 2))                               # [A, N, LOp]
    return walsh_out_raw(y, beta, a, lanes=lo, rope=rope), u          # [N, A*LO]


def three_kernel_backward(dout, x, w, alpha, beta, u, out, rope=None):
    """Its backward from the saved u and the forward's own out (H is symmetric: each
    transform's adjoint is the other one): (dx, dw, dalpha fp32, dbeta fp32). Each transform
    computes its gain's gradient in the same pass (``walsh_in_gain_raw``,
    ``walsh_out_gain_raw``): dbeta = sum dout * out / beta (= sum dout * S H y; 0 where beta
    is 0), dalpha = sum x * S H (W^T dy). ``rope``: out was rotated (dout is its gradient)."""
    a, lo, li = w.shape
    du, dw_part, dbeta_part = backward_to_du(dout, w, beta, out, u, rope)
    dx, dalpha_part = walsh_out_gain_raw(du, alpha, x, a, summed=False)  # [N, A*LI]
    dw, dbeta, dalpha = column_sums([dw_part, dbeta_part, dalpha_part])  # one launch
    return dx, layer_dw(dw, w, du.dtype), dalpha.view(a, li), dbeta.view(a, lo)


def backward_to_du(dout, w, beta, out, u, rope=None):
    """The three-kernel backward up to the input transform: (du [A, N, LIp], and the fp32
    partial tables of dw and dbeta), with dy, dbeta = walsh_in_gain(dout, beta, out), du = dy W
    (the padded weight) and dw = sum over tokens of dy^T u from the saved u, the two GEMMs in
    one pass over dy where the rows allow (``block_matmul.block_mm_dual``); shared with
    ``walsh.kernels.walsh_group``, ``walsh.kernels.walsh_swiglu`` and ``walsh.kernels.
    walsh_mlp`` (its down layer), whose layers end in their own dx pass. The caller sums the
    tables with its others in one launch (``column_sums``; dbeta's sum viewed as [A, LO], dw's
    through ``layer_dw``). ``rope``: out is RoPE-rotated and dout its gradient, both rotated
    back in the pass."""
    wp = padded_weight(w)                                            # [A, LOp, LIp]
    dy, dbeta_part = walsh_in_gain_raw(dout, beta, out, w.shape[0], width=wp.shape[1],
                                       rope=rope, summed=False)
    du, dw_part = block_mm_dual(dy, wp, u, summed=False)             # du [A, N, LIp]
    return du, dw_part, dbeta_part


def layer_dw(total: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``backward_to_du``'s dw table summed ([A*LOp*LIp] fp32, the padded weight's) -> dw
    [A, LO, LI] in dtype."""
    a, lo, li = w.shape
    return _unpadded(dw_from_sum(total, (a, row_width(lo), row_width(li)), dtype), lo, li)


# -- autograd: two ops per layer (``walsh.kernels.registry``: triton ops, whose launches
# inductor makes from its own code; opaque custom ops under the interpreter), so that eager mode
# pays the dispatcher (tens of microseconds of host time each) twice per layer, not once per
# kernel ----------------------------------------------------------------------------------
def _rope(cos, sin):
    """The ops' optional RoPE tables as the launchers take them."""
    return None if cos is None else (cos, sin)


def _linear_fake(x, w, alpha, beta, one_kernel, cos, sin):
    a, lo, li = w.shape
    n = x.shape[0]
    out = x.new_empty(n, a * lo)
    return out, x.new_empty(0) if one_kernel else x.new_empty(a, n, row_width(li))


@kernel_op("walsh::walsh_linear", _linear_fake)
def _linear_op(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               one_kernel: bool, cos: torch.Tensor | None, sin: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, u): u is the three-kernel path's intermediate, saved for its backward beside out;
    empty for the one-kernel path, whose backward recomputes from x. cos, sin: RoPE's tables
    (three kernels only), out rotated."""
    if one_kernel:
        return walsh_linear_raw(x, w, alpha, beta), x.new_empty(0)
    return three_kernel_forward(x, w, alpha, beta, rope=_rope(cos, sin))


def _linear_backward_fake(dout, x, w, alpha, beta, u, out, one_kernel, cos, sin):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(alpha), \
        torch.empty_like(beta)


@kernel_op("walsh::walsh_linear_backward", _linear_backward_fake)
def _linear_backward_op(dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        alpha: torch.Tensor, beta: torch.Tensor, u: torch.Tensor,
                        out: torch.Tensor, one_kernel: bool, cos: torch.Tensor | None,
                        sin: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if one_kernel:
        dx, dw, dalpha, dbeta = walsh_linear_backward_raw(dout, x, w, alpha, beta)
    else:
        dx, dw, dalpha, dbeta = three_kernel_backward(dout, x, w, alpha, beta, u, out,
                                                      _rope(cos, sin))
    return dx.to(x.dtype), dw.to(w.dtype), dalpha.to(alpha.dtype), dbeta.to(beta.dtype)


def _setup(ctx, inputs, output):
    x, w, alpha, beta, one_kernel, cos, sin = inputs
    ctx.one_kernel = one_kernel
    ctx.set_materialize_grads(False)  # u gets no gradient: no zero buffer of its size
    # out itself for dbeta (three kernels): the consumers of the gate, up and value projections
    # keep the same tensor for their own backward. The one-kernel path needs no out: its
    # empty u stands in, so that out is not kept alive for nothing
    ctx.save_for_backward(x, w, alpha, beta, output[1], output[1] if one_kernel else output[0],
                          cos, sin)  # RoPE's tables or None


def _backward(ctx, dout, _du):  # u is internal: its gradient is never used
    if dout is None:  # only u was used: nothing flows back
        return None, None, None, None, None, None, None
    *saved, cos, sin = ctx.saved_tensors
    dx, dw, dalpha, dbeta = _linear_backward_op(dout.contiguous(), *saved, ctx.one_kernel,
                                                cos, sin)
    return dx, dw, dalpha, dbeta, None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def walsh_linear(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 one_kernel: bool = False,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [N, A*LI], w [A, LO, LI], alpha [A, LI], beta [A, LO] (all x's dtype) -> [N, A*LO]:
    the twin of ``walsh_linear_naive``, differentiable in all four. ``one_kernel``: the whole
    forward in one kernel (saves only x and w for the backward) instead of three (saves u and
    the output itself, so an in-place change of the output before the backward raises
    autograd's error, as for any op that saves its result). ``rope``: RoPE's per-lane tables
    (cos, sin) [T, A*LO] at the tokens' positions (``walsh.layers.common.rope_lanes``: fp32,
    or fp16 for bf16 and fp16 data; x's rows are sequences of T tokens): the output rotated by
    RoPE, inside walsh_out's pass (three kernels only; its backward rotates back inside
    walsh_in's)."""
    a, lo, li = w.shape
    if rope is not None and one_kernel:
        raise ValueError("walsh_linear: rope runs on the three-kernel path, not one_kernel")
    if a < 2 or a & (a - 1):
        raise ValueError(f"walsh_linear: blocks must be a power of two >= 2, got {a}")
    if x.ndim != 2 or x.shape[1] != a * li or alpha.shape != (a, li) or beta.shape != (a, lo):
        raise ValueError(f"walsh_linear: shapes x {tuple(x.shape)}, w {tuple(w.shape)}, alpha "
                         f"{tuple(alpha.shape)}, beta {tuple(beta.shape)} do not fit "
                         "x [N, A*LI], w [A, LO, LI], alpha [A, LI], beta [A, LO]")
    for name, t in (("w", w), ("alpha", alpha), ("beta", beta)):
        if t.dtype != x.dtype:
            raise ValueError(f"walsh_linear: {name} dtype {t.dtype} != x dtype {x.dtype}")
    cos, sin = rope if rope is not None else (None, None)
    return _linear_op(x, w, alpha, beta, one_kernel, cos, sin)[0]
