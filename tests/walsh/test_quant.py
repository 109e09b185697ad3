"""Ternary absmean weight quantization, its straight-through estimator and 8-bit per-token
activation quantization (MODEL_SPEC section 1)."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err

from walsh.quant import (
    TERNARY_RMS_RETENTION,
    act_quant_ste,
    ternary_quantize,
    ternary_ste,
    ternary_ste_and_codes,
)

# Hand-written latent weights [A=2, n_out=2, n_in=3]; no element sits on a rounding tie.
W_HAND = torch.tensor(
    [
        [[0.90, -0.20, 0.05], [-1.30, 0.60, -0.40]],  # mean|.| = 0.575
        [[0.01, 0.02, -0.03], [0.04, -0.05, 0.06]],  # mean|.| = 0.035
    ]
)
# Per tensor: gamma = 3.66 / 12 = 0.305.  w/gamma (component 0) = 2.95, -0.66, 0.16, -4.26,
# 1.97, -1.31; component 1 is below 0.2 everywhere.
CODES_PER_TENSOR = [
    [[1, -1, 0], [-1, 1, -1]],
    [[0, 0, 0], [0, 0, 0]],
]
# Per component: gamma_0 = 0.575 (ratios 1.57, -0.35, 0.09, -2.26, 1.04, -0.70) and
# gamma_1 = 0.035 (ratios 0.29, 0.57, -0.86, 1.14, -1.43, 1.71).
CODES_PER_COMPONENT = [
    [[1, 0, 0], [-1, 1, -1]],
    [[0, 1, -1], [1, -1, 1]],
]






# -- ternary_quantize ---------------------------------------------------------------------------


def test_ternary_quantize_hand_example_per_tensor():
    """Codes are int8 and equal the hand-computed clip(round(w / mean|w|)); scale = mean|w|."""
    codes, scale = ternary_quantize(W_HAND)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, torch.tensor(CODES_PER_TENSOR, dtype=torch.int8))
    assert scale.numel() == 1
    assert scale.item() == W_HAND.abs().mean().item()
    assert math.isclose(scale.item(), 0.305, rel_tol=1e-6)


def test_ternary_quantize_hand_example_per_component():
    """per_component: one scale per algebra component, shape [A, 1, 1], and per-component codes."""
    codes, scale = ternary_quantize(W_HAND, per_component=True)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, torch.tensor(CODES_PER_COMPONENT, dtype=torch.int8))
    assert scale.shape == (2, 1, 1)
    assert torch.equal(scale.flatten(), W_HAND.abs().mean(dim=(1, 2)))
    assert math.isclose(scale[0].item(), 0.575, rel_tol=1e-6)
    assert math.isclose(scale[1].item(), 0.035, rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 7), (16, 3, 3)])
@pytest.mark.parametrize("per_component", (False, True))
def test_ternary_quantize_random_matches_formula(shape, per_component, gen):
    """On random tensors, codes lie in {-1, 0, 1} and equal the formula computed in the test."""
    w = torch.randn(shape, generator=gen) * 0.1
    codes, scale = ternary_quantize(w, per_component=per_component)
    if per_component:
        gamma = w.abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)
        assert scale.shape == (shape[0],) + (1,) * (len(shape) - 1)
    else:
        gamma = w.abs().mean()
    expected = torch.clamp(torch.round(w / gamma), -1, 1).to(torch.int8)
    assert torch.equal(codes, expected)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(scale.expand_as(gamma) if per_component else scale, gamma)


def test_ternary_quantize_all_zero_is_finite():
    """An all-zero tensor gives zero codes and a positive finite scale (no division by zero)."""
    codes, scale = ternary_quantize(torch.zeros(4, 3))
    assert torch.equal(codes, torch.zeros(4, 3, dtype=torch.int8))
    assert torch.isfinite(scale).all() and scale.item() > 0


# -- ternary_ste ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_component", (False, True))
def test_ternary_ste_forward_hand_example(per_component):
    """Forward value of the STE is exactly scale * codes on the hand example."""
    codes, scale = ternary_quantize(W_HAND, per_component=per_component)
    assert torch.equal(ternary_ste(W_HAND, per_component=per_component), scale * codes.float())


@pytest.mark.parametrize("per_component", (False, True))
def test_ternary_ste_forward_is_exactly_scale_times_codes(per_component, gen):
    """Forward value of the STE is exactly scale * codes (the effective weight gamma * Q)."""
    w = torch.randn(8, 24, 40, generator=gen) * 0.05
    codes, scale = ternary_quantize(w, per_component=per_component)
    out = ternary_ste(w, per_component=per_component)
    assert out.shape == w.shape and out.dtype == w.dtype
    expected = scale * codes.float()
    n_bad = int((out != expected).sum())
    assert n_bad == 0, (
        f"{n_bad}/{w.numel()} entries differ from scale*codes, "
        f"max |diff| = {(out - expected).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("per_component", (False, True))
def test_ternary_ste_and_codes_is_both_from_one_quantization(per_component, gen):
    """The INT8 layers' one call: ternary_ste's value and gradient, ternary_quantize's codes
    and scale, exactly."""
    w = (torch.randn(8, 24, 40, generator=gen) * 0.05).requires_grad_()
    w_eff, codes, scale = ternary_ste_and_codes(w, per_component)
    ref_codes, ref_scale = ternary_quantize(w, per_component)
    assert torch.equal(w_eff, ternary_ste(w, per_component))
    assert codes.dtype == torch.int8 and torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    g = torch.randn(w.shape, generator=gen)
    (gw,) = torch.autograd.grad(w_eff, w, g)
    assert torch.equal(gw, g)


@pytest.mark.parametrize("per_component", (False, True))
def test_ternary_ste_gradient_is_straight_through(per_component, gen):
    """dL/dw equals the upstream gradient exactly (gamma treated as a constant)."""
    w = (torch.randn(4, 6, 5, generator=gen) * 0.1).requires_grad_()
    g = torch.randn(4, 6, 5, generator=gen)
    (gw,) = torch.autograd.grad(ternary_ste(w, per_component=per_component), w, g)
    assert torch.equal(gw, g)


def test_ternary_rms_retention_monte_carlo(gen):
    """TERNARY_RMS_RETENTION = rms(gamma*Q) / rms(w) for Gaussian w (1e6 samples, rel 1e-2)."""
    w = torch.randn(1_000_000, generator=gen, dtype=torch.float64)
    codes, scale = ternary_quantize(w)
    w_eff = scale * codes.double()
    estimate = (w_eff.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    assert abs(estimate - TERNARY_RMS_RETENTION) / TERNARY_RMS_RETENTION < 1e-2
    assert 0.5 < TERNARY_RMS_RETENTION < 1.0


# -- act_quant_ste --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 7, 33), (5, 64)])
def test_act_quant_values_on_per_token_grid(shape, gen):
    """Each token's values are k / s with integer |k| <= 127, s = 127 / max|x|."""
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 5
    xq = act_quant_ste(x)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    k = xq * s
    assert (k - k.round()).abs().max().item() < 1e-3
    assert k.round().abs().max().item() <= 127
    # quantization error at most half a step (plus rounding slack)
    assert ((xq - x).abs() * s).max().item() <= 0.5 + 1e-3
    # fewer than 256 distinct levels per token
    for row_k in k.round().reshape(-1, shape[-1]):
        assert row_k.unique().numel() <= 255


