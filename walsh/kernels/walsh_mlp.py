"""The Walsh MLP as one op: down(silu(gate(x)) * up(x)), its middle transforms chained.

The group op (``walsh.kernels.walsh_group``: gate and up) and the down projection with
SwiGLU's product inside (``walsh.kernels.walsh_swiglu``) meet at gate and up, token-major
[N, H] tensors that one op writes and the other reads. Here the three layers are one op, and
the transforms on either side of gate and up run as one pass over each slab
(``walsh.kernels.walsh_mlp_kernel``):
    forward:  u = walsh_in_group(x, alpha_g, alpha_u); y_g, y_u = bmm(u, W_g^T), bmm(u, W_u^T)
              gate, up, u_d = chain(y_g, y_u)          (gate, up written: the backward reads them)
              out = walsh_out(bmm(u_d, W_d^T), beta_d)
    backward: dy_d, dbeta_d = walsh_in_gain(dout, beta_d, out); du_d, dW_d = block_mm_dual
              dy_g, dy_u, dalpha_d, dbeta_g, dbeta_u = chain'(du_d, gate, up)
              du_g, dW_g and du_u, dW_u = bmm's; dx, dalpha_g, dalpha_u = the group's dx pass
The chain moves 10 H bytes a token each way (bf16) where the passes apart moved 14 H forward
and 22 H backward (the kernel module's doc). Saved for the backward: x, u, gate, up, u_d and
out, as the two ops apart saved.

Measured on an H200 (docs/benchmarks.md, sessions 28-29; N = 16k, A = 32, bf16, CUDA graphs),
the chained passes against the passes apart, us, forward / backward: 64 hidden lanes (the
125M) 99.4 / 143.1 against 131.7 / 212.2; 88 (the 350M's 86 lanes padded) 191.3 / 331.5
against 237.9 / 426.1 (hidden 2816); 176 (the 1.3B's 172) 387.5 / 496.3 against 485.6 /
816.4 (the passes apart: session 28's figures). Session 28's launch ran a token's 256 padded
lanes as one slab (and the forward one slab a program): at 176 lanes 511.3 / 1027.6, slower
than apart (the three transforms' values spilled), so the 1.3B kept the two ops; since
session 29 the backward cuts such rows into 64-lane chunks and the forward loops over its
slabs, pipelined (``walsh_launch.MLP_CHAIN``), and ``fuse_mlp`` takes the one op up to
``walsh_launch.MLP_MAX_LANES`` (176). In the models (session 29, the lent H200, separate
calls): walsh-h-1b3 126,268 tok/s against 116,167 with the two ops (+8.7%; dense-1b3 63,426:
1.99x), walsh-h-350m 219,850 (session 28: 212,132 with the one op, 205,244 with two),
walsh-h-125m 469,074 (session 28: 465,606; dense-125m 425,317: 1.10x).

Who calls it: ``walsh.layers.hadamard.mlp_one_op`` for a SwiGLU that ``fuse_mlp`` marked: gate
and up a group, the down projection computing the product inside, no bias, hidden rows of at
most ``walsh_launch.MLP_MAX_LANES`` lanes (config ``walsh_mlp``; the three layers on the
``triton`` path without activation quantization). The naive
reference with the same signature is ``walsh_mlp_naive``.

Code order: naive reference, launchers, forward and backward bodies, autograd (ops),
functional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from walsh.kernels.block_matmul import block_mm, block_mm_dual
from walsh.kernels.column_sum import column_sum, column_sums
from walsh.kernels.registry import INTERPRETED, WIDE_NUMEL, kernel_op, wrap_triton
from walsh.kernels.walsh_group import group_gemm, walsh_out_group_gain_raw
from walsh.kernels.walsh_launch import checked_launch, mlp_chain_params, program_slabs, use_dot
from walsh.kernels.walsh_linear import (
    backward_to_du,
    layer_dw,
    padded_weight,
    walsh_linear_naive,
)
from walsh.kernels.walsh_mlp_kernel import _mlp_chain_kernel
from walsh.kernels.walsh_transform import row_width, walsh_out_raw


def walsh_mlp_naive(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
                    betas: list[torch.Tensor]) -> torch.Tensor:
    """x [N, A*LI]; ws = (w_g, w_u [A, LH, LI], w_d [A, LO, LH]), alphas and betas likewise
    (gate, up, down) -> [N, A*LO]: the three layers' ``blocks`` path."""
    gate = walsh_linear_naive(x, ws[0], alphas[0], betas[0])
    up = walsh_linear_naive(x, ws[1], alphas[1], betas[1])
    return walsh_linear_naive(F.silu(gate) * up, ws[2], alphas[2], betas[2])


