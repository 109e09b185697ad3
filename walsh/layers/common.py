"""RMSNorm, rotary position embedding and the SwiGLU feed-forward block.

These are the non-structured pieces of the LLaMA-style block. RMSNorm computes in fp32 (eps 1e-6)
and returns the input dtype; RoPE (theta 10000) rotates pairs (x[2i], x[2i+1]) of each head.
"""

from __future__ import annotations

import torch
from torch import nn

from walsh.layers.base import compute_dtype
from walsh.layers.hadamard import (
    fuse_mlp,
    fuse_swiglu,
    group_layers,
    mlp_one_op,
    shared_input,
    swiglu_down,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., C] -> [..., C]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cache(
    seq_len: int, head_dim: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, head_dim // 2] (fp32)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D/2] (already offset to the tokens' positions)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_lanes(cos: torch.Tensor, sin: torch.Tensor, n_head: int,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's tables per lane of a [.., T, n_head * D] output, for the Walsh kernel's rotation
    inside walsh_out (``walsh.kernels.walsh_transform_kernel``'s ROPE): cos, sin [T, D/2] ->
    contiguous (c, s) [T, n_head * D] in ``dtype`` (fp32, or fp16 for bf16 and fp16 data:
    ``rope_table_dtype``) with c = cos and s = -sin on each pair's first lane, +sin on its
    second, so that ``apply_rope``'s r = c * z + s * z' (z' the pair partner).
    Token-major like the data, so the kernel reads them in the same contiguous runs (session
    17's [T, D/2] gathers per element made its passes 2-5x slower)."""
    c = cos.float()[:, :, None].expand(-1, -1, 2)                       # [T, D/2, 2]
    s = torch.stack((-sin.float(), sin.float()), dim=-1)               # [T, D/2, 2]
    # cast before the repeat (the same values, n_head times fewer converted); repeat's result
    # is contiguous
    return (c.reshape(c.shape[0], -1).to(dtype).repeat(1, n_head),       # [T, H*D]
            s.reshape(s.shape[0], -1).to(dtype).repeat(1, n_head))


def rope_table_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of ``rope_lanes``' tables for activations like x (computed in ``compute_dtype``):
    fp16 for bf16 and fp16 data, fp32 for fp32.
    Why fp16: the kernel reads a table element (c and s) per data element, so fp32 tables moved
    twice the data's own bytes (from L2); fp16 halves that. Values in [-1, 1] keep 11
    significant bits in fp16 (relative error <= 2^-12; below 2^-14, fp16's subnormals, an
    absolute error <= 2^-25), 8x finer than the bf16 output's own rounding (2^-9), so the
    rotated bf16 output stays within about one bf16 rounding of the fp32-table result (bf16's
    8 bits would add a full rounding more). H200, N = 16k, A = 32, L2 flushed (session 23,
    docs/benchmarks.md): walsh_out with RoPE 66.3 -> 48.5 us at 64 lanes (the 1.3B q, k), 35.0
    -> 29.7 at 24 (the 125M); its backward pass 91.3 -> 69.2 at 64 lanes, 47.8 -> 47.5 at 24.
    fp32 data keeps fp32 tables (the kernel's check refuses fp16 tables for it)."""
    return torch.float32 if compute_dtype(x) == torch.float32 else torch.float16


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); ``make`` builds each linear of the configured algebra."""

    def __init__(self, make, dim: int, hidden: int, out_scale: float,
                 group: bool = False, fuse: bool = False, one_op: bool = False) -> None:
        super().__init__()
        self.gate = make(dim, hidden)
        self.up = make(dim, hidden)
        self.down = make(hidden, dim, init_scale=out_scale)
        if group:  # gate and up as one op where they allow (walsh.layers.hadamard)
            group_layers([self.gate, self.up])
        if fuse:  # silu(gate) * up inside down's kernels where it allows (walsh.layers.hadamard)
            fuse_swiglu(self.down)
        # the three layers as one op where both of the above hold (walsh.layers.hadamard)
        self.one_op = one_op and fuse_mlp(self.gate, self.up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        if self.one_op:
            return mlp_one_op(self.gate, self.up, self.down, x)
        gate, up = shared_input([self.gate, self.up], x)  # [B, T, H] each
        return swiglu_down(self.down, gate, up)