def test_act_quant_preserves_max_abs(gen):
    """The max-abs element of every token is preserved (it maps to +-127 exactly)."""
    x = torch.randn(6, 9, 31, generator=gen)
    xq = act_quant_ste(x)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    assert rel_err(xq.gather(-1, idx), x.gather(-1, idx)) < 1e-6
    assert rel_err(xq.abs().amax(-1), x.abs().amax(-1)) < 1e-6


def test_act_quant_is_per_token(gen):
    """Scaling one token does not change the quantization of another token."""
    x = torch.randn(3, 17, generator=gen)
    x2 = x.clone()
    x2[1] *= 1000.0
    assert torch.equal(act_quant_ste(x)[[0, 2]], act_quant_ste(x2)[[0, 2]])


def test_act_quant_gradient_is_straight_through(gen):
    """dL/dx equals the upstream gradient exactly."""
    x = torch.randn(4, 3, 20, generator=gen, requires_grad=True)
    g = torch.randn(4, 3, 20, generator=gen)
    (gx,) = torch.autograd.grad(act_quant_ste(x), x, g)
    assert torch.equal(gx, g)


def test_act_quant_zero_token_is_finite():
    """An all-zero token stays zero (no NaN from a zero max)."""
    x = torch.zeros(2, 8)
    x[1] = torch.linspace(-1, 1, 8)
    xq = act_quant_ste(x)
    assert torch.isfinite(xq).all()
    assert torch.equal(xq[0], torch.zeros(8))