# -- launchers --------------------------------------------------------------------------------
def _chain(fwd: bool, src: torch.Tensor, src1: torch.Tensor | None, gate: torch.Tensor,
           up: torch.Tensor, beta_g: torch.Tensor, beta_u: torch.Tensor, alpha_d: torch.Tensor,
           out: tuple[torch.Tensor, ...] | None = None,
           launch: tuple[int, int, int, int, int] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch ``_mlp_chain_kernel``: (dst, dst1 or None, fp32 partial sums [rows, 3*A*L] or
    None). fwd: src, src1 = y_g, y_u [A, N, W]; gate, up are written; dst = u_d [A, N, W].
    Else: src = du_d [A, N, W], gate and up read; dst, dst1 = dy_g, dy_u [A, N, W].
    ``out``: buffers for dst (and dst1), contiguous [A, N, W] (tests poison them).
    ``launch``: (LB lanes per chunk, tokens per slab, warps, stages, tokens per program) in
    place of the table's ``mlp_chain_params`` (``walsh bench launch`` sweeps them;
    ``walsh_launch.checked_launch``)."""
    a, n, width = src.shape
    lanes = gate.shape[1] // a
    for name, t in (("gate", gate), ("up", up)):
        if tuple(t.shape) != (n, a * lanes) or not t.is_contiguous() or t.dtype != src.dtype:
            raise ValueError(f"walsh_mlp chain: {name} must be a contiguous {(n, a * lanes)} "
                             f"{src.dtype} tensor, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("beta_g", beta_g), ("beta_u", beta_u), ("alpha_d", alpha_d)):
        if tuple(t.shape) != (a, lanes):
            raise ValueError(f"walsh_mlp chain: {name} must be {(a, lanes)}, got "
                             f"{tuple(t.shape)}")
    if width < lanes or (src1 is not None and src1.shape != src.shape):
        raise ValueError(f"walsh_mlp chain: block-major rows {tuple(src.shape)} cannot hold "
                         f"{lanes} lanes, or the two sources differ")
    lb, bt, warps, stages, tokens = (checked_launch(launch, "walsh_mlp chain") if launch
                                     else mlp_chain_params(fwd, width))
    iters = program_slabs(tokens, bt, n)  # slabs a program loops over, pipelined by STAGES
    rows = triton.cdiv(n, bt * iters)
    if out is None:
        out = [torch.empty(a, n, width, device=src.device, dtype=src.dtype)
               for _ in range(1 if fwd else 2)]
    if len(out) != (1 if fwd else 2) or any(
            t.shape != src.shape or t.dtype != src.dtype or not t.is_contiguous() for t in out):
        raise ValueError(f"walsh_mlp chain: out must be {1 if fwd else 2} contiguous "
                         f"{tuple(src.shape)} {src.dtype} tensor(s)")
    dst, dst1 = out[0], (None if fwd else out[1])
    part = None if fwd else torch.empty(rows, 3 * a * lanes, device=src.device,
                                        dtype=torch.float32)  # every entry written
    if n * width == 0:
        return dst, dst1, part

    def arg(t, dtype=src.dtype):  # unused pointers get empties of their own, never aliases
        return t.contiguous() if t is not None else src.new_empty(0, dtype=dtype)

    wrap_triton(_mlp_chain_kernel)[(rows, triton.cdiv(width, lb))](
        src.contiguous(), arg(src1), gate, up, dst, arg(dst1), beta_g.contiguous(),
        beta_u.contiguous(), alpha_d.contiguous(), arg(part, torch.float32), n, iters,
        1.0 / math.sqrt(a), A=a, LOG_A=int(math.log2(a)), L=lanes, LP=width, LB=lb, BT=bt,
        FWD=fwd, USE_DOT=use_dot(a, lanes), IEEE=src.dtype == torch.float32,
        BF16_DOT=src.dtype == torch.bfloat16, INTERPRETED=INTERPRETED,
        WIDE=n * a * width >= WIDE_NUMEL, STAGES=stages, num_warps=warps)
    return dst, dst1, part


def mlp_chain_fwd_raw(y_g: torch.Tensor, y_u: torch.Tensor, beta_g: torch.Tensor,
                      beta_u: torch.Tensor, alpha_d: torch.Tensor, lanes: int,
                      out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      launch: tuple[int, int, int, int, int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_g, y_u [A, N, W] -> (gate, up [N, A*lanes] = beta * S H y, u_d [A, N, W] =
    S H (alpha_d * silu(gate) * up), zero past lanes) in one pass (no autograd); ``out``:
    buffers for the three (contiguous); ``launch``: as ``_chain``'s."""
    a, n = y_g.shape[:2]
    if out is None:
        gate = torch.empty(n, a * lanes, device=y_g.device, dtype=y_g.dtype)
        out = (gate, torch.empty_like(gate), None)
    gate, up, u_d = out
    u_d = _chain(True, y_g, y_u, gate, up, beta_g, beta_u, alpha_d,
                 None if u_d is None else (u_d,), launch)[0]
    return gate, up, u_d


