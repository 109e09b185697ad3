"""The Triton kernel that chains the Walsh MLP's middle transforms (``walsh.kernels.walsh_mlp``).

Between the gate and up projections' block GEMM and the down projection's, the MLP runs three
transforms on one [A, BT, LB] slab (A blocks, BT tokens, LB lanes of H = A*L hidden features),
each the Hadamard product across blocks (``_transform``) that ``_walsh_kernel`` does one at a
time. A token-major feature h*L + j and block-major row h, lane j index the same slab element,
so the chain needs no layout change between its transforms:
    forward (FWD):  gate = beta_g * S H y_g,  up = beta_u * S H y_u      y_g, y_u block-major
                    u_d = S H (alpha_d * silu(gate) * up)                 gate, up token-major
    backward:       t = S H du_d                                         du_d block-major
                    dalpha_d = sum_i silu(gate) * up * t,  dh = alpha_d * t
                    dgate = dh * up * silu'(gate),  dup = dh * silu(gate)
                    dy_g = S H (beta_g * dgate),  dbeta_g = sum_i dgate * gate / beta_g
                    dy_u = S H (beta_u * dup),    dbeta_u = sum_i dup * up / beta_u
Apart (the group op's walsh_out, then the down layer's walsh_in with SwiGLU's product inside;
backward the down layer's dx pass, then the group's two walsh_in + dbeta passes) gate, up and
their gradients cross HBM between the passes: bytes a token over H features, bf16, forward
2 (2 + 2 + 2 + 1) = 14 H against 2 (2 + 2 + 1) = 10 H here (y_g, y_u read; gate, up, u_d
written); backward 2 (1 + 4 + 4 + 2) = 22 H against 2 (1 + 2 + 2) = 10 H (du_d, gate, up
read; dy_g, dy_u written). gate and up are written by the forward because the backward reads
them (they are what the layers apart saved too).

Precision: as ``_walsh_kernel``'s (slabs in fp32, the dots' operands by input dtype). gate and
up are rounded to the input dtype once, as stored, and the product uses those rounded values
(the backward reads them so); alpha_d * h is rounded for its dot, as walsh_in rounds its input.
dgate and dup are never stored: beta * dgate goes to its dot rounded once, and the dbeta sums
take dgate unrounded (the passes apart rounded it to the input dtype in between).
"""

from __future__ import annotations

import triton
import triton.language as tl

from walsh.kernels.bf16_round import _stored
from walsh.kernels.walsh_transform_kernel import _hadamard, _silu_parts, _transform


@triton.jit
def _gain(ptr, g, j, L: tl.constexpr):
    """A gain [A, L] -> [A, 1, LB] fp32 (0 past L)."""
    return tl.load(ptr + g * L + j, mask=j < L, other=0.0).to(tl.float32)


@triton.jit
def _share(share, scale, DIVIDE: tl.constexpr):
    """A program's share of a gain gradient [A, LB] (summed over its tokens); DIVIDE: over the
    gain (sum dout * out / beta = sum dout * z; 0 where the gain is 0)."""
    if DIVIDE:
        s2d = tl.reshape(scale, [scale.shape[0], scale.shape[2]])  # [A, 1, LB] -> [A, LB]
        share = tl.where(s2d != 0.0, share / tl.where(s2d != 0.0, s2d, 1.0), 0.0)
    return share


