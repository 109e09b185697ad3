"""Head mixers: mix the per-token attention head outputs inside groups of A consecutive heads.

Input and output shape [B, T, H, D_h]; heads are grouped as [B, T, H/A, A, D_h]. Both mixers
are per token (they never look across time, so causality is preserved) and start as the
identity (MODEL_SPEC section 5).

- ``CayleyDicksonMixer``: m_i = sum_j S[i, j] * O_j M_{i^j} with M_k in R^{D x D}
  (M_0 = I, the rest 0 at init).  Stored as a ``CayleyDicksonLinear`` over the A*D features of a
  group with component weights M_k^T, so it shares the materialize-and-GEMM path.
- ``WalshMixer``: transform across the A heads of a group, multiply head h by its own M_h
  (M_h = I at init), transform back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from walsh.algebra import fwht
from walsh.layers.base import autocast_input
from walsh.layers.cayley_dickson import CayleyDicksonLinear
from walsh.quant import ternary_ste


class CayleyDicksonMixer(nn.Module):
    def __init__(self, n_head: int, head_dim: int, algebra_dim: int, ternary: bool = False):
        super().__init__()
        if n_head % algebra_dim:
            raise ValueError(f"n_head={n_head} is not divisible by the mixing group {algebra_dim}")
        self.n_head, self.head_dim, self.group = n_head, head_dim, algebra_dim
        width = algebra_dim * head_dim
        self.mix = CayleyDicksonLinear(width, width, algebra_dim=algebra_dim, ternary=ternary)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[0].copy_(torch.eye(self.head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, T, H, D]
        b, t, h, d = o.shape
        y = self.mix(o.reshape(b, t, h // self.group, self.group * d))
        return y.reshape(b, t, h, d)

    def flops_per_token(self) -> int:
        return (self.n_head // self.group) * self.mix.flops_per_token()


class WalshMixer(nn.Module):
    def __init__(self, n_head: int, head_dim: int, group: int, ternary: bool = False):
        super().__init__()
        if n_head % group:
            raise ValueError(f"n_head={n_head} is not divisible by the mixing group {group}")
        self.n_head, self.head_dim, self.group, self.ternary = n_head, head_dim, group, ternary
        self.weight = nn.Parameter(torch.empty(group, head_dim, head_dim))  # M_h, [A, D, D]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.head_dim).expand_as(self.weight))

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, T, H, D]
        b, t, h, d = o.shape
        o = autocast_input(o)
        m = ternary_ste(self.weight) if self.ternary else self.weight
        y = o.reshape(b * t * (h // self.group), self.group, d)  # [N, A, D]
        y = fwht(y, dim=1)
        # head g of every group times its own M_g: [A, N, D] @ [A, D, D]
        y = torch.bmm(y.transpose(0, 1), m.to(y.dtype)).transpose(0, 1)
        y = fwht(y, dim=1)
        return y.reshape(b, t, h, d)

    def flops_per_token(self) -> int:
        d = self.head_dim
        return self.n_head * (2 * d * d + 2 * d * int(math.log2(self.group)))
