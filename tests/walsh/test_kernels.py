"""The Walsh-Hadamard layer as one op (walsh.kernels.walsh_linear, three kernels or one)
against the ``blocks`` path, the layers on the kernels, and how the ops are registered
(every kernel op of walsh.kernels).

The bounds and conventions: ``TOL`` and ``DEV`` in tests/_helpers.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import DEV, TOL, assert_layers_agree, rel_err

pytest.importorskip("triton")

from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402

# -- the layer op (three kernels or one) ------------------------------------------------------
# (a, n, lanes in, lanes out): more than one token tile (16), contraction chunk and output
# tile (32 lanes) with ragged ends, A below (broadcast sums) and at (tensor-core dots) 16
FUSED_GRID = [(32, 37, 3, 5), (32, 17, 24, 40), (16, 33, 40, 7), (8, 20, 7, 9), (4, 5, 33, 6),
              (2, 9, 8, 20)]


@pytest.mark.parametrize("a,n,li,lo", FUSED_GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_kernel", [False, True])
def test_walsh_linear_op_forward_and_grads(one_kernel, a, n, li, lo, dtype, seed):
    x = torch.randn(n, a * li, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(a, lo, li, device=DEV) / li**0.5).to(dtype).requires_grad_()
    alpha = (1 + 0.3 * torch.randn(a, li, device=DEV)).to(dtype).requires_grad_()
    beta = (1 + 0.3 * torch.randn(a, lo, device=DEV)).to(dtype).requires_grad_()
    inputs = (x, w, alpha, beta)
    refs = [t.detach().float().requires_grad_() for t in inputs]
    poisoned = torch.full((n, a * lo), float("nan"), device=DEV, dtype=dtype)
    raw = wf.walsh_linear_raw(*(t.detach() for t in inputs), out=poisoned)
    out, ref = wf.walsh_linear(*inputs, one_kernel=one_kernel), wf.walsh_linear_naive(*refs)
    assert out.dtype == dtype and out.shape == ref.shape == (n, a * lo)
    assert rel_err(raw, ref) < TOL[dtype] and rel_err(out, ref) < TOL[dtype], seed
    # the upstream gradient of a bf16 output is bf16: the reference gets the same values
    # (dw's bf16 error is ~0.0065 here: dy, u and dw each rounded once, as in any bf16 GEMM)
    g = torch.randn_like(ref).to(dtype).float()
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    for name, t, r in zip(("x", "w", "alpha", "beta"), inputs, refs):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert rel_err(t.grad, r.grad) < TOL[dtype], (name, seed)


@pytest.mark.parametrize("one_kernel", [False, True])
def test_walsh_linear_op_gradients_are_deterministic(one_kernel, seed):
    """The gains' gradients are per-tile partial sums added in a fixed order: bit-identical."""
    a, n, li, lo = 32, 70, 5, 9
    x = torch.randn(n, a * li, device=DEV, requires_grad=True)
    w = torch.randn(a, lo, li, device=DEV, requires_grad=True)
    alpha = torch.randn(a, li, device=DEV, requires_grad=True)
    beta = torch.randn(a, lo, device=DEV, requires_grad=True)
    dout = torch.randn(n, a * lo, device=DEV)

    def grads():
        out = wf.walsh_linear(x, w, alpha, beta, one_kernel=one_kernel)
        return torch.autograd.grad(out, (x, w, alpha, beta), dout)

    first, second = grads(), grads()
    for f, s_ in zip(first, second):
        assert torch.equal(f, s_), seed


