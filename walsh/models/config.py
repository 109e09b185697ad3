"""``WalshConfig``: the typed, validated description of one Walsh LM.

A plain dataclass (the model library depends on torch alone); every inconsistency is raised at
construction time as a ``ValueError`` that names the field and the allowed values. The pipeline's
pydantic schema wraps this class, so YAML and presets meet the same checks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from walsh.algebra import CD_DIMS, _is_power_of_two
from walsh.layers.hadamard import WALSH_IMPLS
from walsh.loss import LOSS_IMPLS

ALGEBRAS = ("dense", "cayley_dickson", "walsh")
EMBEDDINGS = ("tied", "hash")
DEFAULT_ALGEBRA_DIM = {"dense": 1, "cayley_dickson": 8, "walsh": 32}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


@dataclass
class WalshConfig:
    # shape
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int | None = None  # None: 8/3 * n_embd rounded up to a multiple of lcm(A, 64)
    # algebra of q, k, v, o, gate, up, down
    algebra: str = "dense"
    algebra_dim: int | None = None  # None: 1 (dense), 8 (cayley_dickson), 32 (walsh)
    # "blocks" (structured, PyTorch) | "dense" (materialized closed form) | "triton" (a fused
    # kernel per transform) | "fused" (the whole layer in one kernel): walsh.layers.hadamard
    walsh_impl: str = "blocks"
    # with walsh_impl "triton": the layers that share an input (q, k, v; gate, up) as one op
    # that reads it once and writes one input gradient (walsh.kernels.walsh_group); false runs
    # them one by one (the same results up to the rounding of dx and dalpha's sums)
    walsh_group: bool = True
    # with walsh_impl "triton": the MLP's silu(gate) * up computed inside the down projection's
    # passes, never stored (walsh.kernels.walsh_swiglu); false runs SwiGLU's product apart
    walsh_swiglu: bool = True
    # with walsh_impl "triton", walsh_group and walsh_swiglu: the whole MLP (gate, up, down) as
    # one op whose transforms on either side of gate and up run as one pass each way
    # (walsh.kernels.walsh_mlp), on hidden rows of at most 176 lanes (hidden / algebra_dim,
    # rounded up to 8: the three presets' 64, 88 and 176); false runs the group op and the
    # down op apart
    walsh_mlp: bool = True
    # with walsh_impl "triton": attention's q and k rotated by RoPE inside their walsh_out pass
    # (and rotated back inside the backward's walsh_in), not by a pass of its own; false rotates
    # them apart (walsh.kernels.walsh_transform_kernel's ROPE)
    walsh_rope: bool = True
    ternary: bool = False
    per_component_scale: bool = False  # one absmean gamma per algebra component
    act_bits: int | None = None  # None | 8: per-token activation quantization
    # the dense and Cayley-Dickson layers' product in int32 on INT8 tensor cores (the same
    # function as ternary + act_bits 8; walsh.kernels.int8_linear; needs triton and CUDA)
    int8_matmul: bool = False
    # with int8_matmul: the input gradient's GEMM in INT8 too (dout quantized per token)
    int8_dx: bool = False
    bias: bool = False
    # head mixing
    head_mix: bool = False
    head_mix_dim: int | None = None  # None: the algebra's dim
    mixer_ternary: bool = False
    # embeddings and loss
    embedding: str = "tied"  # "tied" | "hash"
    hash_tables: int = 2
    hash_buckets: int = 1021
    hash_seed: int = 0
    embed_std: float = 0.02
    # tokens per chunk of the fused linear cross-entropy: 4096 ran dense-125m and walsh-h-125m
    # 1.7% / 2.0% faster than 2048 on an H200 (fewer, larger head GEMMs); a chunk's logits and
    # g then hold 0.8 GB (2 x 4096 x 50304 bf16) instead of 0.4 (docs/benchmarks.md, session 32)
    loss_chunk_tokens: int = 4096
    # each chunk's log-sum-exp and logits' gradient: "triton" (walsh.kernels.cross_entropy),
    # "torch" (walsh.loss.ce_chunk_naive), "auto" (the kernel on CUDA, torch elsewhere)
    loss_impl: str = "auto"
    # position and norm
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"WalshConfig.{key}: {msg}")

        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "loss_chunk_tokens"):
            val = getattr(self, key)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise bad(key, f"must be a positive integer, got {val!r}")
        for f in dataclasses.fields(self):  # a YAML 3 or "yes" is no switch
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, f"must be true or false, got {getattr(self, f.name)!r}")
        if self.algebra not in ALGEBRAS:
            raise bad("algebra", f"must be one of {ALGEBRAS}, got {self.algebra!r}")
        if self.algebra_dim is None:
            self.algebra_dim = DEFAULT_ALGEBRA_DIM[self.algebra]
        a = self.algebra_dim
        if self.algebra == "dense" and a != 1:
            raise bad("algebra_dim", f"must be 1 for the dense algebra, got {a}")
        if self.algebra == "cayley_dickson" and a not in CD_DIMS[1:]:
            raise bad("algebra_dim", f"cayley_dickson needs one of {CD_DIMS[1:]}, got {a}")
        if self.algebra == "walsh" and (not _is_power_of_two(a) or a < 2):
            raise bad("algebra_dim", f"walsh needs a power of two >= 2, got {a}")
        if self.loss_impl not in LOSS_IMPLS:
            raise bad("loss_impl", f"must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.walsh_impl not in WALSH_IMPLS:
            raise bad("walsh_impl", f"must be one of {WALSH_IMPLS}, got {self.walsh_impl!r}")
        if self.n_embd % self.n_head:
            raise bad("n_head", f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise bad("n_head", f"head dim {self.n_embd // self.n_head} must be even (RoPE)")
        if self.n_embd % a:
            raise bad("n_embd", f"{self.n_embd} is not divisible by algebra_dim={a}")
        if self.mlp_hidden is None:
            mult = a * 64 // math.gcd(a, 64)
            self.mlp_hidden = mult * math.ceil(8 * self.n_embd / 3 / mult)
        elif self.mlp_hidden < 1 or self.mlp_hidden % a:
            raise bad("mlp_hidden", f"{self.mlp_hidden} must be positive and divisible by {a}")
        if self.act_bits not in (None, 8):
            raise bad("act_bits", f"must be null or 8, got {self.act_bits!r}")
        if self.int8_matmul and (self.algebra == "walsh" or not self.ternary
                                 or self.act_bits != 8 or self.per_component_scale):
            raise bad("int8_matmul", "needs algebra dense or cayley_dickson, ternary: true, "
                      "act_bits: 8 and per_component_scale: false")
        if self.int8_dx and not self.int8_matmul:
            raise bad("int8_dx", "needs int8_matmul: true")
        if self.head_mix:
            if self.head_mix_dim is None:
                if self.algebra == "dense":
                    raise bad("head_mix", "the dense algebra has no mixing group; set head_mix_dim")
                self.head_mix_dim = a
            g = self.head_mix_dim
            ok = g in CD_DIMS[1:] if self.mixer_kind == "cayley_dickson" else _is_power_of_two(g)
            if not ok or g < 2:
                raise bad("head_mix_dim", f"{g} is not a valid {self.mixer_kind} group size")
            if self.n_head % g:
                raise bad("n_head", f"{self.n_head} is not divisible by the mixing group {g}")
        if self.embedding not in EMBEDDINGS:
            raise bad("embedding", f"must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.embedding == "hash":
            if self.hash_tables not in (2, 3):
                raise bad("hash_tables", f"must be 2 or 3, got {self.hash_tables}")
            if not _is_prime(self.hash_buckets):
                raise bad("hash_buckets", f"must be prime, got {self.hash_buckets}")
            if self.hash_tables == 2 and self.hash_buckets**2 < self.vocab_size:
                raise bad(
                    "hash_buckets",
                    f"2 tables need hash_buckets^2 >= vocab_size={self.vocab_size}",
                )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mixer_kind(self) -> str:
        """The mixer family: Walsh mixing for the walsh algebra, Cayley-Dickson otherwise."""
        return "walsh" if self.algebra == "walsh" else "cayley_dickson"

    def replace(self, **changes) -> WalshConfig:
        """A validated copy with ``changes``; derived fields are recomputed unless given."""
        base = dataclasses.asdict(self)
        if "algebra" in changes and "algebra_dim" not in changes:
            base["algebra_dim"] = None
        if {"n_embd", "algebra", "algebra_dim"} & changes.keys() and "mlp_hidden" not in changes:
            base["mlp_hidden"] = None
        if {"algebra", "algebra_dim"} & changes.keys() and "head_mix_dim" not in changes:
            base["head_mix_dim"] = None
        base.update(changes)
        return WalshConfig(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