def mlp_chain_bwd_raw(du_d: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      beta_g: torch.Tensor, beta_u: torch.Tensor, alpha_d: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      launch: tuple[int, int, int, int, int] | None = None
                      ) -> tuple[torch.Tensor, ...]:
    """du_d [A, N, W], the saved gate and up [N, A*L] -> (dy_g, dy_u [A, N, W], zero past L;
    fp32 dalpha_d, dbeta_g, dbeta_u [A, L]) in one pass (no autograd); what lies past L in
    du_d's rows reaches no result. ``out``: buffers for dy_g and dy_u; ``launch``: as
    ``_chain``'s."""
    a = du_d.shape[0]
    dy_g, dy_u, part = _chain(False, du_d, None, gate, up, beta_g, beta_u, alpha_d, out,
                              launch)
    sums = column_sum(part).view(3, a, -1)
    return dy_g, dy_u, sums[0], sums[1], sums[2]


# -- forward and backward bodies ------------------------------------------------------------
def mlp_forward(x, ws, alphas, betas):
    """(out [N, A*LO], gate, up [N, A*LH], u [2, A, N, LIp], u_d [A, N, LHp])."""
    (a, lh, _), lo = ws[0].shape, ws[2].shape[1]
    u, y = group_gemm(x, ws[:2], alphas[:2])                   # [2, A, N, LIp], [2A, N, LHp]
    gate, up, u_d = mlp_chain_fwd_raw(y[:a], y[a:], betas[0], betas[1], alphas[2], lh)
    y_d = block_mm(u_d, padded_weight(ws[2]).transpose(1, 2))           # [A, N, LOp]
    return walsh_out_raw(y_d, betas[2], a, lanes=lo), gate, up, u, u_d


def mlp_backward(dout, x, ws, alphas, betas, u, u_d, gate, up, out):
    """(dx, [dw_g, dw_u, dw_d], fp32 [dalpha_g, dalpha_u, dalpha_d], fp32 [dbeta_g, ..])."""
    a, lh, li = ws[0].shape
    du_d, dw_d, dbeta_d = backward_to_du(dout, ws[2], betas[2], out, u_d)  # [A, N, LHp]
    # dy_g, dy_u [A, N, LHp]; chain: the fp32 table of dalpha_d, dbeta_g, dbeta_u's sums
    dy_g, dy_u, chain = _chain(False, du_d, None, gate, up, betas[0], betas[1], alphas[2])
    # block_mm_dual called here, not through a helper shared with backward_to_du: torch finds
    # a triton_op's kernels by scanning the functions its body calls to a limited depth, and
    # one more level hid block_mm's and block_mm_tn's kernels from the op's compile cache key
    # (tests/walsh/test_kernels.py caught it)
    dus, dw_parts = [], []
    for k, dy in enumerate((dy_g, dy_u)):
        du, dw = block_mm_dual(dy, padded_weight(ws[k]), u[k], summed=False)  # du [A, N, LIp]
        dus.append(du)
        dw_parts.append(dw)
    dx, dalpha = walsh_out_group_gain_raw(dus, torch.stack(alphas[:2]), x, summed=False)
    # the six partial tables (dW of gate, up, down; down's dbeta; the chain's gains; dalpha)
    # summed in one launch (``column_sums``)
    dw_g, dw_u, dw_d, dbeta_d, chain, dalpha = column_sums([*dw_parts, dw_d, dbeta_d, chain,
                                                            dalpha])
    dws = [layer_dw(t, w, du_d.dtype) for t, w in zip((dw_g, dw_u, dw_d), ws)]
    chain, dalpha = chain.view(3, a, lh), dalpha.view(2, a, li)
    return (dx, dws, [dalpha[0], dalpha[1], chain[0]],
            [chain[1], chain[2], dbeta_d.view(a, ws[2].shape[1])])


# -- autograd: a forward and a backward op (``walsh.kernels.registry``) -----------------------
def _fake(x, ws, alphas, betas):
    (a, lh, li), lo = ws[0].shape, ws[2].shape[1]
    n = x.shape[0]
    return [x.new_empty(n, a * lo), x.new_empty(n, a * lh), x.new_empty(n, a * lh),
            x.new_empty(2, a, n, row_width(li)), x.new_empty(a, n, row_width(lh))]


