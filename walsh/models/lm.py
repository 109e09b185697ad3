"""The Walsh LM: a pre-norm LLaMA-style decoder whose linear layers are of the configured algebra.

    x = embed(idx)                                   [B, T, C]
    for each block:  x += Attn(RMSNorm(x));  x += SwiGLU(RMSNorm(x))
    h = RMSNorm(x);  logits = h @ embed.table().T    (tied head; loss via chunked linear CE)

Single-device code: no ranks, no DeepSpeed, no compile here (the pipeline applies those).
Generation passes a ``KVCache`` and the position of the first token (``start_pos``).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from walsh.embedding import HashEmbedding, TokenEmbedding
from walsh.layers import (
    CayleyDicksonMixer,
    RMSNorm,
    StructuredLinear,
    SwiGLU,
    WalshMixer,
    apply_rope,
    make_linear,
    rope_cache,
    rope_lanes,
    rope_table_dtype,
)
from walsh.layers.hadamard import fuse_rope, group_layers, shared_input
from walsh.layers.mixers import _Mixer
from walsh.loss import linear_cross_entropy
from walsh.models.config import WalshConfig


class KVCache:
    """Static per-layer cache: k, v of shape [n_layer, B, H, T_max, D_h]."""

    def __init__(self, cfg: WalshConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, cfg: WalshConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        c = cfg.n_embd
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layer)
        self.q, self.k, self.v = (_linear(cfg, c, c) for _ in range(3))
        self.o = _linear(cfg, c, c, init_scale=out_scale)
        if cfg.walsh_group:  # q, k, v as one op where they allow (walsh.layers.hadamard)
            group_layers([self.q, self.k, self.v])
        if cfg.walsh_rope:  # RoPE inside q's and k's own passes where they allow (hadamard)
            fuse_rope([self.q, self.k], cfg.head_dim)
        self.mixer: nn.Module | None = None
        if cfg.head_mix:
            mixer = WalshMixer if cfg.mixer_kind == "walsh" else CayleyDicksonMixer
            self.mixer = mixer(cfg.n_head, cfg.head_dim, cfg.head_mix_dim, cfg.mixer_ternary)

    @property
    def rope_inside(self) -> bool:
        """Whether q and k come out of their ops rotated (``fuse_rope`` marked them)."""
        return bool(getattr(self.q, "rope_output", False))

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, T, C]; cos/sin [T, D/2] at positions start_pos..+T; ``rope``: their per-lane
        tables [T, C] (``rope_lanes``) for q and k rotated inside their ops, built once per
        model forward by ``WalshLM.hidden`` (built here when not given)."""
        b, t, c = x.shape
        h, d = self.cfg.n_head, self.cfg.head_dim
        if not self.rope_inside:
            rope = None
        elif rope is None:
            rope = rope_lanes(cos, sin, h, rope_table_dtype(x))
        q, k, v = shared_input([self.q, self.k, self.v], x, rope=rope)  # [B, T, C] each
        q, k, v = (z.view(b, t, h, d) for z in (q, k, v))
        if not self.rope_inside:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = start_pos + t
            cache.k[self.layer, :, :, start_pos:end] = k.to(cache.k.dtype)
            cache.v[self.layer, :, :, start_pos:end] = v.to(cache.v.dtype)
            k_all = cache.k[self.layer, :, :, :end].to(q.dtype)  # [B, H, end, D]
            v_all = cache.v[self.layer, :, :, :end].to(q.dtype)
            # query i (absolute position start_pos + i) sees keys 0..start_pos + i
            pos_q = torch.arange(start_pos, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= pos_q  # [T, end]
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        y = y.transpose(1, 2)  # [B, T, H, D]
        if self.mixer is not None:
            y = self.mixer(y)
        return self.o(y.reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: WalshConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(
            lambda i, o, **kw: _linear(cfg, i, o, **kw),
            cfg.n_embd, cfg.mlp_hidden, out_scale=1.0 / math.sqrt(2 * cfg.n_layer),
            group=cfg.walsh_group, fuse=cfg.walsh_swiglu, one_op=cfg.walsh_mlp,
        )

    def forward(self, x, cos, sin, cache=None, start_pos=0, rope=None):  # [B, T, C] -> same
        x = x + self.attn(self.norm1(x), cos, sin, cache, start_pos, rope)
        return x + self.mlp(self.norm2(x))


def _linear(cfg: WalshConfig, i: int, o: int, init_scale: float = 1.0) -> StructuredLinear:
    return make_linear(
        cfg.algebra, cfg.algebra_dim, i, o, walsh_impl=cfg.walsh_impl, ternary=cfg.ternary,
        per_component_scale=cfg.per_component_scale, act_bits=cfg.act_bits, bias=cfg.bias,
        init_scale=init_scale, int8_matmul=cfg.int8_matmul,
        int8_dx=cfg.int8_dx,
    )


class WalshLM(nn.Module):
    def __init__(self, config: WalshConfig) -> None:
        super().__init__()
        self.config = cfg = config
        if cfg.embedding == "hash":
            self.embed: nn.Module = HashEmbedding(
                cfg.vocab_size, cfg.n_embd, cfg.hash_buckets, cfg.hash_tables, cfg.hash_seed,
                cfg.embed_std,
            )
        else:
            self.embed = TokenEmbedding(cfg.vocab_size, cfg.n_embd, cfg.embed_std)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_cache(cfg.block_size, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [block_size, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- forward ----------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0):
        """Final normed hidden states [B, T, C] for tokens idx [B, T] at start_pos.."""
        t = idx.shape[1]
        if start_pos + t > self.config.block_size:
            raise ValueError(
                f"sequence of {start_pos + t} tokens exceeds block_size={self.config.block_size}"
            )
        cos = self.rope_cos[start_pos : start_pos + t]
        sin = self.rope_sin[start_pos : start_pos + t]
        x = self.embed(idx)
        # q's and k's per-lane RoPE tables, once for every layer that rotates inside its ops:
        # built per layer, each layer's backward kept its own copy (16 MiB at 1.3B); fp16 for
        # bf16 activations (``rope_table_dtype``)
        rope = (rope_lanes(cos, sin, self.config.n_head, rope_table_dtype(x))
                if any(b.attn.rope_inside for b in self.blocks) else None)
        for block in self.blocks:
            x = block(x, cos, sin, cache, start_pos, rope)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [..., C] -> [..., V] (fp32)
        return (h @ self.embed.table().to(h.dtype).T).float()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V], or the mean loss if targets [B, T] are given
        (ignore_index -100), computed by the chunked linear cross-entropy."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE of the tied head on h [B, T, C] against targets [B, T]. The table [V, C] is
        read here and passed to ``head_loss``, the part the pipeline compiles when it compiles
        the blocks apart: the read is then eager and outside the embedding's own forward, where
        a sharding wrapper may hold the table partitioned and gather it only on an eager access
        (ZeRO-3, ``pipeline.parallelize``). A hash embedding's table is rebuilt here too. With
        the whole forward compiled (``train.compile_scope``) both are traced into its graph."""
        return self.head_loss(h, self.embed.table(), targets)

    def head_loss(self, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor
                  ) -> torch.Tensor:
        """Mean chunked linear CE of h [B, T, C] on table [V, C] against targets [B, T]."""
        return linear_cross_entropy(
            h.reshape(-1, self.config.n_embd), table, targets.reshape(-1),
            chunk=self.config.loss_chunk_tokens, impl=self.config.loss_impl,
        )

    # -- accounting -------------------------------------------------------------------------
    def structured_layers(self) -> list[StructuredLinear]:
        return [m for m in self.modules() if isinstance(m, StructuredLinear)]

    def linear_paths(self) -> str:
        """The structured layers' compute paths with their counts, e.g. ``"72 x TernaryLinear:
        INT8 GEMM"``: what the config chose, printed where a run starts."""
        counts = Counter(m.path() for m in self.structured_layers())
        return "; ".join(f"{n} x {p}" for p, n in counts.items())

    def num_params(self) -> dict[str, int]:
        """total, embedding, non_embedding ("brain"), ternary (latent weights stored as
        2-bit codes), float (everything else) and storage_bits (2 per ternary weight, 16 per
        float parameter, 32 per ternary scale: the packed-export footprint)."""
        total = sum(p.numel() for p in self.parameters())
        embedding = sum(p.numel() for p in self.embed.parameters())
        tern_layers = [m for m in self.structured_layers() if m.ternary]
        mixers = [m for m in self.modules() if isinstance(m, _Mixer) and m.ternary]
        ternary = sum(m.weight.numel() for m in tern_layers + mixers)
        scales = sum(m.blocks if m.per_component_scale else 1 for m in tern_layers)
        scales += len(mixers)
        return {
            "total": total,
            "embedding": embedding,
            "non_embedding": total - embedding,
            "ternary": ternary,
            "float": total - ternary,
            "storage_bits": 2 * ternary + 16 * (total - ternary) + 32 * scales,
        }

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """FLOPs per token of what the layers really compute: each structured layer's own cost
        (dense/CD: 2 in out; Walsh blocks: 2 in out / A + transforms), mixers, causal attention
        (2 T C per layer forward) and the tied LM head (2 C V). ``training`` multiplies by 3
        (forward + backward). The hash-embedding table rebuild is per step, not per token."""
        c = self.config
        t = c.block_size if seq_len is None else seq_len
        fwd = sum(m.flops_per_token() for m in self.structured_layers())
        fwd += sum(m.flops_per_token() for m in self.modules() if isinstance(m, _Mixer))
        fwd += c.n_layer * 2 * t * c.n_embd + 2 * c.n_embd * c.vocab_size
        return 3 * fwd if training else fwd

    def decay_mask(self) -> dict[str, bool]:
        """Parameter name -> whether it takes weight decay: latent weights of the structured
        linear layers only (not norms, alpha/beta gains, biases, embeddings, head mixers)."""
        decay = {
            f"{name}.weight" if name else "weight"
            for name, m in self.named_modules()
            if isinstance(m, StructuredLinear)
        }
        return {name: name in decay for name, _ in self.named_parameters()}
