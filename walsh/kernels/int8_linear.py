"""Ternary linear layers on INT8 tensor cores: 8-bit activations per token, ternary codes as int8.

A ternary layer with 8-bit activations (``ternary=True, act_bits=8``, the BitNet b1.58 recipe)
computes, in its PyTorch form (``int8_linear_naive``), x_q @ w_eff^T with
    x_q   = clip(round(x * s), -128, 127) / s,  s = 127 / max|x| per token (straight-through)
    w_eff = gamma * Q,  Q in {-1, 0, 1}          (the layer's dense effective weight [out, in])
Both factors are integers times one scale, so the product is exact in int32:
    out[m, n] = (sum_k q[m, k] Q[n, k]) * gamma / s[m]
which is what the kernels compute: ``_row_quant_kernel`` (per-token absmax, codes, 1/s) and
``_int8_matmul_kernel`` (int8 x int8 -> int32 on the tensor cores, the scales applied in the
epilogue). gamma and Q are read off w_eff itself: every nonzero entry of a single-scale
ternary weight is +-gamma, so gamma = max|w_eff| and Q = w_eff / gamma exactly.

The backward stays in the input dtype (straight-through, as the naive path):
dx = dout @ w_eff and dw_eff = dout^T @ x_q, with x_q rebuilt from the saved int8 codes and
scales (1 byte per activation saved instead of 2). In fp32, dx is bit-identical to the naive
path's; the forward and dw_eff agree to fp32 rounding (x_q is q * (1/s) here, q / s there).

Rounding: round half to even, as torch.round. The scale is computed in fp32; the naive path
computes it in x's dtype, so under bf16 a code can differ by one where x * s sits within a
bf16 ulp of a half-integer (the tests bound the output, and compare codes exactly in fp32).

Status: correct on CPU under TRITON_INTERPRET=1 (tests/walsh/test_kernels.py); not yet timed
on a GPU, and the GEMM's tiles are not tuned. Code order: naive reference, kernels, launchers,
autograd (custom op), functional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.quant import EPS, act_quant_ste

QUANT_BLOCK = 1024
BM, BN, BK = 64, 64, 64


def int8_linear_naive(x: torch.Tensor, w_eff: torch.Tensor) -> torch.Tensor:
    """x [M, K], w_eff [N, K] (gamma * ternary codes) -> [M, N]: the layers' PyTorch path."""
    return act_quant_ste(x, 8) @ w_eff.t()


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    return tl.where(tie & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def _row_quant_kernel(x_ptr, q_ptr, inv_s_ptr, K, eps, BLOCK: tl.constexpr):
    """One token per program: q = clip(round(x * s), -128, 127), 1/s stored (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    m = tl.maximum(tl.max(amax, axis=0), eps)
    s = tl.math.div_rn(m * 0.0 + 127.0, m)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(v * s), -128.0), 127.0)
        tl.store(q_ptr + row * K + k, q.to(tl.int8), mask=k < K)
    tl.store(inv_s_ptr + row, tl.math.div_rn(s * 0.0 + 1.0, s))


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
    """x [M, K] -> (int8 codes [M, K], fp32 1/s [M])."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.int8)
    inv_s = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        # no fused multiply-add: round(x * s) must round the rounded product, as torch does
        _row_quant_kernel[(m,)](x, q, inv_s, k, EPS, BLOCK=QUANT_BLOCK, enable_fp_fusion=False)
    return q, inv_s


def ternary_codes(w_eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_eff [N, K] = gamma * Q -> (Q int8 [N, K], gamma fp32 [1]); gamma = max|w_eff|."""
    gamma = w_eff.detach().abs().amax().float().clamp(min=EPS).reshape(1)
    return torch.round(w_eff.detach().float() / gamma).to(torch.int8), gamma


def int8_matmul(q: torch.Tensor, inv_s: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(q [M, K] int8, 1/s [M]) x (codes [N, K] int8, gamma [1]) -> [M, N] in out_dtype."""
    m, k = q.shape
    n = codes.shape[0]
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    if m and n:
        grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
        _int8_matmul_kernel[grid](q, codes.contiguous(), inv_s, gamma, out, m, n, k,
                                  BM=BM, BN=BN, BK=BK)
    return out


# -- autograd: one custom op ------------------------------------------------------------------
@torch.library.custom_op("walsh::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, w_eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """(out, q, 1/s): the codes and scales are returned to be saved for the backward."""
    q, inv_s = quantize_rows(x)
    codes, gamma = ternary_codes(w_eff)
    return int8_matmul(q, inv_s, codes, gamma, x.dtype), q, inv_s


@_int8_linear_op.register_fake
def _(x, w_eff):
    m = x.shape[0]
    return (x.new_empty(m, w_eff.shape[0]), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(m, dtype=torch.float32))


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero buffers for the codes' and scales' "gradients"
    ctx.save_for_backward(inputs[1], output[1], output[2])


def _backward(ctx, dout, _dq, _dinv_s):
    w_eff, q, inv_s = ctx.saved_tensors
    x_q = (q.float() * inv_s[:, None]).to(dout.dtype)   # [M, K], the forward's operand
    return dout @ w_eff.to(dout.dtype), (dout.t() @ x_q).to(w_eff.dtype)


_int8_linear_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def int8_linear(x: torch.Tensor, w_eff: torch.Tensor) -> torch.Tensor:
    """x [M, K], w_eff [N, K] with one ternary scale (gamma * Q) -> [M, N] in x's dtype: the
    INT8 twin of ``int8_linear_naive``, differentiable in both (straight-through)."""
    if x.ndim != 2 or w_eff.ndim != 2 or x.shape[1] != w_eff.shape[1]:
        raise ValueError(f"int8_linear: shapes x {tuple(x.shape)} and w {tuple(w_eff.shape)} "
                         "do not fit x [M, K], w [N, K]")
    return _int8_linear_op(x, w_eff)[0]
