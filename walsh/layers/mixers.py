"""Head mixers: mix the per-token attention head outputs inside groups of A consecutive heads.

Input and output shape [B, T, H, D_h]; heads are grouped as [B, T, H/A, A, D_h]. Both mixers
are per token (they never look across time, so causality is preserved) and start as the
identity (MODEL_SPEC section 5).

- ``CayleyDicksonMixer``: m_i = sum_j S[i, j] * O_j M_{i^j} with M_k = ``weight[k]`` in
  R^{D x D} (M_0 = I, the rest 0 at init), run as one materialized [A*D, A*D] GEMM per group.
- ``WalshMixer``: transform across the A heads of a group, multiply head h by its own
  M_h = ``weight[h]`` (M_h = I at init), transform back.

Ternary mixers (an option; full precision is the default). The layers' absmean scale cannot
keep a sparse identity (gamma = mean|I| = 1/(A D) would shrink the output A*D-fold), so a
ternary mixer uses codes Q = clip(round(M / mean|M|), -1, 1) times a learned full-precision
scalar ``gain`` (init 1, no weight decay), with the straight-through gradient taken through
M / mean|M|. At init Q = I exactly and gain = 1, so mixing is still exactly a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walsh.algebra import fwht, layer_sign_matrix
from walsh.layers.base import autocast_input
from walsh.layers.cayley_dickson import cd_materialize
from walsh.quant import ternary_codes_ste


class _Mixer(nn.Module):
    """Shared parameter handling: ``weight`` [A, D, D] and, if ternary, a scalar ``gain``."""

    def __init__(self, n_head: int, head_dim: int, group: int, ternary: bool) -> None:
        super().__init__()
        if n_head % group:
            raise ValueError(f"n_head={n_head} is not divisible by the mixing group {group}")
        self.n_head, self.head_dim, self.group, self.ternary = n_head, head_dim, group, ternary
        self.weight = nn.Parameter(torch.empty(group, head_dim, head_dim))
        self.gain = nn.Parameter(torch.ones(())) if ternary else None

    def effective_weight(self) -> torch.Tensor:
        """[A, D, D]: M, or gain * Q (straight-through) for a ternary mixer."""
        if not self.ternary:
            return self.weight
        return self.gain * ternary_codes_ste(self.weight)


class CayleyDicksonMixer(_Mixer):
    def __init__(self, n_head: int, head_dim: int, algebra_dim: int, ternary: bool = False):
        super().__init__(n_head, head_dim, algebra_dim, ternary)
        self.register_buffer("sign", layer_sign_matrix(algebra_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[0].copy_(torch.eye(self.head_dim))
            if self.gain is not None:
                self.gain.fill_(1.0)

    def dense_weight(self) -> torch.Tensor:
        """[A*D, A*D] acting on a group's column vector: block (i, j) = S[i, j] M_{i^j}^T."""
        return cd_materialize(self.effective_weight().transpose(1, 2), self.sign)

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, T, H, D]
        b, t, h, d = o.shape
        y = F.linear(o.reshape(b, t, h // self.group, self.group * d), self.dense_weight())
        return y.reshape(b, t, h, d)

    def flops_per_token(self) -> int:
        width = self.group * self.head_dim
        return (self.n_head // self.group) * 2 * width * width


class WalshMixer(_Mixer):
    def __init__(self, n_head: int, head_dim: int, group: int, ternary: bool = False):
        super().__init__(n_head, head_dim, group, ternary)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.head_dim).expand_as(self.weight))
            if self.gain is not None:
                self.gain.fill_(1.0)

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, T, H, D]
        b, t, h, d = o.shape
        o = autocast_input(o)
        y = o.reshape(b * t * (h // self.group), self.group, d)  # [N, A, D]
        y = fwht(y, dim=1)
        # head g of every group times its own M_g: [A, N, D] @ [A, D, D]
        y = torch.bmm(y.transpose(0, 1), self.effective_weight().to(y.dtype)).transpose(0, 1)
        y = fwht(y, dim=1)
        return y.reshape(b, t, h, d)

    def flops_per_token(self) -> int:
        d = self.head_dim
        return self.n_head * (2 * d * d + 2 * d * int(math.log2(self.group)))
