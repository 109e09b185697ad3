"""Walsh-Hadamard layers that share their input as one op: attention's q, k, v; the MLP's gate, up.

Run one by one (``walsh.kernels.walsh_linear``, three kernels), P layers on one input x
[N, A*LI] read x P times in their walsh_in passes, and in the backward each reads x again for
its dalpha and writes a dx of its own, which autograd then adds (read P, write 1). As a group of
P (2 or 3) layers with weights of one shape:
    u      [P, A, N, LIp] = walsh_in of x with each layer's alpha, one pass: x read once
    y      [P*A, N, LOp]  = one block GEMM over the P*A blocks (``block_matmul``; the layers'
                            padded weights stacked)
    out_p  [N, A*LO]      = walsh_out(y_p, beta_p), one pass per layer, as the layer's own
backward, per layer as the layer's own: dy_p, dbeta_p = walsh_in_gain(dout_p, beta_p, out_p);
du_p = dy_p W_p; dw_p = dy_p^T u_p; then for the group in one pass (``_walsh_kernel``'s P):
    dx = sum_p alpha_p * S H du_p, dalpha_p = sum_i x * S H du_p    (du_p read in turn, x once)
HBM passes over an [N, C] tensor saved per group, against the layers one by one: forward P - 1
(x's reads); backward 3 (P - 1) (x's reads, the dx writes and autograd's reads of them). At the
1.3B shapes (16 x 1024 tokens, C = 2048, bf16) a pass is 64 MiB, about 16 us of HBM time.
Measured on an H200 (docs/benchmarks.md, session 16), grouped against one by one in one
process: walsh-h-1b3 +4.8% (1.74x the dense model against 1.66x), walsh-h-125m +3.3% (CUDA
graphs, 0.87x against 0.85x); the group passes at 1.2-1.9x their rooflines at 64 lanes. The
forward GEMM's untransposed weight (session 17, ``group_forward``; 200.5 -> 143.3 us alone at
the 1.3B FFN) showed no gain in the model: walsh-h-1b3 with it ran at 1.79x dense (session 18,
two runs with RoPE apart), within session 17's 1.78-1.80x without it; not profiled.

The results are the layers' own up to rounding: the transforms' arithmetic is the single
passes', but the forward's GEMM is one batched call over P*A blocks (where it runs on
cuBLAS, past 64 lanes, cuBLAS may pick another kernel than for A, and so round differently),
dx's P terms are added in fp32 before the one rounding (one by one, each term is rounded to the
input dtype and autograd adds the rounded terms), and dalpha's shares are summed in another
order within each program (the dx pass's tile is ``GROUP_OUT_TILE``). The naive reference
with the same signature is ``walsh_group_naive``.

Who calls it: ``walsh.layers.hadamard.shared_input`` for layers on the ``triton`` path that
share an input and a weight shape (the model's attention and MLP). ZeRO-3 gathers a module's
parameters in its own forward hook, and the group reads its members' parameters from the parent
module's forward: ``pipeline.parallelize`` marks those parents as ZeRO-3 leaf modules.

Code order: naive reference, launchers, autograd (ops), functional.
"""

from __future__ import annotations

import torch

from walsh.kernels.block_matmul import block_mm
from walsh.kernels.column_sum import column_sum, column_sums
from walsh.kernels.registry import kernel_op
from walsh.kernels.walsh_linear import (
    _rope,
    backward_to_du,
    layer_dw,
    padded_weight,
    walsh_linear_naive,
)
from walsh.kernels.walsh_transform import MAX_GROUP, _launch, row_width, walsh_out_raw


def walsh_group_naive(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
                      betas: list[torch.Tensor]) -> list[torch.Tensor]:
    """x [N, A*LI], ws[p] [A, LO, LI], alphas[p] [A, LI], betas[p] [A, LO] -> [N, A*LO] each:
    the layers one by one (``blocks`` path)."""
    return [walsh_linear_naive(x, w, al, be) for w, al, be in zip(ws, alphas, betas)]


# -- launchers --------------------------------------------------------------------------------
def walsh_in_group_raw(x: torch.Tensor, alpha: torch.Tensor, width: int | None = None,
                       out: torch.Tensor | None = None, launch: tuple | None = None
                       ) -> torch.Tensor:
    """x [N, A*L], alpha [P, A, L] -> u [P, A, N, width]: walsh_in_raw with each alpha, in one
    pass over x (no autograd; lanes past L zeros); ``launch``: as ``walsh_transform.
    _launch``'s."""
    p, a, lanes = alpha.shape
    return _launch(x, alpha, a, lanes, x.shape[0], in_mode=True, out=out, width=width,
                   group=p, launch=launch)[0]


