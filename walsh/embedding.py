"""Token embeddings shared with the (tied) output head: plain, or hashed (MODEL_SPEC section 7).

Both expose ``forward(idx[B, T]) -> [B, T, C]`` and ``table() -> [V, C]``, the embedding of every
token, which the tied LM head uses as its weight (logits = h . e(v)).

Hash embeddings: k tables E_i of B rows (B prime), per-token importance I [V, k] (init 1),
e(t) = sum_i I[t, i] * E_i[h_i(t)]. The index tuples are distinct for every token t < V:
- two tables: (t mod B, floor(t / B) mod B), distinct because B^2 >= V;
- three tables: ((a_i t + b_i) mod p) mod B with p the smallest prime > V and a_i in [1, p);
  the draw is seeded and repeated until all V triples are distinct (checked here, at build time).
The tables and importances initialize themselves; nothing outside re-initializes them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _next_prime(n: int) -> int:
    p = n + 1
    while any(p % d == 0 for d in range(2, math.isqrt(p) + 1)):
        p += 1
    return p


def hash_indices(vocab_size: int, buckets: int, tables: int, seed: int = 0) -> torch.Tensor:
    """[V, k] long bucket indices, one distinct tuple per token."""
    t = torch.arange(vocab_size, dtype=torch.long)
    if tables == 2:
        if buckets * buckets < vocab_size:
            raise ValueError(f"2 hash tables need buckets^2 >= V ({buckets}^2 < {vocab_size})")
        return torch.stack((t % buckets, (t // buckets) % buckets), dim=1)
    if tables != 3:
        raise ValueError(f"hash tables must be 2 or 3, got {tables}")
    p = _next_prime(vocab_size)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        a = torch.randint(1, p, (3,), generator=gen)
        b = torch.randint(0, p, (3,), generator=gen)
        idx = ((a[None, :] * t[:, None] + b[None, :]) % p) % buckets  # [V, 3]
        key = (idx[:, 0] * buckets + idx[:, 1]) * buckets + idx[:, 2]
        if key.unique().numel() == vocab_size:
            return idx
    raise RuntimeError(f"no collision-free 3-table hash found for V={vocab_size}, B={buckets}")


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)

    def table(self) -> torch.Tensor:  # [V, C]
        return self.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, C]
        return nn.functional.embedding(idx, self.weight)


class HashEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, dim: int, buckets: int = 1021, tables: int = 2, seed: int = 0,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        self.vocab_size, self.buckets, self.n_tables, self.std = vocab_size, buckets, tables, std
        self.register_buffer("indices", hash_indices(vocab_size, buckets, tables, seed))  # [V, k]
        self.tables = nn.Parameter(torch.empty(tables, buckets, dim))  # E_i, [k, B, C]
        self.importance = nn.Parameter(torch.empty(vocab_size, tables))  # I, [V, k]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Sum of k rows: scale so e(t) has the same std as a plain embedding row.
        nn.init.normal_(self.tables, 0.0, self.std / math.sqrt(self.n_tables))
        nn.init.ones_(self.importance)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:  # [...] -> [..., C]
        rows = self.indices[idx]  # [..., k]
        imp = self.importance[idx]  # [..., k]
        out = 0
        for i in range(self.n_tables):
            out = out + imp[..., i, None] * self.tables[i][rows[..., i]]
        return out

    def table(self) -> torch.Tensor:  # [V, C], rebuilt per call (V * k * C work per step)
        return self._embed(torch.arange(self.vocab_size, device=self.tables.device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, C]
        return self._embed(idx)