@pytest.mark.parametrize("one_kernel", [False, True])
def test_walsh_linear_op_without_tokens(one_kernel):
    """No tokens: an empty output and zero gradients for w and both gains (the gains' partial
    sums have no rows; their column sums are zeros, not an empty buffer's contents)."""
    a, li, lo = 32, 5, 9
    x = torch.randn(0, a * li, device=DEV, requires_grad=True)
    params = [torch.randn(s, device=DEV, requires_grad=True)
              for s in ((a, lo, li), (a, li), (a, lo))]  # w, alpha, beta
    out = wf.walsh_linear(x, *params, one_kernel=one_kernel)
    assert out.shape == (0, a * lo)
    grads = torch.autograd.grad(out, (x, *params), torch.empty_like(out))
    assert grads[0].shape == x.shape
    for g, p_ in zip(grads[1:], params):
        assert g.shape == p_.shape and torch.equal(g, torch.zeros_like(p_))


def test_walsh_linear_op_rejects_bad_inputs():
    x = torch.randn(3, 32, device=DEV)
    w, alpha, beta = torch.randn(4, 2, 8, device=DEV), torch.ones(4, 8), torch.ones(4, 2)
    with pytest.raises(ValueError, match="alpha dtype"):
        wf.walsh_linear(x, w, alpha.to(DEV).double(), beta.to(DEV))
    with pytest.raises(ValueError, match=r"shapes x \(3, 32\), w \(4, 2, 8\)"):
        wf.walsh_linear(x, w, torch.ones(4, 7, device=DEV), beta.to(DEV))
    with pytest.raises(ValueError, match="power of two"):
        wf.walsh_linear(torch.randn(3, 24, device=DEV), torch.randn(3, 2, 8, device=DEV),
                        torch.ones(3, 8, device=DEV), torch.ones(3, 2, device=DEV))


# -- the layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,ternary,act_bits", [("triton", True, None), ("fused", True, None),
                                                   ("triton", False, None),
                                                   ("fused", False, None), ("triton", True, 8)])
def test_walsh_linear_kernels_equal_blocks(impl, ternary, act_bits, seed):
    """The kernel paths equal the ``blocks`` path (with act_bits: on the same quantized x)."""
    ref = WalshLinear(40, 24, blocks=8, impl="blocks", ternary=ternary, bias=True,
                      act_bits=act_bits).to(DEV)
    fast = WalshLinear(40, 24, blocks=8, impl=impl, ternary=ternary, bias=True,
                       act_bits=act_bits).to(DEV)
    with torch.no_grad():
        ref.alpha.add_(0.3 * torch.randn_like(ref.alpha))
        ref.beta.add_(0.3 * torch.randn_like(ref.beta))
        ref.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    assert_layers_agree(ref, fast, torch.randn(2, 7, 40, device=DEV), (2, 7, 24), seed)


@pytest.mark.parametrize("impl", ["triton", "fused"])
def test_ops_trace_without_graph_breaks(impl, seed):
    """torch.compile keeps the layer in one graph (fullgraph: any graph break raises)."""
    layer = WalshLinear(64, 32, blocks=32, impl=impl, ternary=True).to(DEV)
    x = torch.randn(5, 64, device=DEV, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, layer(x)) < 1e-6, seed
    out.sum().backward()
    assert x.grad is not None and layer.alpha.grad is not None


# -- registration -----------------------------------------------------------------------------
_SCAN = """
import json
import walsh.kernels.int8_linear, walsh.kernels.walsh_linear, walsh.kernels.ternary
import walsh.kernels.walsh_group, walsh.kernels.walsh_swiglu, walsh.kernels.walsh_mlp
from torch._library.triton import triton_ops_to_kernels
from walsh.kernels import registry
from torch._subclasses.fake_tensor import FakeTensorMode
from walsh.kernels.walsh_transform import _walsh_kernel as k
assert not registry.INTERPRETED
eager = registry.wrap_triton(k) is k
with FakeTensorMode():
    traced = registry.wrap_triton(k) is not k
print(json.dumps([eager, traced, {k: sorted({x.__name__ for x in v})
                  for k, v in triton_ops_to_kernels.items() if k.startswith("walsh::")}]))
"""


