"""The MLP's down projection with SwiGLU's product inside its passes: down(silu(gate) * up),
one op.

SwiGLU (``walsh.layers.common``) feeds its down projection h = silu(gate) * up [N, H]. Apart,
the product is an elementwise kernel of its own, and h and dh cross HBM five times a step: h
written by SwiGLU's forward and read by the down layer's walsh_in and by its dx pass (for
dalpha), dh written by that pass and read by SwiGLU's backward beside gate and up. The down
layer also saves h for its dalpha. Here the down projection's two passes over its input compute h
themselves (``_walsh_kernel``'s SWIGLU), from the gate and up that the group op
(``walsh.kernels.walsh_group``) wrote and saved anyway:
    forward:  u = walsh_in(silu(gate) * up, alpha)                    gate and up read, u written
              y = bmm(u, W^T), out = walsh_out(y, beta)               as the layer alone
    backward: dy, dbeta = walsh_in_gain(dout, beta, out); du = dy W; dw = dy^T u   (as alone)
              dh = alpha * S H du, dalpha = sum_i h * S H du,
              dgate = dh * up * silu'(gate), dup = dh * silu(gate)    du, gate, up read once
HBM passes over an [N, H] tensor per MLP and step: 6, against 11 for the layer alone beside
SwiGLU's two elementwise kernels (forward: gate and up read, against gate and up read, h
written and read; backward: gate and up read, dgate and dup written, against h read and dh
written by the dx pass, then dh, gate and up read and dgate and dup written). And h is not
saved. At the 1.3B shape (H = 5504, 16 x 1024 tokens, bf16) a pass is 180 MB, about 42 us at
4.25 TB/s: 5 passes are about 5 ms of a step's 24 layers, and h is 4.3 GB of memory.

Measured on an H200 (docs/benchmarks.md, session 17; CUDA graphs, 16k tokens, bf16), the two
passes against the product apart (SwiGLU's compiled kernels plus the layer's own passes), us:
at 64 lanes (H = 2048, the 125M) forward 58.7 against 85.1, backward 106.0 against 156.4; at
86 (the 350M) 114.4 against 135.4 and 229.2 against 240.5; at 172 (the 1.3B) 225.0 against
247.3 and 466.7 against 477.2: the dx pass at wide rows runs at 2.2x its roofline (the plain
one at 2.1x), so the 1.3B keeps less than the bytes promise. In the models: walsh-h-125m
+2.0% (CUDA graphs, 0.90x dense against 0.88x), walsh-h-1b3 +0.4-1.0% (three pairs) with
43.4 GiB peak against 47.4-47.9.

Precision: h and silu'(gate) are computed in fp32. The forward rounds h once, as alpha * h, for
the transform's dot (bf16 operands, as the layer's own walsh_in); the dalpha sum, dgate and dup
use h unrounded. The unfused path rounds silu(gate), h, and SwiGLU's backward products to the
input dtype. The transforms and GEMMs are the layer's own. The naive reference with the same
signature is ``swiglu_linear_naive``.

Who calls it: ``walsh.layers.hadamard.swiglu_down`` for a down projection that
``fuse_swiglu`` marked (a Walsh layer on the ``triton`` path without activation quantization;
config ``walsh_swiglu``). The op reads the down layer's parameters from SwiGLU's forward: under
ZeRO-3, ``pipeline.parallelize`` makes SwiGLU a leaf module, as for the groups.

Code order: naive reference, launcher, autograd (ops), functional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from walsh.kernels.column_sum import column_sum, column_sums
from walsh.kernels.registry import kernel_op
from walsh.kernels.walsh_linear import (
    backward_to_du,
    layer_dw,
    three_kernel_forward,
    walsh_linear_naive,
)
from walsh.kernels.walsh_transform import _launch, row_width


def swiglu_linear_naive(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor,
                        alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """gate, up [N, A*LI], w [A, LO, LI], alpha [A, LI], beta [A, LO] -> [N, A*LO]: the down
    layer (``blocks`` path) on silu(gate) * up."""
    return walsh_linear_naive(F.silu(gate) * up, w, alpha, beta)


# -- launcher ---------------------------------------------------------------------------------
def walsh_out_swiglu_gain_raw(du: torch.Tensor, alpha: torch.Tensor, gate: torch.Tensor,
                              up: torch.Tensor, out: torch.Tensor | None = None,
                              out1: torch.Tensor | None = None, summed: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """du [A, N, W], alpha [A, L], gate and up [N, A*L] -> (dgate, dup [N, A*L], fp32 dalpha
    [A, L]) with dh = alpha * S H du: dgate = dh * up * silu'(gate), dup = dh * silu(gate),
    dalpha = sum over tokens of silu(gate) * up * S H du, in one pass (no autograd); what lies
    past L in du's rows reaches no result. ``out``, ``out1``: buffers for dgate and dup.
    ``summed=False``: dalpha's fp32 partial table [P, A*L] in its place."""
    a, lanes = alpha.shape
    if out1 is None:  # contiguous whatever gate's strides (the launcher checks)
        out1 = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    dgate, part = _launch(du, alpha, a, lanes, gate.shape[0], in_mode=False, out=out,
                          other=gate, width=du.shape[2], up=up.contiguous(), out1=out1)
    return dgate, out1, (column_sum(part).view(a, lanes) if summed else part)