@kernel_op("walsh::walsh_mlp", _fake)
def _mlp_op(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
            betas: list[torch.Tensor]) -> list[torch.Tensor]:
    """[out, gate, up, u, u_d]: all but out saved for the backward (internal)."""
    return list(mlp_forward(x, ws, alphas, betas))


def _backward_fake(dout, x, ws, alphas, betas, u, u_d, gate, up, out):
    return [torch.empty_like(x), *(torch.empty_like(t) for t in (*ws, *alphas, *betas))]


@kernel_op("walsh::walsh_mlp_backward", _backward_fake)
def _mlp_backward_op(dout: torch.Tensor, x: torch.Tensor, ws: list[torch.Tensor],
                     alphas: list[torch.Tensor], betas: list[torch.Tensor], u: torch.Tensor,
                     u_d: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     out: torch.Tensor) -> list[torch.Tensor]:
    """[dx, dw_g, dw_u, dw_d, dalpha_g, .., dbeta_d], each in its input's dtype."""
    dx, dws, dalphas, dbetas = mlp_backward(dout, x, ws, alphas, betas, u, u_d, gate, up, out)
    # copies: the gains' gradients are rows of two tensors (the group's dalphas, the chain's
    # three sums), and an op's outputs may not alias
    return [dx.to(x.dtype), *(d.to(w.dtype) for d, w in zip(dws, ws)),
            *(d.to(al.dtype, copy=True) for d, al in zip(dalphas, alphas)),
            *(d.to(be.dtype, copy=True) for d, be in zip(dbetas, betas))]


def _setup(ctx, inputs, output):
    x, ws, alphas, betas = inputs
    ctx.set_materialize_grads(False)  # the internal outputs get no gradient
    ctx.save_for_backward(x, *ws, *alphas, *betas, *output[1:], output[0])


def _backward(ctx, grads):  # the op's outputs are one list: [dout, None for the internal]
    dout = grads[0]
    if dout is None:
        return None, None, None, None
    x, *rest = ctx.saved_tensors
    ws, alphas, betas = (list(rest[k * 3:(k + 1) * 3]) for k in range(3))
    gate, up, u, u_d, out = rest[9:]
    r = _mlp_backward_op(dout.contiguous(), x, ws, alphas, betas, u, u_d, gate, up, out)
    return r[0], r[1:4], r[4:7], r[7:10]


_mlp_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def walsh_mlp(x: torch.Tensor, ws: list[torch.Tensor], alphas: list[torch.Tensor],
              betas: list[torch.Tensor]) -> torch.Tensor:
    """x [N, A*LI]; ws = (w_g, w_u [A, LH, LI], w_d [A, LO, LH]); alphas = ([A, LI], [A, LI],
    [A, LH]); betas = ([A, LH], [A, LH], [A, LO]); all x's dtype -> [N, A*LO]: the twin of
    ``walsh_mlp_naive``, differentiable in all ten. Its output is saved for the backward (an
    in-place change of it before the backward raises autograd's error)."""
    if len(ws) != 3 or len(alphas) != 3 or len(betas) != 3:
        raise ValueError(f"walsh_mlp: three layers (gate, up, down), each with a weight, alpha "
                         f"and beta; got {len(ws)}, {len(alphas)}, {len(betas)}")
    (a, lh, li), lo = ws[0].shape, ws[2].shape[1] if ws[2].ndim == 3 else -1
    if a < 2 or a & (a - 1):
        raise ValueError(f"walsh_mlp: blocks must be a power of two >= 2, got {a}")
    want = [((a, lh, li), (a, li), (a, lh)), ((a, lh, li), (a, li), (a, lh)),
            ((a, lo, lh), (a, lh), (a, lo))]
    for k, name in enumerate(("gate", "up", "down")):
        shapes = (tuple(ws[k].shape), tuple(alphas[k].shape), tuple(betas[k].shape))
        if x.ndim != 2 or x.shape[1] != a * li or shapes != want[k]:
            raise ValueError(f"walsh_mlp: {name}'s w, alpha, beta {shapes} with x "
                             f"{tuple(x.shape)} do not fit {want[k]} (x [N, {a * li}])")
        for what, t in (("w", ws[k]), ("alpha", alphas[k]), ("beta", betas[k])):
            if t.dtype != x.dtype:
                raise ValueError(f"walsh_mlp: {name}'s {what} dtype {t.dtype} != x dtype "
                                 f"{x.dtype}")
    return _mlp_op(x.contiguous(), list(ws), list(alphas), list(betas))[0]
