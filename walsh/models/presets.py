"""Named model presets, as code.

Naming: ``dense`` is the full-precision (bf16 under autocast) baseline, ``bitnet`` the dense
ternary BitLinear model, ``walsh-o`` octonion (Cayley-Dickson A = 8) ternary with head mixing,
``walsh-h`` Walsh-Hadamard (A = 32) ternary. The size suffix names the *shape* (12 x 768,
24 x 1024 or 24 x 2048: GPT-2 small / medium, GPT-3 XL); structured models of a shape have
far fewer parameters, which ``WalshLM.num_params()`` reports.

``walsh-h-*`` runs the Walsh layers with ``walsh_impl="dense"`` (the closed form materialized
once per step, one GEMM). All implementations compute the same function (one gradient aside, at
a beta lane of exactly 0: ``walsh.layers.hadamard``); which is fastest depends on the width (one
H200, bf16, 16 x 1024 tokens; docs/benchmarks.md, sessions 8-32): ``"dense"`` trains at 0.97x
the dense preset at 12 x 768 (CUDA graphs) and 24 x 1024, and 1.00x at 24 x 2048;
``walsh_impl="triton"`` (the structured path, in*out/A multiply-adds, fused kernels) at 1.12x at
12 x 768 (session 32, CUDA graphs; 1.10x in session 29 with the MLP as one op, 1.08x in session
28, 1.04x in session 27, 0.99x in session 21 with its per-block GEMMs as Triton kernels,
0.89-0.92x in sessions 17-19), 1.22x at 24 x 1024 (session 29 against session 28's dense, one
short run; 350M varies by up to 20% between runs), and **2.06x at 24 x 2048** (walsh-h-1b3,
session 32, against dense on the lent H200; 2.03x in session 35 with the whole forward
compiled; 1.99x in session 29, 1.79-1.83x in sessions 18-27;
RoPE inside q's and k's passes gave +1.0-2.1% of it, the MLP as one op +8.7%), where the
structure's 32x fewer GEMM FLOPs outweigh its transforms, with 40 GiB peak against the dense
path's 36 GiB. The presets keep ``"dense"`` at every size so that a sweep's memory and code path
do not change with the size; pass ``walsh_impl=triton`` for the speed above.

``walsh-h-*`` keeps head mixing off: MODEL_SPEC ties the mixing group to the algebra dim (32),
and 12 or 16 heads are not divisible by 32. Turn it on with ``head_mix=True, head_mix_dim=4``.
"""

from __future__ import annotations

from collections.abc import Callable

from walsh.models.config import WalshConfig

SHAPES = {
    "125m": dict(n_layer=12, n_embd=768, n_head=12),
    "350m": dict(n_layer=24, n_embd=1024, n_head=16),
    "1b3": dict(n_layer=24, n_embd=2048, n_head=16),  # the kernel issue's wide shape
}


def _family(kind: str, size: str) -> WalshConfig:
    shape = dict(SHAPES[size])
    name = f"{kind}-{size}"
    if kind == "dense":
        return WalshConfig(name=name, algebra="dense", ternary=False, **shape)
    if kind == "bitnet":
        return WalshConfig(name=name, algebra="dense", ternary=True, **shape)
    if kind == "walsh-o":
        shape["n_head"] = 8 if size == "125m" else 16  # divisible by the octonion group
        return WalshConfig(
            name=name, algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True,
            **shape,
        )
    if kind == "walsh-h":
        return WalshConfig(
            name=name, algebra="walsh", algebra_dim=32, walsh_impl="dense", ternary=True, **shape
        )
    raise KeyError(kind)


def tiny() -> WalshConfig:
    """A 2-layer octonion model with head mixing: fast on CPU, for tests and the quickstart."""
    return WalshConfig(
        name="tiny", vocab_size=50257, block_size=256, n_layer=2, n_head=8, n_embd=128,
        algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True,
    )


presets: dict[str, Callable[[], WalshConfig]] = {"tiny": tiny}
for _kind in ("dense", "bitnet", "walsh-o", "walsh-h"):
    for _size in SHAPES:
        presets[f"{_kind}-{_size}"] = lambda k=_kind, s=_size: _family(k, s)


def get_preset(name: str, **overrides) -> WalshConfig:
    """The preset ``name`` with ``overrides`` applied (validated)."""
    if name not in presets:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(presets)}")
    cfg = presets[name]()
    return cfg.replace(**overrides) if overrides else cfg
