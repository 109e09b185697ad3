"""Ternary linear layers on INT8 tensor cores: 8-bit activations per token, ternary codes as int8.

A ternary layer with 8-bit activations (``ternary=True, act_bits=8``, the BitNet b1.58 recipe)
computes, in its PyTorch form (``int8_linear_naive``), x_q @ w_eff^T with
    x_q   = clip(round(x * s), -128, 127) / s,  s = 127 / max|x| per token (straight-through)
    w_eff = gamma * Q,  Q in {-1, 0, 1}          (the layer's dense effective weight [out, in])
Both factors are integers times one scale, so the product is exact in int32:
    out[m, n] = (sum_k q[m, k] Q[n, k]) * gamma / s[m]
The layers pass Q and gamma from their quantizer (Q materialized like the weight, gamma the
fp32 absmean scale, where the bf16 w_eff carries gamma rounded to bf16). Other callers may pass
w_eff alone: every nonzero entry of a single-scale ternary weight is +-gamma, so gamma =
max|w_eff| and Q = w_eff / gamma exactly (``ternary_codes``).

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
  x_q rebuilt from the saved codes and scales (1 byte per activation in eager mode; compiled,
  the partitioner may save x and recompute the codes instead, as a CPU probe of the joint graph
  showed, session 6). With ``int8_dx``
  the input gradient's GEMM also runs in INT8: dout quantized per token by the same torch ops
  (fusable into dout's producer in the compiled backward) times Q^T, an approximation of the
  gradient that the naive path does not make. dw_eff stays in dout's dtype.

Rounding: torch.round (half to even). The scale is computed in fp32; the naive path computes
it in x's dtype, so under bf16 a code can differ by one where x * s sits within a bf16 ulp of a
half-integer (the tests bound the output, and compare codes exactly in fp32). A NaN in x or
dout propagates (amax keeps it) rather than turning into a finite code.

Measured on an H200 (docs/benchmarks.md, sessions 6 and 7): the GEMM at 1.19-1.65x the bf16
GEMM; bitnet-125m at 0.98-0.99x dense, equal to the bf16 fake-quant path (the quantization
passes eat the GEMM gain), 1.05x the fake-quant path at 24 x 2048; int8_dx at 0.94-0.96x dense.
Without CUDA graphs the 125M step can be bound by the host (0.78-0.84x on slower lent hosts).

Code order: naive reference, PyTorch quantizers, kernel, launcher, ops, autograd,
functional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.bf16_round import _stored
from walsh.kernels.registry import INTERPRETED, kernel_op, wrap_triton
from walsh.quant import EPS, act_codes, act_quant_ste

# measured best at every 125M and 1.3B GEMM shape on an H200 (docs/benchmarks.md, session 6);
# 3 stages of two 128 x 128 int8 tiles take 96 KiB of shared memory (H100/H200 and A100 have
# more; consumer Ampere/Ada GPUs have 99 KiB: untested there)
BM, BN, BK, GEMM_WARPS, GEMM_STAGES = 128, 128, 128, 8, 3


def int8_linear_naive(x: torch.Tensor, w_eff: torch.Tensor) -> torch.Tensor:
    """x [M, K], w_eff [N, K] (gamma * ternary codes) -> [M, N]: the layers' PyTorch path."""
    return act_quant_ste(x, 8) @ w_eff.t()


@torch.no_grad()
def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 1/s [M]) by plain torch ops, for inductor to fuse
    into x's producer (a Triton row quantizer of ours measured 1.7-2.4x its roofline alone and
    cannot fuse; docs/benchmarks.md, session 6)."""
    q, s = act_codes(x.float(), 8)                                # [M, K] fp32, [M, 1]
    return q.to(torch.int8), (1.0 / s)[:, 0]


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
def _int8_matmul_kernel(a_ptr, b_ptr, inv_s_ptr, gamma_ptr, out_ptr, M, N, K,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        INTERPRETED: tl.constexpr):
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
             _stored(out, out_ptr, INTERPRETED), mask=(rm[:, None] < M) & (rn[None, :] < N))


# -- launchers --------------------------------------------------------------------------------
def int8_matmul(q: torch.Tensor, inv_s: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(q [M, K] int8, 1/s [M]) x (codes [N, K] int8, gamma [1]) -> [M, N] in out_dtype."""
    q, inv_s, codes = q.contiguous(), inv_s.contiguous(), codes.contiguous()  # read row-major
    m, k = q.shape
    n = codes.shape[0]
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    if m and n:
        grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
        wrap_triton(_int8_matmul_kernel)[grid](q, codes, inv_s, gamma, out, m, n, k,
                                          BM=BM, BN=BN, BK=BK, INTERPRETED=INTERPRETED,
                                          num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)
    return out


