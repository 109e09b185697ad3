"""The Walsh layers' per-block GEMMs on narrow rows: a Triton kernel where it beats cuBLAS.

The three-kernel Walsh layer (``walsh.kernels.walsh_linear``) and its groups
(``walsh.kernels.walsh_group``) do their A (or P*A) small GEMMs on block-major activations:
    forward  y  [G, N, LO] = u  [G, N, LI] @ W^T       W [G, LO, LI], the padded weight
    dx       du [G, N, LI] = dy [G, N, LO] @ W
    dw       dW [G, LO, LI] = dy^T @ u                  (summed over the N tokens)
with G blocks of a few dozen lanes (the 125M's 768 = 32 blocks of 24 lanes). They move
2 (LI + LO) bytes a token and block and do LI * LO multiply-adds, so they are bound by HBM.
Measured on an H200 at 16,384 tokens (docs/benchmarks.md, session 21, the table per shape):
cuBLAS's batched GEMM ran them at 2.1-2.6x their byte roofline at 24 -> 24 lanes (dW at
2.6-5.6x), these kernels at 1.16-1.3x (dW 1.9-2.1x, session 22's launch); at 24 -> 64 and
64 -> 24 the forward and dx took 8-17% less time than cuBLAS and dW 6-12% more or less; at
64 -> 64 the forward and dx about 5% less, dW 36% more. Hence the rule (``block_mm``,
``block_mm_tn``; fixed by shape, never by environment):
- y and du: Triton where both row widths are at most ``MM_MAX_LANES`` (64), cuBLAS past it
  (the 1.3B FFN's 176-lane rows: not measured with this kernel, whose whole row sits in
  registers);
- dW: Triton where both are at most ``TN_MAX_LANES`` (32), cuBLAS past it;
- the backward's du and dW together (``block_mm_dual``): one Triton pass where both row widths
  are at most ``DUAL_MAX_LANES`` (96), the two GEMMs above past it.

du and dW both read dy. ``_block_mm_dual_kernel`` reads each dy tile once for both: a program
owns one block and a split of the tokens, holds the block's weight, and per BT-token tile
stores du = dy W and adds dy^T u to its fp32 [M, K] partial sum (summed over splits by
``column_sum``, as dW alone). Bytes: dy, u read and du written, against the two GEMMs' dy
twice. Measured on an H200 (docs/benchmarks.md, session 27; N = 16,384, 32 blocks, bf16, CUDA
graphs; us, against the two kernels the rule above picks; dy rows of M lanes, u rows of K):
M = K = 24 34.8 against 43.8 (-21%), 32 35.1 against 45.8 (-23%), 64 69.6 against 75.8 (-8%);
M = 96, K = 24 53.3 against 83.1 (-36%); M = 24, K = 96 75.4 against 98.0 (-23%). At 64 and
176 lanes (the 1.3B FFN's down projection) an untuned launch took 207.5 against 160.5, so rows
past 96 keep the two GEMMs. The launch (``DUAL_SPLIT`` programs a block, 4 warps, 3 stages;
tiles of ``DUAL_NARROW_BT`` tokens on rows of at most ``DUAL_NARROW_LANES``, else ``DUAL_BT``)
was the best of 54 (splits 4-16, tiles 32-128, 4 or 8 warps, 2-4 stages) or within 1% of it
at 64 and 96 lanes, 2.4% off it at 24 (34.8 against 34.0 us), and the best of 16 at 32.
128-token tiles with 96-lane rows took 171.7 us: the [128, 128] fp32 du tile does not fit the
registers. With L2 flushed (``walsh bench layer --flush-l2``) the pass ran at 2.05x its
roofline at 768 -> 768 (0.037 ms against 0.048 for the two kernels), 1.62x at 768 -> 2048,
1.43x at 2048 -> 768, 1.47x at 2048 -> 2048.
In the models (CUDA graphs, the same host as the code before): walsh-h-125m 451,577-452,004
tok/s against 438,496 (+3.0%), walsh-h-350m 205,596 against 194,984 (+5.4%); walsh-h-1b3,
whose FFN rows (176 lanes) keep the two GEMMs, 1.82x dense as before.

In the model (H200, session 21, one process each, a fresh inductor cache each): walsh-h-125m
with CUDA graphs at 424,746 and 424,535 tok/s against 385,939 with cuBLAS for all three
(+10.0%; 0.99x dense-125m's 428,270); walsh-h-1b3 at 1.81x dense-1b3 (1.79x in session 19).

Compile's cache key holds the kernels' source (``walsh.kernels.registry``), not this module's
Python: after changing the rule's constants or launch shapes, clear the inductor cache
(``TORCHINDUCTOR_CACHE_DIR``), or a warm cache serves the graph compiled before the change
(measured: a cuBLAS run with the constants at 0 read the Triton run's 424k tok/s from the
warm cache, 386k from a fresh one).

The kernels: one program per BT tokens of one block; the block's whole [K, M] weight (at most
64 x 64; 96 x 96 in the one-pass du + dW kernel) is loaded once and the whole row of K lanes is
one ``tl.dot`` (fp32 accumulation, one rounding to the output dtype, as cuBLAS). dW (alone or
with du) splits the tokens over ``TN_SPLIT`` (``DUAL_SPLIT``) programs per block, each writing
an fp32 [M, K] partial sum, added in a fixed order by ``walsh.kernels.column_sum``:
deterministic, no atomics.

Precision: bf16 and fp16 operands go to the tensor cores as they are (fp32 accumulation); fp32
operands take an IEEE dot (no TF32), matching torch.bmm in fp32 to ~1e-7. Under the Triton
interpreter (CI) 16-bit operands are widened to fp32 (exact) for an IEEE dot: the
interpreter's bf16 dot multiplies the raw bits, and its cast to bf16 truncates where the GPU
rounds to nearest: the bf16 output is rounded first, as the transform kernel's are
(``walsh.kernels.bf16_round._stored``), without which the layer tests' bf16 errors rose from
0.0070 to 0.0095 on average (triton 3.9).

Code order: naive references, kernels, launchers, dispatch. No autograd here: the callers
are the Walsh ops' own forward and backward bodies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.bf16_round import _stored
from walsh.kernels.column_sum import column_sum
from walsh.kernels.registry import INTERPRETED, WIDE_NUMEL, wrap_triton

# the dispatch rule's row widths (lanes, module doc) and the launch shapes, swept on an H200:
# y and du: BT 128 or 256, 1 or 4 tiles a program, 2-8 warps (sessions 21 and 22: 128 tokens
# and 4 warps within 3% of each shape's best); dW: 4 to 128 programs a block, BT 32 to 128, 4 or
# 8 warps, 2 to 4 stages (session 22: 8 programs of 128-token tiles within 1-6% of each
# shape's best at 24 to 64 lanes, 1-16% under session 21's 64 programs of 64 tokens: fewer
# fp32 partials to write and sum; 4 programs a block was best on the larger shapes but leaves
# a 32-block layer 128 programs, under one wave of an H200's 132 SMs)
# MAX_LANES: what the y, du and dW kernels can hold (a whole row in registers); their rule's
# widths are at most that (the one-pass du + dW kernel's own limit is DUAL_MAX_LANES)
MAX_LANES = 64
MM_MAX_LANES, TN_MAX_LANES = 64, 32
MM_BT, MM_WARPS = 128, 4
TN_SPLIT, TN_BT, TN_WARPS, TN_STAGES = 8, 128, 4, 3
# du and dW in one pass (module doc): the rule's widest rows (also what the kernel takes) and
# its launch, swept at 24-96 lanes (session 27)
DUAL_MAX_LANES = 96
DUAL_SPLIT, DUAL_BT, DUAL_WARPS, DUAL_STAGES = 8, 64, 4, 3
DUAL_NARROW_LANES, DUAL_NARROW_BT = 32, 128


def block_mm_naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [G, N, K] @ b [G, K, M] -> [G, N, M] (torch.bmm)."""
    return torch.bmm(a, b)


