"""Ternary linear layers on INT8 tensor cores: 8-bit activations per token, ternary codes as int8.

A ternary layer with 8-bit activations (``ternary=True, act_bits=8``, the BitNet b1.58 recipe)
computes, in its PyTorch form (``int8_linear_naive``), x_q @ w_eff^T with
    x_q   = clip(round(x * s), -128, 127) / s,  s = 127 / max|x| per token (straight-through)
    w_eff = gamma * Q,  Q in {-1, 0, 1}          (the layer's dense effective weight [out, in])
Both factors are integers times one scale, so the product is exact in int32:
    out[m, n] = (sum_k q[m, k] Q[n, k]) * gamma / s[m]
gamma and Q are read off w_eff itself: every nonzero entry of a single-scale ternary weight is
+-gamma, so gamma = max|w_eff| and Q = w_eff / gamma exactly (``ternary_codes``).

Where each part runs, and why:
- The activation codes q = round(x * s) are computed by PyTorch ops (``quantize_rows_torch``),
  not by a kernel of ours: under torch.compile, inductor fuses them into the kernel that
  produces x (the RMSNorm before the q/k/v and MLP projections, the SwiGLU product before the
  down projection), so x is not read again. x itself still goes into the op (unread) as the
  autograd path back to the input; inductor writes it beside the codes.
- The product (``_int8_matmul_kernel``) multiplies int8 codes by int8 codes on the tensor
  cores in int32 and applies 1/s[m] * gamma in the epilogue. (Casting a bf16 copy of the
  codes to int8 inside the kernel instead measured 2x slower on an H200: the cast sits between
  the load and the tensor-core operand.)
- Backward (straight-through, as the naive path): dx = dout @ w_eff, dw_eff = dout^T @ x_q with
  x_q rebuilt from the saved codes and scales (1 byte per activation saved). With ``int8_dx``
  the input gradient's GEMM also runs in INT8: dout quantized per token (``quantize_rows``, a
  Triton kernel, since dout arrives inside the op) times Q^T, an approximation of the gradient
  that the naive path does not make. dw_eff stays in dout's dtype.

Rounding: round half to even, as torch.round. The scale is computed in fp32; the naive path
computes it in x's dtype, so under bf16 a code can differ by one where x * s sits within a
bf16 ulp of a half-integer (the tests bound the output, and compare codes exactly in fp32).

Code order: naive reference, PyTorch quantizer, kernels, launchers, autograd (custom op),
functional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.quant import EPS, act_quant_ste

# measured best at every 125M and 1.3B GEMM shape on an H200 (docs/benchmarks.md, session 6)
BM, BN, BK, GEMM_WARPS, GEMM_STAGES = 128, 128, 128, 8, 3


def int8_linear_naive(x: torch.Tensor, w_eff: torch.Tensor) -> torch.Tensor:
    """x [M, K], w_eff [N, K] (gamma * ternary codes) -> [M, N]: the layers' PyTorch path."""
    return act_quant_ste(x, 8) @ w_eff.t()


@torch.no_grad()
def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 1/s [M]) by plain torch ops, for inductor to fuse
    into x's producer (``quantize_rows`` is the one-kernel twin)."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).float().clamp(min=EPS)     # [M, 1]
    q = torch.clamp(torch.round(x.float() * s), -128, 127).to(torch.int8)
    return q, (1.0 / s)[:, 0]