def walsh_out_group_gain_raw(dus: list[torch.Tensor], alpha: torch.Tensor, x: torch.Tensor,
                             out: torch.Tensor | None = None, summed: bool = True,
                             launch: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dus[p] [A, N, W], alpha [P, A, L], x [N, A*L] -> (dx [N, A*L] = sum_p alpha_p * S H
    dus[p], fp32 dalpha [P, A, L] = sum over tokens of x * S H dus[p]) in one pass (no
    autograd); what lies past L in dus' rows reaches no result. ``summed=False``: dalpha's
    fp32 partial table [rows, P*A*L] in its place (``walsh_transform.walsh_in_gain_raw``);
    ``launch``: as ``walsh_transform._launch``'s."""
    p, a, lanes = alpha.shape
    dst, part = _launch(dus[0], alpha, a, lanes, x.shape[0], in_mode=False, out=out, other=x,
                        width=dus[0].shape[2], group=p, more=tuple(dus[1:]), launch=launch)
    return dst, (column_sum(part).view(p, a, lanes) if summed else part)


def group_gemm(x, ws, alphas):
    """The group's forward up to its outputs' transforms: (u [P, A, N, LIp], zero past LI
    (``row_width``); y [P*A, N, LOp], layer k's blocks at rows k*A..(k+1)*A); shared with
    ``walsh.kernels.walsh_mlp``, whose gate and up are such a group."""
    p, a, n = len(ws), ws[0].shape[0], x.shape[0]
    # the weights stacked already transposed ([P*A, LIp, LOp], contiguous: the cat copies
    # either way). cuBLAS ran the transposed view at the 1.3B FFN's 2 x 32 blocks of 64 -> 176
    # lanes in 200.5 us, the contiguous copy in 143.3, bit-equal (H200, session 17; the q, k,
    # v group's 64 -> 64 lanes: 103.5 and 103.2)
    wt = torch.cat([padded_weight(w).transpose(1, 2) for w in ws])      # [P*A, LIp, LOp]
    u = walsh_in_group_raw(x, torch.stack(alphas), width=wt.shape[1])  # [P, A, N, LIp]
    return u, block_mm(u.view(p * a, n, wt.shape[1]), wt)              # y [P*A, N, LOp]


def group_forward(x, ws, alphas, betas, rope=None, n_rope=0):
    """(outs: P x [N, A*LO], u [P, A, N, LIp]); u is zero past LI (``row_width``). The first
    ``n_rope`` outputs rotated by ``rope`` (cos, sin) in their walsh_out pass (q and k)."""
    a, lo = ws[0].shape[:2]
    u, y = group_gemm(x, ws, alphas)
    return [walsh_out_raw(y[k * a:(k + 1) * a], be, a, lanes=lo,
                          rope=rope if k < n_rope else None)
            for k, be in enumerate(betas)], u


def group_backward(douts, x, ws, alphas, betas, u, outs, rope=None, n_rope=0):
    """(dx, dws, fp32 dalphas [P, A, LI], fp32 dbetas): each layer's dy and dbeta as its own
    backward's (dbeta = sum dout * out / beta), its du and dw by its own GEMMs, then dx and the
    dalphas in one pass over the P du's and x; the 2P + 1 gradients' partial tables summed in
    one launch (``column_sums``)."""
    p, (a, lo, li) = len(ws), ws[0].shape
    dus, tables = [], []
    for k, w in enumerate(ws):
        du, dw_part, dbeta_part = backward_to_du(douts[k], w, betas[k], outs[k], u[k],
                                                 rope if k < n_rope else None)  # [A, N, LIp]
        dus.append(du)
        tables += [dw_part, dbeta_part]
    dx, dalpha_part = walsh_out_group_gain_raw(dus, torch.stack(alphas), x, summed=False)
    *sums, dalpha = column_sums([*tables, dalpha_part])
    dws = [layer_dw(t, w, dus[0].dtype) for t, w in zip(sums[0::2], ws)]
    return dx, dws, dalpha.view(p, a, li), [t.view(a, lo) for t in sums[1::2]]


# -- autograd: a forward and a backward op per group (``walsh.kernels.registry``) -------------
def _group_fake(x, ws, alphas, betas, cos, sin, n_rope):
    a, lo, li = ws[0].shape
    n = x.shape[0]
    return [x.new_empty(n, a * lo) for _ in ws] + [x.new_empty(len(ws), a, n, row_width(li))]


@kernel_op("walsh::walsh_group", _group_fake)
def _group_op(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
              betas: list[torch.Tensor], cos: torch.Tensor | None, sin: torch.Tensor | None,
              n_rope: int) -> list[torch.Tensor]:
    """[out_1, .., out_P, u]: u is saved for the backward beside the outs; the first n_rope
    outs rotated by RoPE (cos, sin)."""
    outs, u = group_forward(x, ws, alphas, betas, _rope(cos, sin), n_rope)
    return [*outs, u]


def _group_backward_fake(douts, x, ws, alphas, betas, u, outs, cos, sin, n_rope):
    return [torch.empty_like(x), *(torch.empty_like(t) for t in (*ws, *alphas, *betas))]


@kernel_op("walsh::walsh_group_backward", _group_backward_fake)
def _group_backward_op(douts: list[torch.Tensor], x: torch.Tensor, ws: list[torch.Tensor],
                       alphas: list[torch.Tensor], betas: list[torch.Tensor], u: torch.Tensor,
                       outs: list[torch.Tensor], cos: torch.Tensor | None,
                       sin: torch.Tensor | None, n_rope: int) -> list[torch.Tensor]:
    """[dx, dw_1.., dalpha_1.., dbeta_1..], each in its input's dtype."""
    dx, dws, dalpha, dbetas = group_backward(douts, x, ws, alphas, betas, u, outs,
                                             _rope(cos, sin), n_rope)
    return [dx.to(x.dtype), *(d.to(w.dtype) for d, w in zip(dws, ws)),
            # copies: the dalphas are rows of one tensor, and an op's outputs may not alias
            *(d.to(al.dtype, copy=True) for d, al in zip(dalpha.unbind(0), alphas)),
            *(d.to(be.dtype) for d, be in zip(dbetas, betas))]


def _setup(ctx, inputs, output):
    x, ws, alphas, betas, cos, sin, n_rope = inputs
    ctx.p, ctx.n_rope = len(ws), n_rope
    ctx.set_materialize_grads(False)  # u gets no gradient: no zero buffer of its size
    # the outs themselves for dbeta: SDPA keeps v and SwiGLU keeps gate and up, the same
    # tensors, for their own backward (``walsh.kernels.walsh_transform``'s module doc); q and k
    # are the tensors SDPA keeps when RoPE is applied inside (n_rope = 2), else kept for dbeta
    # alone (RoPE apart saves neither)
    ctx.save_for_backward(x, output[-1], cos, sin, *ws, *alphas, *betas, *output[:-1])


def _backward(ctx, grads):
    p = ctx.p
    x, u, cos, sin, *rest = ctx.saved_tensors
    ws, alphas, betas, outs = (rest[k * p:(k + 1) * p] for k in range(4))
    douts = grads[:p]
    if all(d is None for d in douts):  # only u was used: nothing flows back
        return None, None, None, None, None, None, None
    used = [d is not None for d in douts]
    douts = [torch.zeros_like(o) if d is None else d.contiguous() for d, o in zip(douts, outs)]
    r = _group_backward_op(douts, x, list(ws), list(alphas), list(betas), u, list(outs), cos,
                           sin, ctx.n_rope)
    # a layer whose output was not used gets no gradients (None, as alone), not zeros
    dws, dalphas, dbetas = ([g if k else None for g, k in zip(r[s:s + p], used)]
                            for s in (1, 1 + p, 1 + 2 * p))
    return r[0], dws, dalphas, dbetas, None, None, None


_group_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def walsh_group(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
                betas: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                n_rope: int = 0) -> list[torch.Tensor]:
    """x [N, A*LI], ws[p] [A, LO, LI], alphas[p] [A, LI], betas[p] [A, LO] (2 or 3 layers, all
    x's dtype) -> P outputs [N, A*LO]: the twin of ``walsh_group_naive``, differentiable in all.
    Each output is saved for the backward (an in-place change of one before the backward
    raises autograd's error). ``rope`` (per-lane cos, sin [T, A*LO]; ``walsh_linear``'s):
    the first ``n_rope`` outputs (attention's q and k) rotated inside their walsh_out pass."""
    p = len(ws)
    if not 0 <= n_rope <= p or (n_rope > 0) != (rope is not None):
        raise ValueError(f"walsh_group: n_rope {n_rope} of {p} layers needs RoPE's tables, and "
                         "tables need n_rope > 0")
    if not 2 <= p <= MAX_GROUP or len(alphas) != p or len(betas) != p:
        raise ValueError(f"walsh_group: 2 to {MAX_GROUP} layers, each with a weight, alpha and "
                         f"beta; got {len(ws)}, {len(alphas)}, {len(betas)}")
    a, lo, li = ws[0].shape
    if a < 2 or a & (a - 1):
        raise ValueError(f"walsh_group: blocks must be a power of two >= 2, got {a}")
    for k in range(p):
        shapes = (tuple(ws[k].shape), tuple(alphas[k].shape), tuple(betas[k].shape))
        if x.ndim != 2 or x.shape[1] != a * li or shapes != ((a, lo, li), (a, li), (a, lo)):
            raise ValueError(f"walsh_group: layer {k}'s shapes w, alpha, beta {shapes} with x "
                             f"{tuple(x.shape)} do not fit x [N, A*LI], w [A, LO, LI], alpha "
                             f"[A, LI], beta [A, LO] with A, LO, LI = {a}, {lo}, {li}")
        for name, t in (("w", ws[k]), ("alpha", alphas[k]), ("beta", betas[k])):
            if t.dtype != x.dtype:
                raise ValueError(f"walsh_group: layer {k}'s {name} dtype {t.dtype} != x dtype "
                                 f"{x.dtype}")
    cos, sin = rope if rope is not None else (None, None)
    return list(_group_op(x, list(ws), list(alphas), list(betas), cos, sin, n_rope)[:-1])