@triton.jit
def _mlp_chain_kernel(src_ptr, src1_ptr, gate_ptr, up_ptr, dst_ptr, dst1_ptr, bg_ptr, bu_ptr,
                      ad_ptr, part_ptr, N, ITERS, inv_sqrt_a, A: tl.constexpr,
                      LOG_A: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
                      LB: tl.constexpr, BT: tl.constexpr, FWD: tl.constexpr,
                      USE_DOT: tl.constexpr, IEEE: tl.constexpr, BF16_DOT: tl.constexpr,
                      INTERPRETED: tl.constexpr, WIDE: tl.constexpr, STAGES: tl.constexpr):
    """ITERS consecutive [A, BT, LB] slabs: BT whole tokens each (program axis 0) times a chunk
    of LB lanes (axis 1) of every block; block-major rows are LP >= L lanes wide.
    FWD: src, src1 = y_g, y_u [A, N, LP] -> gate_ptr, up_ptr (written, token-major [N, A*L])
    and dst = u_d [A, N, LP] (lanes past L zeros).
    Else: src = du_d [A, N, LP], gate and up read -> dst = dy_g, dst1 = dy_u [A, N, LP] (lanes
    past L zeros) and part[program 0, k, h*L + j] (fp32) this program's share of dalpha_d,
    dbeta_g, dbeta_u for k = 0, 1, 2.
    Gains bg = beta_g, bu = beta_u, ad = alpha_d, each [A, L]."""
    g = tl.arange(0, A)[:, None, None]                                 # [A, 1, 1]
    j = (tl.program_id(1) * LB + tl.arange(0, LB))[None, None, :]      # [1, 1, LB]
    g64 = g.to(tl.int64) if WIDE else g
    beta_g = _gain(bg_ptr, g, j, L)                                    # [A, 1, LB] each
    beta_u = _gain(bu_ptr, g, j, L)
    alpha_d = _gain(ad_ptr, g, j, L)
    h_mat = _hadamard(A, LOG_A)                                        # [A, A]
    # the backward's three sums (dalpha_d, dbeta_g, dbeta_u), each summed over a slab's tokens
    # as it goes: three [A, BT, LB] accumulators beside the slabs would hold 3 BT times the
    # registers
    acc_a = tl.zeros([A, LB], dtype=tl.float32)
    acc_g = tl.zeros([A, LB], dtype=tl.float32)
    acc_u = tl.zeros([A, LB], dtype=tl.float32)
    for it in tl.range(0, ITERS, num_stages=STAGES if STAGES > 0 else None):
        i = ((tl.program_id(0) * ITERS + it) * BT + tl.arange(0, BT))[None, :, None]  # [1, BT, 1]
        i64 = i.to(tl.int64) if WIDE else i
        mask = (i < N) & (j < L)                                       # [1, BT, LB]
        rows = (i < N) & (j < LP)  # block-major rows with their padding lanes
        token_major = i64 * (A * L) + g64 * L + j                      # [A, BT, LB]
        block_major = g64 * N * LP + i64 * LP + j
        if FWD:
            yg = tl.load(src_ptr + block_major, mask=rows, other=0.0).to(tl.float32)
            gate = beta_g * _transform(yg, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE,
                                       BF16_DOT, INTERPRETED)
            gate_s = _stored(gate, gate_ptr, INTERPRETED)
            tl.store(gate_ptr + token_major, gate_s, mask=mask)
            yu = tl.load(src1_ptr + block_major, mask=rows, other=0.0).to(tl.float32)
            up = beta_u * _transform(yu, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE,
                                     BF16_DOT, INTERPRETED)
            up_s = _stored(up, up_ptr, INTERPRETED)
            tl.store(up_ptr + token_major, up_s, mask=mask)
            # the product of the values as stored (what the backward reads); 0 past L
            h = _silu_parts(gate_s.to(tl.float32))[1] * up_s.to(tl.float32)
            h = tl.where(mask, h, 0.0)
            u = _transform(alpha_d * h, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT,
                           INTERPRETED)
            tl.store(dst_ptr + block_major, _stored(u, dst_ptr, INTERPRETED), mask=rows)
        else:
            t = _transform(tl.load(src_ptr + block_major, mask=rows, other=0.0).to(tl.float32),
                           h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT, INTERPRETED)
            gate = tl.load(gate_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(up_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            sg, silu = _silu_parts(gate)
            acc_a += tl.sum(silu * up * t, axis=1)
            dh = tl.where(mask, alpha_d * t, 0.0)  # 0 past L, whatever du_d's padding holds
            # silu'(gate) = sg (1 + gate (1 - sg)) = sg + silu (1 - sg)
            dgate = dh * up * (sg + silu * (1.0 - sg))
            acc_g += tl.sum(dgate * gate, axis=1)
            dy = _transform(beta_g * dgate, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE,
                            BF16_DOT, INTERPRETED)
            tl.store(dst_ptr + block_major, _stored(dy, dst_ptr, INTERPRETED), mask=rows)
            dup = dh * silu
            acc_u += tl.sum(dup * up, axis=1)
            dy = _transform(beta_u * dup, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE,
                            BF16_DOT, INTERPRETED)
            tl.store(dst1_ptr + block_major, _stored(dy, dst1_ptr, INTERPRETED), mask=rows)
    if not FWD:  # [A, LB] shares; lanes past L unstored
        gj = tl.reshape(g, [A, 1])
        jj = tl.reshape(j, [1, LB])
        row = tl.program_id(0).to(tl.int64) * (3 * A * L)
        tl.store(part_ptr + row + gj * L + jj, _share(acc_a, alpha_d, False), mask=jj < L)
        tl.store(part_ptr + row + (A + gj) * L + jj, _share(acc_g, beta_g, True), mask=jj < L)
        tl.store(part_ptr + row + (2 * A + gj) * L + jj, _share(acc_u, beta_u, True),
                 mask=jj < L)