def swiglu_backward(dout, gate, up, w, alpha, beta, u, out):
    """(dgate, dup, dw, fp32 dalpha, fp32 dbeta) from the saved u and out: the layer's own
    backward up to du (``backward_to_du``) and its dw, then one pass for dh's two products."""
    a, lo, li = w.shape
    du, dw_part, dbeta_part = backward_to_du(dout, w, beta, out, u)   # du [A, N, LIp]
    dgate, dup, dalpha_part = walsh_out_swiglu_gain_raw(du, alpha, gate, up, summed=False)
    dw, dbeta, dalpha = column_sums([dw_part, dbeta_part, dalpha_part])  # one launch
    return dgate, dup, layer_dw(dw, w, du.dtype), dalpha.view(a, li), dbeta.view(a, lo)


# -- autograd: a forward and a backward op (``walsh.kernels.registry``) -----------------------
def _fake(gate, up, w, alpha, beta):
    a, lo, li = w.shape
    n = gate.shape[0]
    return gate.new_empty(n, a * lo), gate.new_empty(a, n, row_width(li))


@kernel_op("walsh::swiglu_linear", _fake)
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
               beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, u): u is saved for the backward beside out, as the layer alone saves them."""
    return three_kernel_forward(gate, w, alpha, beta, up=up.contiguous())


def _backward_fake(dout, gate, up, w, alpha, beta, u, out):
    return [torch.empty_like(t) for t in (gate, up, w, alpha, beta)]


@kernel_op("walsh::swiglu_linear_backward", _backward_fake)
def _swiglu_backward_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                        u: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    """[dgate, dup, dw, dalpha, dbeta], each in its input's dtype."""
    grads = swiglu_backward(dout, gate, up, w, alpha, beta, u, out)
    return [g.to(t.dtype) for g, t in zip(grads, (gate, up, w, alpha, beta))]


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # u gets no gradient: no zero buffer of its size
    # gate and up are the group's outputs, which it keeps for its own dbeta: no new memory
    # (with a bias on gate and up, the group keeps them before the bias and this op after,
    # as the product apart did)
    ctx.save_for_backward(*inputs, output[1], output[0])


def _backward(ctx, dout, _du):  # u is internal: its gradient is never used
    if dout is None:
        return None, None, None, None, None
    return tuple(_swiglu_backward_op(dout.contiguous(), *ctx.saved_tensors))


_swiglu_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
                  beta: torch.Tensor) -> torch.Tensor:
    """gate, up [N, A*LI], w [A, LO, LI], alpha [A, LI], beta [A, LO] (all gate's dtype) ->
    [N, A*LO]: the twin of ``swiglu_linear_naive``, differentiable in all five. The output is
    saved for the backward (an in-place change of it before the backward raises autograd's
    error)."""
    a, lo, li = w.shape
    if a < 2 or a & (a - 1):
        raise ValueError(f"swiglu_linear: blocks must be a power of two >= 2, got {a}")
    if (gate.ndim != 2 or gate.shape[1] != a * li or up.shape != gate.shape
            or alpha.shape != (a, li) or beta.shape != (a, lo)):
        raise ValueError(f"swiglu_linear: shapes gate {tuple(gate.shape)}, up "
                         f"{tuple(up.shape)}, w {tuple(w.shape)}, alpha {tuple(alpha.shape)}, "
                         f"beta {tuple(beta.shape)} do not fit gate, up [N, A*LI], "
                         "w [A, LO, LI], alpha [A, LI], beta [A, LO]")
    for name, t in (("up", up), ("w", w), ("alpha", alpha), ("beta", beta)):
        if t.dtype != gate.dtype:
            raise ValueError(f"swiglu_linear: {name} dtype {t.dtype} != gate dtype {gate.dtype}")
    # contiguous: the op saves them for the dx pass, which reads and writes token-major rows
    return _swiglu_op(gate.contiguous(), up.contiguous(), w, alpha, beta)[0]