# -- ops (walsh.kernels.registry): the GEMM alone (its int8 operands take no gradient) --------
@kernel_op("walsh::int8_mm", lambda q, inv_s, codes, gamma, out_dtype:
           q.new_empty(q.shape[0], codes.shape[0], dtype=out_dtype))
def _int8_mm_op(q: torch.Tensor, inv_s: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``int8_matmul`` as one op, so that compile does not split the launch."""
    return int8_matmul(q, inv_s, codes, gamma, out_dtype)


# -- autograd on an op ------------------------------------------------------------------------
@kernel_op("walsh::int8_linear", lambda x, q, inv_s, w_eff, codes, gamma, int8_dx:
           x.new_empty(x.shape[0], w_eff.shape[0]))
def _int8_linear_op(x: torch.Tensor, q: torch.Tensor, inv_s: torch.Tensor, w_eff: torch.Tensor,
                    codes: torch.Tensor, gamma: torch.Tensor, int8_dx: bool) -> torch.Tensor:
    """x [M, K] and w_eff [N, K] (not read: the autograd paths), their codes q [M, K] int8 with
    1/s [M] and Q [N, K] int8 with gamma [1] -> [M, N] in x's dtype.

    (An autograd.Function around the codes and ``walsh::int8_mm`` instead, so that x is the
    input of nothing opaque, used 0.64 GiB less at 125M but ran 10% slower on an H200:
    docs/benchmarks.md, session 6.)"""
    return int8_matmul(q, inv_s, codes, gamma, x.dtype)


def _setup(ctx, inputs, output):
    _x, q, inv_s, w_eff, codes, gamma, int8_dx = inputs
    ctx.int8_dx, ctx.w_dtype = int8_dx, w_eff.dtype
    # dx from the codes (int8_dx) or from w_eff: keep only what it needs
    ctx.save_for_backward(q, inv_s, *((codes, gamma) if int8_dx else (w_eff,)))


def _backward(ctx, dout):
    """Traced by compile: torch ops here fuse, the launch lives in ``walsh::int8_mm``."""
    q, inv_s = ctx.saved_tensors[:2]
    dx = dw = None
    if ctx.needs_input_grad[0] and ctx.int8_dx:  # dout's codes fuse into its producer
        codes, gamma = ctx.saved_tensors[2:]
        gq, inv_sg = quantize_rows_torch(dout)
        dx = _int8_mm_op(gq, inv_sg, codes.t().contiguous(), gamma, dout.dtype)  # [M, K]
    elif ctx.needs_input_grad[0]:
        dx = dout @ ctx.saved_tensors[2].to(dout.dtype)                       # [M, K]
    if ctx.needs_input_grad[3]:
        x_q = (q.float() * inv_s[:, None]).to(dout.dtype)                     # the operand
        dw = (dout.t() @ x_q).to(ctx.w_dtype)                                  # [N, K]
    return dx, None, None, dw, None, None, None


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
    if codes is None or gamma is None:
        codes, gamma = ternary_codes(w_eff)
    elif codes.dtype != torch.int8 or codes.shape != w_eff.shape or gamma.numel() != 1:
        raise ValueError(f"int8_linear: codes must be int8 {tuple(w_eff.shape)} and gamma one "
                         f"value, got {codes.dtype} {tuple(codes.shape)} and {gamma.numel()}")
    q, inv_s = quantize_rows_torch(x)
    return _int8_linear_op(x, q, inv_s, w_eff, codes, gamma.reshape(1).float(), int8_dx)
