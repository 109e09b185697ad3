"""The fused ternary weight quantization (walsh.kernels.ternary) against walsh.quant.

The bounds and conventions: ``TOL`` and ``DEV`` in tests/_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV, TOL, rel_err

pytest.importorskip("triton")

from walsh import quant  # noqa: E402
from walsh.kernels import ternary as tk  # noqa: E402


# -- fused ternary quantization ---------------------------------------------------------------
@pytest.mark.parametrize("shape,per_component", [((8, 33, 17), True), ((8, 33, 17), False),
                                                 ((37, 51), False), ((2, 5, 1031), True),
                                                 ((1,), False)])
def test_ternary_codes_exact_and_scale_matches(shape, per_component, seed):
    w = torch.randn(shape, device=DEV) * 0.02
    scale = tk.absmean_scale(w, per_component)
    ref_scale = quant.absmean_scale(w, per_component)
    assert scale.shape == ref_scale.shape
    assert rel_err(scale, ref_scale) < 1e-6, seed  # fp32 sums in another order
    out = torch.full(shape, float("nan"), device=DEV)
    codes = torch.full(shape, 7, dtype=torch.int8, device=DEV)
    tk.ternary_apply(w, scale, per_component, torch.float32, True, out=out, codes=codes)
    ref_codes = torch.clamp(torch.round(w / scale), -1, 1)  # torch's rule, same gamma
    assert torch.equal(codes, ref_codes.to(torch.int8)), seed
    assert torch.equal(out, ref_codes * scale), seed  # gamma * Q exactly
    # in bf16: gamma * Q rounded once, to nearest, as torch casts it (and the GPU; the
    # interpreter's own cast truncates: ``walsh.kernels.bf16_round``)
    out16, _ = tk.ternary_apply(w, scale, per_component, torch.bfloat16)
    assert torch.equal(out16, (ref_codes * scale).to(torch.bfloat16)), seed


def test_ternary_ties_round_half_to_even():
    """|w / gamma| exactly 1/2 gives 0 (like torch.round), 3/2 and beyond give +-1."""
    w = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.50001, -0.49999, 4.0, 0.0], device=DEV)
    scale = torch.ones((), device=DEV)
    _, codes = tk.ternary_apply(w, scale, False, torch.float32, True)
    assert codes.tolist() == [0, 0, 1, -1, 1, 0, 1, 0]


@pytest.mark.parametrize("per_component", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ternary_ste_forward_and_gradient(per_component, out_dtype, seed):
    w = (torch.randn(4, 19, 23, device=DEV) * 0.02).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    out = tk.ternary_ste(w, per_component, out_dtype)
    ref = quant.ternary_ste(w_ref, per_component, out_dtype)
    assert out.dtype == out_dtype and out.shape == w.shape
    assert rel_err(out, ref) < TOL[out_dtype], seed
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert w.grad.dtype == torch.float32
    assert torch.equal(w.grad, w_ref.grad), seed  # straight through: exactly g (cast)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("per_component", [True, False])
def test_ternary_ste_partials_over_several_blocks(per_component, parts, seed, monkeypatch):
    """With fewer partial programs (``PARTS``) than blocks, each program adds every P-th block
    (5 or 10 blocks over 2 or 3 programs here, the last one partly masked; 3 partials leave a
    masked lane in the apply kernel's power-of-two load) and the apply kernel adds the
    partials: gamma (every nonzero output is +-gamma) matches the reference's scale, and the
    output is exactly torch's rule for that gamma. A block skipped or counted twice moves
    gamma by a tenth or more."""
    monkeypatch.setattr(tk, "PARTS", parts)
    w = torch.randn(2, 3, 1700, device=DEV) * 0.02  # 5,100 elements per component
    g = 2 if per_component else 1
    w2, _, m = tk._groups(w, per_component)
    assert tk._abs_partials(w2, g, m).shape == (g, parts)
    out = tk.ternary_ste(w, per_component, torch.float32)
    gamma = out.reshape(g, -1).abs().amax(dim=1)  # [G]
    ref = quant.absmean_scale(w, per_component).reshape(-1)
    assert rel_err(gamma, ref) < 1e-6, seed
    gb = gamma.view(g, *([1] * (w.ndim - 1))) if per_component else gamma.reshape(())
    assert torch.equal(out, torch.clamp(torch.round(w / gb), -1, 1) * gb), seed


def test_ternary_apply_adds_partials():
    """scale [G, P] (P = 3: PB = 4, the fourth lane masked) is added per group by the apply
    kernel: exact integer partials give the same output and codes as their totals as [G]."""
    w = torch.randn(2, 5, 7, device=DEV)
    parts = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=DEV)
    out, codes = tk.ternary_apply(w, parts, True, torch.float32, True, divisor=6.0)
    total = torch.tensor([1.0, 2.5], device=DEV).view(2, 1, 1)
    ref, ref_codes = tk.ternary_apply(w, total, True, torch.float32, True)
    assert torch.equal(out, ref) and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("shape,per_component", [((0,), False), ((3, 0), True),
                                                 ((2, 0, 4), True)])
def test_ternary_empty_weight(shape, per_component):
    """No elements: an empty output (one zero partial per group, no apply programs)."""
    w = torch.randn(shape, device=DEV)
    assert tk.ternary_ste(w, per_component, torch.bfloat16).shape == shape
    assert tk.ternary_quantize(w, per_component)[0].shape == shape


def test_ternary_quantize_matches_reference(seed):
    w = torch.randn(8, 24, 40, device=DEV)
    codes, scale = tk.ternary_quantize(w, per_component=True)
    ref_codes, ref_scale = quant.ternary_quantize(w, per_component=True)
    assert rel_err(scale, ref_scale) < 1e-6, seed
    mismatch = (codes != ref_codes).sum().item()
    assert mismatch <= 2, (seed, mismatch)  # only where |w/gamma| sits within an ulp of 1/2
