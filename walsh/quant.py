"""Ternary (BitNet b1.58) weight quantization and 8-bit per-token activation quantization.

Weights: gamma = mean(|W|) (over the whole tensor, or per algebra component along dim 0),
codes Q = clip(round(W / gamma), -1, 1), effective weight gamma * Q (the scale is re-applied).
The straight-through estimator W + (gamma*Q - W).detach() makes dL/dW = dL/dW_eff.

Activations (optional, ``act_bits=8``): per token s = 127 / max|x|,
x_q = clip(round(x * s), -128, 127) / s, straight-through.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-5

# Fraction of a unit Gaussian's RMS that survives absmean ternary rounding: the effective
# weight is +-gamma (gamma = sigma * sqrt(2/pi)) wherever |w| > gamma / 2, else 0, so
# E[w_eff^2] / sigma^2 = (2/pi) * P(|z| > sqrt(2/pi) / 2). Layers divide their init std by this
# so that ternary and float layers have the same gain (MODEL_SPEC section 4).
_T = math.sqrt(2.0 / math.pi) / 2.0
TERNARY_RMS_RETENTION = math.sqrt((2.0 / math.pi) * math.erfc(_T / math.sqrt(2.0)))


def absmean_scale(w: torch.Tensor, per_component: bool = False) -> torch.Tensor:
    """gamma = mean|w|; a scalar, or shape [A, 1, ..., 1] per component (dim 0) if asked."""
    if per_component:
        dims = tuple(range(1, w.ndim))
        return w.abs().mean(dim=dims, keepdim=True).clamp(min=EPS)
    return w.abs().mean().clamp(min=EPS)


def _codes(w: torch.Tensor, per_component: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, gamma): Q = clip(round(w / gamma), -1, 1) in w's dtype, gamma = absmean; no grad."""
    with torch.no_grad():
        scale = absmean_scale(w, per_component)
        return torch.clamp(torch.round(w / scale), -1, 1), scale


def ternary_quantize(
    w: torch.Tensor, per_component: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(codes int8 in {-1, 0, 1}, scale)`` with ``scale * codes`` the effective weight."""
    codes, scale = _codes(w.detach().float(), per_component)
    return codes.to(torch.int8), scale


def ternary_ste(w: torch.Tensor, per_component: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Effective weight gamma * Q with a straight-through gradient to the latent ``w``.

    Shapes: ``w`` any, returns the same shape in ``out_dtype`` (default w's dtype). gamma is
    treated as a constant in the backward pass (the BitNet recipe). Written
    w_eff + (w - w.detach()) rather than w + (w_eff - w).detach(): the same gradient, but the
    forward value is exactly gamma * Q (the latter rounds by an ulp wherever |w| > 2 gamma, so
    exports would not bit-match).
    """
    codes, scale = _codes(w, per_component)
    w_eff = _straight_through(codes, scale, w)
    return w_eff if out_dtype is None else w_eff.to(out_dtype)


def ternary_ste_and_codes(w: torch.Tensor, per_component: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``ternary_ste(w)``, its codes int8, its scale) from one quantization: for the INT8
    layers, which need the effective weight (for autograd) and the codes (for the product)."""
    codes, scale = _codes(w, per_component)
    return _straight_through(codes, scale, w), codes.to(torch.int8), scale


def _straight_through(codes: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gamma * Q in value, the identity's gradient to w (see ``ternary_ste``)."""
    return codes * scale + (w - w.detach())


def ternary_codes_ste(w: torch.Tensor, per_component: bool = False) -> torch.Tensor:
    """The codes Q themselves (forward exactly in {-1, 0, 1}), with the straight-through
    gradient of w / gamma: for layers that scale Q by a learned gain instead of gamma."""
    codes, scale = _codes(w, per_component)
    return codes + (w - w.detach()) / scale


@torch.no_grad()
def act_codes(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmax codes: (clip(round(x * s)) in x's dtype, s [..., 1]) with
    s = (2^(bits-1) - 1) / max|x|; the one rule behind ``act_quant_ste`` and the INT8 kernels'
    activation codes (which call it on fp32 x)."""
    qmax = 2 ** (bits - 1) - 1
    s = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return torch.clamp(torch.round(x * s), -qmax - 1, qmax), s


def act_quant_ste(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token (last dim) absmax quantization to ``bits`` with a straight-through gradient."""
    q, s = act_codes(x, bits)
    return q / s + (x - x.detach())
