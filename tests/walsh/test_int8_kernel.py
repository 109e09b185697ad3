"""The INT8 product of ternary weights and 8-bit activations (walsh.kernels.int8_linear)
against the fake-quantized product.

The bounds and conventions: ``TOL`` and ``DEV`` in tests/_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV, TOL, assert_layers_agree, rel_err

pytest.importorskip("triton")

from walsh import quant  # noqa: E402
from walsh.kernels import int8_linear as ik  # noqa: E402


# -- the INT8 product (ternary weights, 8-bit activations) ------------------------------------
@pytest.mark.parametrize("m,k", [(1, 1), (5, 70), (3, 1500), (130, 64), (17, 5000)])
def test_int8_row_codes_exact(m, k, seed):
    """Per-token codes by the naive path's rule with an fp32 scale, exactly; 1/s to 1e-6; the
    layout of x does not matter (a transposed x gives the same codes)."""
    x = torch.randn(m, k, device=DEV) * torch.rand(m, 1, device=DEV) * 4
    s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=quant.EPS)
    q, inv_s = ik.quantize_rows_torch(x)
    assert q.dtype == torch.int8 and inv_s.shape == (m,)
    assert torch.equal(q, torch.clamp(torch.round(x * s), -128, 127).to(torch.int8)), seed
    assert rel_err(inv_s, 1 / s[:, 0]) < 1e-6, seed
    qt, _ = ik.quantize_rows_torch(x.t().contiguous().t())
    assert torch.equal(qt, q), seed


def test_int8_row_codes_ties_round_half_to_even_and_nan_propagates():
    # max |x| = 127 makes s = 1, so x * s is x itself
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], device=DEV)
    assert ik.quantize_rows_torch(x)[0].tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]
    x[0, 3] = float("nan")
    assert ik.quantize_rows_torch(x)[1].isnan().all()  # not a finite scale


# (no 1-output case: with K = 3 its integer dot product is 0 often enough to flake)
@pytest.mark.parametrize("m,k,n", [(37, 70, 45), (130, 64, 65), (1, 5, 3), (70, 200, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_forward_and_grads(m, k, n, dtype, seed):
    """Against the fake-quantized PyTorch path on the same (dtype-rounded) values, computed in
    fp32: the int32 product is exact, so fp32 agrees to 1e-5 and bf16 to its output rounding."""
    x = torch.randn(m, k, device=DEV).to(dtype).requires_grad_()
    w = torch.randn(n, k, device=DEV, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    xr = x.detach().float().requires_grad_()
    out = ik.int8_linear(x, quant.ternary_ste(w).to(dtype))
    ref = ik.int8_linear_naive(xr, quant.ternary_ste(w_ref).to(dtype).float())
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < TOL[dtype], seed
    g = torch.randn_like(ref).to(dtype).float()
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    assert rel_err(x.grad, xr.grad) < TOL[dtype], seed
    assert rel_err(w.grad, w_ref.grad) < TOL[dtype], seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dx_is_the_product_with_the_quantized_gradient(dtype, seed):
    """int8_dx: dx = q8(dout) @ w_eff with dout quantized per token (codes by torch's rule in
    fp32); the forward and dw_eff are those of the bf16-gradient path."""
    m, k, n = 70, 90, 45
    x = torch.randn(m, k, device=DEV).to(dtype)
    w_eff = quant.ternary_ste(torch.randn(n, k, device=DEV)).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w_eff.clone().requires_grad_(), w_eff.clone().requires_grad_()
    out_a, out_b = ik.int8_linear(xa, wa), ik.int8_linear(xb, wb, int8_dx=True)
    assert torch.equal(out_a, out_b), seed
    g = torch.randn(m, n, device=DEV).to(dtype)
    out_a.backward(g)
    out_b.backward(g)
    gf = g.float()
    dx_ref = quant.act_quant_ste(gf, 8) @ w_eff.float()  # dout's per-token 8-bit codes
    assert rel_err(xb.grad, dx_ref) < (1e-6 if dtype == torch.float32 else 1e-2), seed
    assert rel_err(xb.grad, xa.grad) > 1e-4, seed  # it is an approximation: not the same
    assert torch.equal(wb.grad, wa.grad), seed
    # compiled, forward and backward: every kernel launch sits inside an op (walsh.kernels.registry)
    xc = x.clone().requires_grad_()
    f = torch.compile(lambda t: ik.int8_linear(t, w_eff, int8_dx=True), fullgraph=True,
                      backend="aot_eager")
    f(xc).backward(g)
    assert rel_err(xc.grad, xb.grad) < 1e-6, seed


def test_int8_linear_reads_any_layout_of_x(seed):
    """A transposed (column-major) x gives the row-major x's output: the kernel reads row-major
    operands, so the launcher must not pass strided ones through."""
    x = torch.randn(24, 40, device=DEV).t()                                  # [40, 24], strided
    w_eff = quant.ternary_ste(torch.randn(16, 24, device=DEV))
    out = ik.int8_linear(x, w_eff)
    assert torch.equal(out, ik.int8_linear(x.contiguous(), w_eff)), seed
    assert rel_err(out, ik.int8_linear_naive(x, w_eff)) < 1e-5, seed


@pytest.mark.parametrize("algebra,dim", [("dense", 1), ("cayley_dickson", 8)])
def test_int8_dx_layer_gradients(algebra, dim, seed):
    """A layer with int8_dx: the forward and the weight gradient of the plain INT8 layer, and
    dx = q8(dout) @ dense_weight(), also compiled (no graph break)."""
    from walsh.layers import make_linear

    plain = make_linear(algebra, dim, 64, 48, ternary=True, act_bits=8, int8_matmul=True).to(DEV)
    dxq = make_linear(algebra, dim, 64, 48, ternary=True, act_bits=8, int8_matmul=True,
                      int8_dx=True).to(DEV)
    dxq.load_state_dict(plain.state_dict())
    assert dxq.path().endswith(": INT8 GEMM, INT8 dx") and plain.path().endswith(": INT8 GEMM")
    x = torch.randn(3, 7, 64, device=DEV)
    g = torch.randn(3, 7, 48, device=DEV)
    xa, xb, xc = (x.clone().requires_grad_() for _ in range(3))
    out = dxq(xb)
    assert torch.equal(out, plain(xa)), seed
    plain(xa).backward(g)
    out.backward(g)
    gf = g.reshape(-1, 48)
    dx_ref = quant.act_quant_ste(gf, 8) @ plain.dense_weight().detach()
    assert rel_err(xb.grad.reshape(-1, 64), dx_ref) < 1e-5, seed
    assert rel_err(dxq.weight.grad, plain.weight.grad) < 1e-6, seed
    compiled = torch.compile(dxq, fullgraph=True, backend="aot_eager")
    compiled(xc).backward(g)
    assert rel_err(xc.grad, xb.grad) < 1e-6, seed


def test_int8_matmul_writes_every_output(seed):
    q = torch.randint(-128, 128, (67, 90), dtype=torch.int8, device=DEV)
    codes = torch.randint(-1, 2, (70, 90), dtype=torch.int8, device=DEV)
    inv_s = torch.rand(67, device=DEV)
    gamma = torch.tensor([0.37], device=DEV)
    out = ik.int8_matmul(q, inv_s, codes, gamma, torch.float32)
    ref = (q.double() @ codes.double().t()) * inv_s.double()[:, None] * 0.37
    assert not out.isnan().any() and rel_err(out, ref) < 1e-6, seed
    # bf16: the same fp32 epilogue rounded once, to nearest, as torch casts it (and the GPU;
    # the interpreter's own cast truncates: ``walsh.kernels.bf16_round``)
    out16 = ik.int8_matmul(q, inv_s, codes, gamma, torch.bfloat16)
    assert torch.equal(out16, out.to(torch.bfloat16)), seed


@pytest.mark.parametrize("algebra,dim", [("dense", 1), ("cayley_dickson", 8)])
def test_int8_matmul_layer_equals_fake_quant(algebra, dim, seed):
    from walsh.layers import make_linear

    ref = make_linear(algebra, dim, 64, 48, ternary=True, act_bits=8, bias=True).to(DEV)
    fast = make_linear(algebra, dim, 64, 48, ternary=True, act_bits=8, bias=True,
                       int8_matmul=True).to(DEV)
    with torch.no_grad():
        ref.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 64, device=DEV)
    out_f = assert_layers_agree(ref, fast, x, (3, 7, 48), seed)
    with pytest.raises(ValueError, match="int8_matmul needs"):
        make_linear(algebra, dim, 64, 48, ternary=True, int8_matmul=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # one op, no breaks
    assert rel_err(compiled(x), out_f) < 1e-6, seed
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # fp32 bias, bf16 product
        assert fast(x).dtype == ref(x).dtype == torch.bfloat16


# -- full shapes on the GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("algebra,dim", [("dense", 1), ("cayley_dickson", 8)])
def test_int8_matmul_layer_full_shape_cuda(algebra, dim, seed):
    """The INT8 layer at the 125M model's MLP shape (16k tokens, 768 -> 2048) under bf16
    autocast, against the fake-quantized path in fp32 (the bf16 path's own activation scale is
    rounded to bf16, so it is not the reference)."""
    from walsh.layers import make_linear

    ref = make_linear(algebra, dim, 768, 2048, ternary=True, act_bits=8).cuda()
    fast = make_linear(algebra, dim, 768, 2048, ternary=True, act_bits=8,
                       int8_matmul=True).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(16 * 1024, 768, device="cuda").bfloat16().float()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r = ref(xr)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_f = fast(xf)
    assert out_f.dtype == torch.bfloat16 and rel_err(out_f, out_r) < 1e-2, seed
    g = torch.randn_like(out_r).bfloat16().float()
    (out_r * g).sum().backward()
    (out_f.float() * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) < 1e-2, seed
    assert rel_err(fast.weight.grad, ref.weight.grad) < 1e-2, seed
