"""Structured linear layers (dense ternary, Cayley-Dickson, Walsh-Hadamard), head mixers and
the LLaMA block pieces. ``make_linear`` is the one factory the models use."""

from __future__ import annotations

from walsh.layers.base import StructuredLinear, TernaryLinear
from walsh.layers.cayley_dickson import CayleyDicksonLinear, cd_materialize
from walsh.layers.common import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    rope_cache,
    rope_lanes,
    rope_table_dtype,
)
from walsh.layers.hadamard import WALSH_IMPLS, WalshLinear
from walsh.layers.mixers import CayleyDicksonMixer, WalshMixer

ALGEBRAS = ("dense", "cayley_dickson", "walsh")


def make_linear(
    algebra: str,
    algebra_dim: int,
    in_features: int,
    out_features: int,
    walsh_impl: str = "blocks",
    **kw,
) -> StructuredLinear:
    """Build the linear layer of ``algebra`` (``kw``: ternary, act_bits, bias, init_scale, ...)."""
    if algebra == "dense":
        return TernaryLinear(in_features, out_features, **kw)
    if algebra == "cayley_dickson":
        return CayleyDicksonLinear(in_features, out_features, algebra_dim=algebra_dim, **kw)
    if algebra == "walsh":
        return WalshLinear(in_features, out_features, blocks=algebra_dim, impl=walsh_impl, **kw)
    raise ValueError(f"algebra must be one of {ALGEBRAS}, got {algebra!r}")


__all__ = [
    "ALGEBRAS",
    "WALSH_IMPLS",
    "CayleyDicksonLinear",
    "CayleyDicksonMixer",
    "RMSNorm",
    "StructuredLinear",
    "SwiGLU",
    "TernaryLinear",
    "WalshLinear",
    "WalshMixer",
    "apply_rope",
    "cd_materialize",
    "make_linear",
    "rope_cache",
    "rope_lanes",
    "rope_table_dtype",
]