@torch.no_grad()
def ternary_codes(w_eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_eff [N, K] = gamma * Q -> (Q int8 [N, K], gamma fp32 [1]); gamma = max|w_eff|. Torch
    ops outside the op, like the activation codes: compiled, they fuse with the quantizer that
    makes w_eff (eager, inside the op, they were six launches per layer, which made the INT8
    model host-bound: docs/benchmarks.md, session 6). The layers pass their own codes instead
    (materialized like the weight: no reduction over the dense matrix)."""
    gamma = w_eff.abs().amax().float().clamp(min=EPS).reshape(1)
    return torch.round(w_eff.float() / gamma).to(torch.int8), gamma


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    return tl.where(tie & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def _row_quant_kernel(x_ptr, q_ptr, inv_s_ptr, M, K, eps, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """ROWS tokens per program, each row read once (BLOCK >= K): q = clip(round(x * s)),
    1/s stored (fp32)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (k[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + k[None, :]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)           # [ROWS, BLOCK]
    m = tl.maximum(tl.max(tl.abs(v), axis=1), eps)                            # [ROWS]
    s = tl.math.div_rn(m * 0.0 + 127.0, m)
    q = tl.minimum(tl.maximum(_round_half_even(v * s[:, None]), -128.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(inv_s_ptr + rows, tl.math.div_rn(s * 0.0 + 1.0, s), mask=rows < M)


@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, inv_s_ptr, gamma_ptr, out_ptr, M, N, K,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[m, n] = (sum_k a[m, k] b[n, k]) * inv_s[m] * gamma: a [M, K], b [N, K] int8."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)      # [BM, BK]
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None],
                    mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)      # [BK, BN]
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    scale = tl.load(inv_s_ptr + rm, mask=rm < M, other=0.0) * tl.load(gamma_ptr)
    out = acc.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# -- launchers --------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 1/s [M]), as ``quantize_rows_torch`` but in one
    kernel, for tensors that arrive inside an op (dout in the INT8 input gradient)."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.int8)
    inv_s = torch.empty(m, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(max(k, 16))
    if block > 16384:  # one row lives in registers
        raise ValueError(f"quantize_rows: rows of {k} elements; at most 16384 are supported")
    if m > 0:
        rows = max(1, min(16, 4096 // block))  # about 4k elements per program
        # no fused multiply-add: round(x * s) must round the rounded product, as torch does
        _row_quant_kernel[(triton.cdiv(m, rows),)](
            x, q, inv_s, m, k, EPS, ROWS=rows, BLOCK=block, enable_fp_fusion=False,
            num_warps=8 if rows * block >= 8192 else 4)
    return q, inv_s


def int8_matmul(q: torch.Tensor, inv_s: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(q [M, K] int8, 1/s [M]) x (codes [N, K] int8, gamma [1]) -> [M, N] in out_dtype."""
    m, k = q.shape
    n = codes.shape[0]
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    if m and n:
        grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
        _int8_matmul_kernel[grid](q, codes.contiguous(), inv_s, gamma, out, m, n, k,
                                  BM=BM, BN=BN, BK=BK, num_warps=GEMM_WARPS,
                                  num_stages=GEMM_STAGES)
    return out


# -- autograd: one custom op ------------------------------------------------------------------
@torch.library.custom_op("walsh::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, q: torch.Tensor, inv_s: torch.Tensor, w_eff: torch.Tensor,
                    codes: torch.Tensor, gamma: torch.Tensor, int8_dx: bool) -> torch.Tensor:
    """x [M, K] and w_eff [N, K] (not read: the autograd paths), their codes q [M, K] int8 with
    1/s [M] and Q [N, K] int8 with gamma [1] -> [M, N] in x's dtype."""
    return int8_matmul(q, inv_s, codes, gamma, x.dtype)


@_int8_linear_op.register_fake
def _(x, q, inv_s, w_eff, codes, gamma, int8_dx):
    return x.new_empty(x.shape[0], w_eff.shape[0])


@torch.library.custom_op("walsh::int8_linear_dx", mutates_args=())
def _int8_dx_op(dout: torch.Tensor, codes_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """dout [M, N], Q^T [K, N] -> dx [M, K] = (dout_q @ Q) * gamma / s_dout (an op of its own:
    the backward below is traced by compile, and a Triton launch cannot be)."""
    gq, inv_sg = quantize_rows(dout)
    return int8_matmul(gq, inv_sg, codes_t, gamma, dout.dtype)


@_int8_dx_op.register_fake
def _(dout, codes_t, gamma):
    return dout.new_empty(dout.shape[0], codes_t.shape[0])


def _setup(ctx, inputs, output):
    _x, q, inv_s, w_eff, codes, gamma, int8_dx = inputs
    ctx.int8_dx = int8_dx
    ctx.save_for_backward(q, inv_s, w_eff, codes, gamma)


def _backward(ctx, dout):
    q, inv_s, w_eff, codes, gamma = ctx.saved_tensors
    if ctx.int8_dx:
        dx = _int8_dx_op(dout, codes.t().contiguous(), gamma)
    else:
        dx = dout @ w_eff.to(dout.dtype)                                       # [M, K]
    x_q = (q.float() * inv_s[:, None]).to(dout.dtype)                         # the operand
    return dx, None, None, (dout.t() @ x_q).to(w_eff.dtype), None, None, None


_int8_linear_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def int8_linear(x: torch.Tensor, w_eff: torch.Tensor, int8_dx: bool = False,
                codes: torch.Tensor | None = None, gamma: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [M, K], w_eff [N, K] with one ternary scale (gamma * Q) -> [M, N] in x's dtype: the
    INT8 twin of ``int8_linear_naive``, differentiable in both (straight-through); ``int8_dx``:
    the input gradient's GEMM in INT8 too (dout quantized per token). ``codes`` (Q int8
    [N, K]) and ``gamma`` ([1] fp32) may be given where the caller has them (the layers do);
    otherwise they are read off w_eff."""
    if x.ndim != 2 or w_eff.ndim != 2 or x.shape[1] != w_eff.shape[1]:
        raise ValueError(f"int8_linear: shapes x {tuple(x.shape)} and w {tuple(w_eff.shape)} "
                         "do not fit x [M, K], w [N, K]")
    q, inv_s = quantize_rows_torch(x)
    if codes is None or gamma is None:
        codes, gamma = ternary_codes(w_eff)
    return _int8_linear_op(x, q, inv_s, w_eff, codes, gamma, int8_dx)
