"""Cross-entropy's pass over one chunk of logits: the log-sum-exp and the logits' gradient.

``walsh.loss.linear_cross_entropy`` forms, for each chunk of c tokens, logits [c, V] = h_c W^T
and needs from them lse [c] (the loss) and, in training, g = (softmax - onehot(target)) *
scale [c, V] (scale [c]: 1 / n_valid, 0 on ignored rows), which its two GEMMs read for dh and
dW. This kernel does both in one program per row: a first loop over the row keeps a running
max and sum of exponentials (online log-sum-exp), a second loop writes g. At best HBM sees the
logits read once and g written once, 412 MB a 2048-token chunk (97 us at the H200's 4.25
TB/s), if the second loop finds its row (100 KB at the GPT-2 vocabulary, bf16) still in L2.

Measured on an H200 (docs/benchmarks.md, session 30), one [2048, 50257] bf16 chunk: 227.7 us
(2.35x that roofline; the log-sum-exp alone 81.6 us), against 499.5 us for the reference
compiled by inductor (a log-sum-exp reduction reading each row twice and a pointwise pass for
g at 4x its bytes' time) and 1,957 us eager. The second loop likely misses L2 (programs in
flight hold more rows than its 50 MB), but the launches that would keep it there measured
slower (session 31, same chunk): a bounded grid of 132-1,056 programs striding the rows took
236-711 us across four tile shapes, a whole row held in registers (one read of the logits)
259-519 us; the one-row-a-program launch stands.

Padded logits: the loss hands the kernel logits [c, W] whose first V columns are the
vocabulary (W = V rounded up to 64, aligned rows for the GEMMs; ``walsh.loss``'s module doc);
the kernel leaves columns V.. W-1 out of the log-sum-exp and writes 0 to their g. In the
compiled 125M loss of session 32 the kernel took 205.8 us a [2048, 50304] chunk.

``walsh.loss.ce_chunk_naive`` is the reference with the same signature (the loss's torch
path; it lives there so that the loss imports no triton where there is none). Code order:
kernel, launcher, op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.registry import WIDE_NUMEL, kernel_op, wrap_triton
from walsh.loss import chunk_vocab

# columns a loop iteration loads, warps a program (one row a program). Swept on an H200 at one
# [2048, 50257] bf16 chunk (docs/benchmarks.md, session 30), us with the gradient / lse only:
# 4096 x 4 warps 227.7 / 81.6 (taken), 8192 x 8 227.0 / 88.1, 4096 x 8 238.1 / 89.2 (the
# session's model runs), 2048 x 4 241.1 / 86.4, 1024 x 4 254.3 / 99.5; 16 warps slower at
# every width. Roofline 96.9 us (the logits read, g written)
BLOCK_V, WARPS = 4096, 4


@triton.jit
def _ce_chunk_kernel(x_ptr, g_ptr, lse_ptr, picked_ptr, tgt_ptr, scale_ptr, V, VP,
                     BLOCK_V: tl.constexpr, GRAD: tl.constexpr, WIDE: tl.constexpr):
    """Row r of x [rows, VP] (columns V.. VP-1 padding): lse[r] = log sum_{v<V} exp(x[r, v]),
    picked[r] = x[r, tgt[r]]; with GRAD, g[r, v] = (exp(x[r, v] - lse[r]) - (v == tgt[r])) *
    scale[r] for v < V and 0 on the padding."""
    r = tl.program_id(0)
    base = r.to(tl.int64) * VP if WIDE else r * VP
    tgt = tl.load(tgt_ptr + r)
    cols = tl.arange(0, BLOCK_V)                                       # [BLOCK_V]
    m = float("-inf")                                                  # running max
    s = 0.0                                                            # sum exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        x = tl.load(x_ptr + base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))                       # finite: v0 < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + r, lse)
    tl.store(picked_ptr + r, tl.load(x_ptr + base + tgt).to(tl.float32))
    if GRAD:
        sc = tl.load(scale_ptr + r)
        for v0 in range(0, VP, BLOCK_V):
            v = v0 + cols
            x = tl.load(x_ptr + base + v, mask=v < V, other=float("-inf")).to(tl.float32)
            g = (tl.exp(x - lse) - (v == tgt).to(tl.float32)) * sc      # 0 past V: exp(-inf)
            tl.store(g_ptr + base + v, g.to(g_ptr.dtype.element_ty), mask=v < VP)


def ce_chunk_raw(logits: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor,
                 want_grad: bool, vocab: int = -1) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """``ce_chunk_naive``'s signature and results, by ``_ce_chunk_kernel``. tgt must lie in
    [0, vocab): the kernel reads x[r, tgt[r]] unchecked (a check would cost a device sync)."""
    if logits.ndim != 2 or tgt.shape != logits.shape[:1] or scale.shape != tgt.shape:
        raise ValueError(f"ce_chunk: expected logits [c, V], tgt [c], scale [c], got "
                         f"{tuple(logits.shape)}, {tuple(tgt.shape)}, {tuple(scale.shape)}")
    rows, width = logits.shape
    vocab = chunk_vocab(vocab, width)
    logits = logits.contiguous()
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    picked = torch.empty(rows, device=logits.device, dtype=torch.float32)
    g = torch.empty_like(logits) if want_grad else logits.new_empty(0)
    if rows:
        wrap_triton(_ce_chunk_kernel)[(rows,)](
            logits, g, lse, picked, tgt.contiguous(), scale.float().contiguous(), vocab, width,
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(width)), GRAD=want_grad,
            WIDE=logits.numel() >= WIDE_NUMEL, num_warps=WARPS)
    return lse, picked, g


def _ce_chunk_fake(logits, tgt, scale, want_grad, vocab=-1):
    rows = logits.shape[0]
    vec = logits.new_empty(rows, dtype=torch.float32)
    return vec, vec.new_empty(rows), (torch.empty_like(logits) if want_grad
                                      else logits.new_empty(0))


@kernel_op("walsh::ce_chunk", _ce_chunk_fake)
def ce_chunk(logits: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor,
             want_grad: bool, vocab: int = -1) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    """The kernel as a torch op (compile traces into it; no autograd: the loss forms g)."""
    return ce_chunk_raw(logits, tgt, scale, want_grad, vocab)