def test_triton_ops_name_their_kernels():
    """Where Triton compiles, every op is a ``triton_op`` and torch finds its kernels (they go
    into compile's cache key; one it cannot see could be served stale after an edit), and
    ``registry.wrap_triton`` wraps a kernel only while tracing (eager, the wrapper costs
    ~150 us of host time per launch). Runs in a fresh process without TRITON_INTERPRET (under
    the interpreter ``wrap_triton`` never wraps); importing needs no GPU."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SCAN], env=env, capture_output=True,
                         text=True, check=True).stdout
    walsh, linear, colsum = "_walsh_kernel", "_walsh_linear_kernel", "_column_sums_kernel"
    mm, mm_tn = "_block_mm_kernel", "_block_mm_tn_kernel"  # walsh.kernels.block_matmul
    dual = "_block_mm_dual_kernel"
    chain = "_mlp_chain_kernel"  # walsh.kernels.walsh_mlp_kernel
    eager, traced, kernels = json.loads(out.splitlines()[-1])
    assert eager and traced
    assert kernels == {  # (each list sorted by name)
        "walsh::int8_mm": ["_int8_matmul_kernel"],
        "walsh::int8_linear": ["_int8_matmul_kernel"],
        "walsh::ternary_ste": ["_abs_partial_kernel", "_ternary_apply_kernel"],
        "walsh::walsh_in": [walsh],
        "walsh::walsh_out": [walsh],
        "walsh::walsh_in_gain": [colsum, walsh],
        "walsh::walsh_out_gain": [colsum, walsh],
        "walsh::walsh_linear": [mm, colsum, walsh, linear],
        "walsh::walsh_linear_backward": [dual, mm, mm_tn, colsum, walsh, linear],
        "walsh::walsh_group": [mm, walsh],
        "walsh::walsh_group_backward": [dual, mm, mm_tn, colsum, walsh],
        "walsh::swiglu_linear": [mm, walsh],
        "walsh::swiglu_linear_backward": [dual, mm, mm_tn, colsum, walsh],
        "walsh::walsh_mlp": [mm, chain, walsh],
        "walsh::walsh_mlp_backward": [dual, mm, mm_tn, colsum, chain, walsh],
    }


# -- full shapes on the GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f", [(768, 768), (768, 2048), (2048, 768), (2048, 8192),
                                       (2048, 5504), (5504, 2048)])  # 1.3B FFN: padded rows
@pytest.mark.parametrize("impl", ["triton", "fused"])
def test_walsh_linear_full_shape_cuda(impl, in_f, out_f, dtype, seed):
    ref = WalshLinear(in_f, out_f, blocks=32, impl="blocks", ternary=True).cuda()
    fast = WalshLinear(in_f, out_f, blocks=32, impl=impl, ternary=True).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(16 * 1024, in_f, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_f_ = ref(xr), fast(xf)
    assert rel_err(out_f_, out_r) < TOL[dtype], seed
    g = torch.randn_like(out_r)
    (out_r.float() * g).sum().backward()
    (out_f_.float() * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) < TOL[dtype], seed
    for name, p in ref.named_parameters():
        assert rel_err(dict(fast.named_parameters())[name].grad, p.grad) < TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.parametrize("in_f,out_f", [(768, 2304), (2048, 5504)])
@pytest.mark.parametrize("impl", ["triton", "fused"])
def test_walsh_linear_compiled_backward_at_16k_tokens(impl, in_f, out_f, seed):
    """Inductor (torch 2.11) once returned the gains' gradient flattened at N = 16k tokens;
    the compiled layer's gradients must match the eager ones at that size (also with the
    1.3B FFN's 172-lane rows padded to 176 in the bmm's u, y, du and dy)."""
    layer = WalshLinear(in_f, out_f, blocks=32, impl=impl, ternary=True).cuda()
    x = torch.randn(16, 1024, in_f, device="cuda")
    grads = []
    for f in (layer, torch.compile(layer)):
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f(x).float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name].shape == g.shape and rel_err(grads[1][name], g) < 1e-2, name