def block_mm_tn_naive(d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d [G, N, M], u [G, N, K] -> d^T u [G, M, K], summed over the N tokens (torch.bmm)."""
    return torch.bmm(d.transpose(1, 2), u)


def block_mm_dual_naive(d: torch.Tensor, w: torch.Tensor, u: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """d [G, N, M], w [G, M, K], u [G, N, K] -> (du = d @ w [G, N, K], dW = d^T u [G, M, K]):
    the backward's two block GEMMs on one upstream gradient d (torch.bmm)."""
    return torch.bmm(d, w), torch.bmm(d.transpose(1, 2), u)


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32: IEEE for fp32 (and the interpreter's widened 16-bit) operands."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _first_row(g, N, WIDE: tl.constexpr):
    """Block g's first row, g * N: int64 for tensors of WIDE_NUMEL elements or more (every
    offset built on it is then int64), int32 below (cheaper index math)."""
    # one return (a compiled kernel refuses two of different types)
    return (g.to(tl.int64) if WIDE else g) * N


@triton.jit
def _block_mm_kernel(a_ptr, b_ptr, c_ptr, N, sb_g, sb_k, sb_m,
                     K: tl.constexpr, M: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                     BT: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    """c[g, t, :] = a[g, t, :] @ b[g] for this program's BT tokens t of block g = pid(1).
    a [G, N, K] and c [G, N, M] contiguous; b [G, K, M] through its strides (tiny: L2).
    c is stored through ``_stored`` (bf16 rounded to nearest under the interpreter too)."""
    g = tl.program_id(1)
    rt = tl.program_id(0) * BT + tl.arange(0, BT)                      # [BT] tokens
    rk = tl.arange(0, BK)                                              # [BK] lanes in
    rm = tl.arange(0, BM)                                              # [BM] lanes out
    b = tl.load(b_ptr + g * sb_g + rk[:, None] * sb_k + rm[None, :] * sb_m,
                mask=(rk[:, None] < K) & (rm[None, :] < M), other=0.0)  # [BK, BM]
    base = _first_row(g, N, WIDE)
    a = tl.load(a_ptr + (base + rt[:, None]) * K + rk[None, :],
                mask=(rt[:, None] < N) & (rk[None, :] < K), other=0.0)  # [BT, BK]
    c = _dot(a, b, tl.zeros([BT, BM], dtype=tl.float32), IEEE)         # [BT, BM] fp32
    tl.store(c_ptr + (base + rt[:, None]) * M + rm[None, :], _stored(c, c_ptr, INTERPRETED),
             mask=(rt[:, None] < N) & (rm[None, :] < M))


@triton.jit
def _block_mm_tn_kernel(d_ptr, u_ptr, part_ptr, N, TOK,
                        M: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                        BT: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr):
    """part[s, g] = sum over tokens [s*TOK, (s+1)*TOK) of d[g, t]^T u[g, t], fp32 [M, K], for
    split s = pid(0) of block g = pid(1); d [G, N, M], u [G, N, K] contiguous; TOK is a
    multiple of BT, so no tile crosses into the next split."""
    s = tl.program_id(0)
    g = tl.program_id(1)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    base = _first_row(g, N, WIDE)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for t0 in range(0, TOK, BT):
        rt = s * TOK + t0 + tl.arange(0, BT)                           # [BT] tokens
        ok = rt < N
        d = tl.load(d_ptr + (base + rt[None, :]) * M + rm[:, None],
                    mask=ok[None, :] & (rm[:, None] < M), other=0.0)   # [BM, BT]: d^T's tile
        u = tl.load(u_ptr + (base + rt[:, None]) * K + rk[None, :],
                    mask=ok[:, None] & (rk[None, :] < K), other=0.0)   # [BT, BK]
        acc = _dot(d, u, acc, IEEE)
    row0 = _first_row(s * tl.num_programs(1) + g, M, WIDE)            # part [S, G, M, K]
    tl.store(part_ptr + (row0 + rm[:, None]) * K + rk[None, :], acc,
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _block_mm_dual_kernel(d_ptr, w_ptr, u_ptr, du_ptr, part_ptr, N, TOK, sw_g, sw_m, sw_k,
                          M: tl.constexpr, K: tl.constexpr, BM: tl.constexpr,
                          BK: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr,
                          WIDE: tl.constexpr, STAGES: tl.constexpr,
                          INTERPRETED: tl.constexpr):
    """For split s = pid(0) of block g = pid(1), over tokens t in [s*TOK, (s+1)*TOK):
    du[g, t] = d[g, t] @ w[g] and part[s, g] = sum_t d[g, t]^T u[g, t] (fp32 [M, K]), each d
    tile read once for both. d [G, N, M], u and du [G, N, K] contiguous; w [G, M, K] through
    its strides (tiny: L2); TOK a multiple of BT (no tile crosses into the next split)."""
    s = tl.program_id(0)
    g = tl.program_id(1)
    rm = tl.arange(0, BM)                                              # [BM] lanes of d
    rk = tl.arange(0, BK)                                              # [BK] lanes of u, du
    w = tl.load(w_ptr + g * sw_g + rm[:, None] * sw_m + rk[None, :] * sw_k,
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # [BM, BK]
    base = _first_row(g, N, WIDE)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for t0 in tl.range(0, TOK, BT, num_stages=STAGES):
        rt = s * TOK + t0 + tl.arange(0, BT)                           # [BT] tokens
        ok = rt < N
        d = tl.load(d_ptr + (base + rt[:, None]) * M + rm[None, :],
                    mask=ok[:, None] & (rm[None, :] < M), other=0.0)   # [BT, BM]
        u = tl.load(u_ptr + (base + rt[:, None]) * K + rk[None, :],
                    mask=ok[:, None] & (rk[None, :] < K), other=0.0)   # [BT, BK]
        du = _dot(d, w, tl.zeros([BT, BK], dtype=tl.float32), IEEE)    # [BT, BK] fp32
        tl.store(du_ptr + (base + rt[:, None]) * K + rk[None, :],
                 _stored(du, du_ptr, INTERPRETED), mask=ok[:, None] & (rk[None, :] < K))
        acc = _dot(tl.trans(d), u, acc, IEEE)                          # [BM, BK]
    row0 = _first_row(s * tl.num_programs(1) + g, M, WIDE)            # part [S, G, M, K]
    tl.store(part_ptr + (row0 + rm[:, None]) * K + rk[None, :], acc,
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# -- launchers ---------------------------------------------------------------------------------
def _width(lanes: int) -> int:
    """A row's lanes as a power-of-two tile of at least 16 (the tensor cores' smallest K/N)."""
    return max(16, triton.next_power_of_2(lanes))


def _ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 or INTERPRETED


def _check(op: str, names: str, x: torch.Tensor, y: torch.Tensor, lead: tuple, layout: str,
           limit: int = MAX_LANES):
    """Refuse a second operand y whose leading dims are not ``lead`` or whose dtype is not x's,
    and rows (x's and y's last dims) wider than the kernel holds in registers (``limit``)."""
    if y.ndim != 3 or tuple(y.shape[:2]) != lead or y.dtype != x.dtype:
        raise ValueError(f"{op}: {names[1]} {tuple(y.shape)} {y.dtype} does not fit {names[0]} "
                         f"{tuple(x.shape)} {x.dtype} ({layout}, one dtype)")
    if max(x.shape[2], y.shape[2]) > limit:
        raise ValueError(f"{op}: rows of {x.shape[2]} and {y.shape[2]} lanes; the kernel holds "
                         f"whole rows of at most {limit} (wider: torch.bmm)")


def block_mm_raw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: a [G, N, K] @ b [G, K, M] -> [G, N, M] in a's dtype (b any strides,
    a made contiguous); ``block_mm_naive``'s signature, any K, M up to 64 lanes."""
    g, n, k = a.shape
    _check("block_mm", "ab", a, b, (g, k), "a [G, N, K], b [G, K, M]")
    m = b.shape[2]
    a = a.contiguous()
    c = torch.empty(g, n, m, device=a.device, dtype=a.dtype)
    if n * g > 0:
        wide = max(a.numel(), c.numel()) >= WIDE_NUMEL
        wrap_triton(_block_mm_kernel)[(triton.cdiv(n, MM_BT), g)](
            a, b, c, n, b.stride(0), b.stride(1), b.stride(2), K=k, M=m, BK=_width(k),
            BM=_width(m), BT=MM_BT, IEEE=_ieee(a), WIDE=wide,
            INTERPRETED=INTERPRETED, num_warps=MM_WARPS)
    return c


def block_mm_tn_raw(d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: d [G, N, M], u [G, N, K] -> d^T u [G, M, K] in d's dtype (fp32 sums
    over the tokens, one rounding); ``block_mm_tn_naive``'s signature, M and K up to 64."""
    g, n, m = d.shape
    _check("block_mm_tn", "du", d, u, (g, n), "d [G, N, M], u [G, N, K]")
    k = u.shape[2]
    if n * g == 0:
        return torch.zeros(g, m, k, device=d.device, dtype=d.dtype)
    d, u = d.contiguous(), u.contiguous()
    # TN_SPLIT programs a block (fewer for few tokens), each over TOK tokens, a multiple of BT
    tok = triton.cdiv(triton.cdiv(n, TN_SPLIT), TN_BT) * TN_BT
    splits = triton.cdiv(n, tok)
    part = torch.empty(splits, g * m * k, device=d.device, dtype=torch.float32)  # all written
    wide = max(d.numel(), u.numel(), part.numel()) >= WIDE_NUMEL
    wrap_triton(_block_mm_tn_kernel)[(splits, g)](
        d, u, part, n, tok, M=m, K=k, BM=_width(m), BK=_width(k), BT=TN_BT, IEEE=_ieee(d),
        WIDE=wide, num_warps=TN_WARPS, num_stages=TN_STAGES)
    return column_sum(part).view(g, m, k).to(d.dtype)


def block_mm_dual_raw(d: torch.Tensor, w: torch.Tensor, u: torch.Tensor, summed: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-pass Triton kernel: (du = d @ w [G, N, K] in d's dtype, dW = d^T u [G, M, K] in
    d's dtype, fp32 sums over the tokens, one rounding); ``block_mm_dual_naive``'s signature,
    M and K up to ``DUAL_MAX_LANES``. ``summed=False``: dW's fp32 partial table [S, G*M*K] in
    its place (``dw_from_sum`` turns its column sum into dW)."""
    g, n, m = d.shape
    _check("block_mm_dual", "dw", d, w, (g, m), "d [G, N, M], w [G, M, K]", DUAL_MAX_LANES)
    _check("block_mm_dual", "ud", u, d, tuple(u.shape[:2]), "d [G, N, M], u [G, N, K]",
           DUAL_MAX_LANES)
    k = u.shape[2]
    if k != w.shape[2]:
        raise ValueError(f"block_mm_dual: u {tuple(u.shape)} and w {tuple(w.shape)} differ in K "
                         "(u [G, N, K], w [G, M, K])")
    du = torch.empty(g, n, k, device=d.device, dtype=d.dtype)
    if n * g == 0:
        dw = torch.zeros(g, m, k, device=d.device, dtype=d.dtype)
        return du, (dw if summed else _as_table(dw))
    d, u = d.contiguous(), u.contiguous()
    bt = DUAL_NARROW_BT if max(m, k) <= DUAL_NARROW_LANES else DUAL_BT
    tok = triton.cdiv(triton.cdiv(n, DUAL_SPLIT), bt) * bt
    splits = triton.cdiv(n, tok)
    part = torch.empty(splits, g * m * k, device=d.device, dtype=torch.float32)  # all written
    wide = max(d.numel(), du.numel(), part.numel()) >= WIDE_NUMEL
    wrap_triton(_block_mm_dual_kernel)[(splits, g)](
        d, w, u, du, part, n, tok, w.stride(0), w.stride(1), w.stride(2), M=m, K=k,
        BM=_width(m), BK=_width(k), BT=bt, IEEE=_ieee(d), WIDE=wide, STAGES=DUAL_STAGES,
        INTERPRETED=INTERPRETED, num_warps=DUAL_WARPS)
    return du, (dw_from_sum(column_sum(part), (g, m, k), d.dtype) if summed else part)


def _as_table(dw: torch.Tensor) -> torch.Tensor:
    """A finished dW [G, M, K] as a one-row fp32 table: its column sum is dW again, exactly."""
    return dw.float().reshape(1, -1)


def dw_from_sum(total: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype
                ) -> torch.Tensor:
    """dW's fp32 column sum [G*M*K] -> dW [G, M, K] in dtype (one rounding)."""
    return total.view(shape).to(dtype)


# -- dispatch: the rule of the module doc --------------------------------------------------------
def _on_triton(k: int, m: int, limit: int) -> bool:
    """The rule: rows of k and m lanes go to the Triton kernel when neither is past limit."""
    return max(k, m) <= limit


def one_pass_du_dw(k: int, m: int) -> bool:
    """Whether a layer of block rows of K -> M lanes (as stored: ``row_width``) runs its du and
    dW in one pass (``block_mm_dual``'s rule; ``pipeline.roofline`` counts by it too)."""
    return _on_triton(k, m, DUAL_MAX_LANES)


def block_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [G, N, K] @ b [G, K, M] -> [G, N, M]: the Triton kernel for rows of at most
    ``MM_MAX_LANES`` lanes (K and M), torch.bmm (cuBLAS) past them."""
    if _on_triton(a.shape[2], b.shape[2], MM_MAX_LANES):
        return block_mm_raw(a, b)
    return torch.bmm(a, b)


def block_mm_tn(d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d [G, N, M], u [G, N, K] -> d^T u [G, M, K]: the Triton kernel for rows of at most
    ``TN_MAX_LANES`` lanes (M and K), torch.bmm (cuBLAS) past them."""
    if _on_triton(d.shape[2], u.shape[2], TN_MAX_LANES):
        return block_mm_tn_raw(d, u)
    return torch.bmm(d.transpose(1, 2), u)


def block_mm_dual(d: torch.Tensor, w: torch.Tensor, u: torch.Tensor, summed: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """d [G, N, M], w [G, M, K], u [G, N, K] -> (du = d @ w, dW = d^T u): one Triton pass for
    rows of at most ``DUAL_MAX_LANES`` lanes (M and K), ``block_mm`` and ``block_mm_tn`` past.
    ``summed=False``: dW as an fp32 table whose column sum ``dw_from_sum`` takes to dW (the
    one pass's partial sums; past it, dW itself as one row)."""
    if one_pass_du_dw(u.shape[2], d.shape[2]):
        return block_mm_dual_raw(d, w, u, summed)
    dw = block_mm_tn(d, u)
    return block_mm(d, w), (dw if summed else _as_table(dw))


def gemm_paths(k: int, m: int) -> str:
    """Where the rule runs a layer's y, and its du and dW, for block rows of K -> M lanes
    (as stored: ``row_width``): what ``WalshLinear.path()`` logs."""
    where = {True: "Triton", False: "cuBLAS"}
    y = where[_on_triton(k, m, MM_MAX_LANES)]  # du takes y's rule where it runs alone
    back = ("du + dW: Triton, one pass" if one_pass_du_dw(k, m) else
            f"du: {y}; dW: {where[_on_triton(k, m, TN_MAX_LANES)]}")
    return f"block GEMMs y: {y}; {back}"
