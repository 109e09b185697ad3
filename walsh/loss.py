"""Chunked (fused) linear cross-entropy that never keeps a [N, V] tensor alive.

Forward: for each chunk of ``chunk`` tokens, logits_c = h_c W^T in fp32, keep only the
log-sum-exp [N] and the loss sum. Backward: recompute logits_c, form
g_c = (softmax - onehot) * grad / n_valid, then dh_c = g_c W and dW += g_c^T h_c. Peak extra
memory is one [chunk, V] fp32 block instead of [N, V] logits plus their softmax (MODEL_SPEC
section 7; the seed kept the full fp32 logits for backward).

``naive_linear_cross_entropy`` is the reference with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        # h: [N, C] (compute dtype), weight: [V, C], targets: [N] long
        n = h.shape[0]
        w = weight.to(h.dtype)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        valid = targets != ignore_index
        for s in range(0, n, chunk):
            logits = (h[s : s + chunk] @ w.T).float()  # [c, V]
            lse_c = torch.logsumexp(logits, dim=-1)
            tgt = targets[s : s + chunk].clamp(min=0)
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            total += ((lse_c - picked) * valid[s : s + chunk]).sum()
            lse[s : s + chunk] = lse_c
            del logits
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(h, weight, targets, lse, n_valid)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse, n_valid = ctx.saved_tensors
        chunk, ignore_index = ctx.chunk, ctx.ignore_index
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        scale = grad_out.float() / n_valid
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            # softmax, [c, V]; in place so only one fp32 [c, V] block is alive
            g = (hc @ w.T).float().sub_(lse[s : s + chunk, None]).exp_()
            valid = tc != ignore_index
            rows = torch.arange(tc.shape[0], device=h.device)
            g[rows, tc.clamp(min=0)] -= 1.0
            g = g.mul_((scale * valid)[:, None]).to(h.dtype)
            grad_h[s : s + chunk] = g @ w
            grad_w += (g.T @ hc).float()
            del g
        return grad_h, grad_w.to(weight.dtype), None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 2048,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean CE of logits h @ weight.T against targets. h: [N, C], weight: [V, C], targets: [N]."""
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h [N, C] and targets [N], got {tuple(h.shape)}, "
                         f"{tuple(targets.shape)}")
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index)


def naive_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 2048,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Reference: full [N, V] logits, then ``F.cross_entropy`` (``chunk`` unused)."""
    logits = (h @ weight.to(h.dtype).T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
