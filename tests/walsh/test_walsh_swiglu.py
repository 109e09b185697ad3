"""The down projection with SwiGLU's product inside (walsh.kernels.walsh_swiglu) against its
naive reference and against SwiGLU's product apart: forward and every gradient on odd sizes,
fp32 (1e-5) and bf16 (1e-2) relative bounds, fresh random inputs (the seed is in every failure
message), launchers' outputs written into NaN-poisoned buffers; what autograd keeps; the
model with and without the fusion. On CPU under TRITON_INTERPRET=1 (tests/conftest.py); the
``gpu`` test repeats it at the 1.3B and 125M MLP shapes, compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEV,
    TOL,
    assert_bf16_runs_agree,
    assert_models_agree,
    assert_ops_agree,
    rel_err,
    small_config,
)
from _helpers import run_with_grads as _run

pytest.importorskip("triton")
from walsh.kernels import walsh_launch  # noqa: E402
from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.kernels import walsh_swiglu as ws  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402
from walsh.layers.common import SwiGLU  # noqa: E402
from walsh.layers.hadamard import fuse_swiglu, run_by_parent, swiglu_down  # noqa: E402


def _leaves(a, n, li, lo, dtype, dev=DEV):
    """gate, up [N, A*LI] and the layer's w, alpha, beta, each a leaf that requires grad."""
    gate = (2 * torch.randn(n, a * li, device=dev)).to(dtype)  # silu's curved part and tails
    up = torch.randn(n, a * li, device=dev).to(dtype)
    w = (torch.randn(a, lo, li, device=dev) / li**0.5).to(dtype)
    alpha = (1 + 0.3 * torch.randn(a, li, device=dev)).to(dtype)
    beta = (1 + 0.3 * torch.randn(a, lo, device=dev)).to(dtype)
    return [t.requires_grad_() for t in (gate, up, w, alpha, beta)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a,n,li,lo", [(32, 37, 3, 2), (4, 70, 5, 7), (8, 9, 24, 24),
                                       (4, 3, 250, 9)])  # rows of 256: chunks of 256 lanes
def test_forward_and_grads_match_naive(dtype, a, n, li, lo, seed):
    leaves = _leaves(a, n, li, lo, dtype)
    refs = [t.detach().float().requires_grad_() for t in leaves]
    grad = torch.randn(n, a * lo, device=DEV).to(dtype).float()
    out, got = _run(ws.swiglu_linear, leaves, grad)
    want_out, want = _run(ws.swiglu_linear_naive, refs, grad)
    assert out.dtype == dtype and rel_err(out, want_out) < TOL[dtype], seed
    for k, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == r.shape and rel_err(g, r) < TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_dot_matches_naive(dtype, seed):
    """The passes with the blocks mixed by the tensor-core dot, which the grid above meets
    only past BUTTERFLY_MAX_LANES lanes (on a GPU): forced at 24 lanes
    (``walsh_launch.transform_mix``)."""
    with walsh_launch.transform_mix("dot"):
        leaves = _leaves(32, 21, 24, 8, dtype)
        refs = [t.detach().float().requires_grad_() for t in leaves]
        grad = torch.randn(21, 32 * 8, device=DEV).to(dtype).float()
        out, got = _run(ws.swiglu_linear, leaves, grad)
        want_out, want = _run(ws.swiglu_linear_naive, refs, grad)
        assert rel_err(out, want_out) < TOL[dtype], seed
        for k, (g, r) in enumerate(zip(got, want)):
            assert rel_err(g, r) < TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_product_apart(dtype, seed):
    """Against silu(gate) * up as torch ops and the single-layer op: the same transforms and
    GEMMs, h in fp32 where apart it is rounded to the input dtype (bf16: within the naive
    bound; fp32: a tenth of it)."""
    leaves = _leaves(16, 45, 6, 5, dtype)
    grad = torch.randn(45, 16 * 5, device=DEV).to(dtype).float()
    apart = lambda g, u, w, al, be: wf.walsh_linear(F.silu(g) * u, w, al, be)
    bound = TOL[dtype] / (10 if dtype == torch.float32 else 1)
    assert_ops_agree(ws.swiglu_linear, apart, leaves, grad, bound, seed)


@pytest.mark.parametrize("a,n,lanes,width", [(32, 37, 24, 24), (4, 70, 5, 8), (4, 5, 86, 88),
                                             (4, 9, 64, 64), (4, 3, 250, 256),
                                             (4, 2, 300, 304)])  # the launch table's rows
def test_launchers_write_every_output(a, n, lanes, width, seed):
    """Into NaN-poisoned buffers (fp32): walsh_in on silu(gate) * up equals walsh_in of the
    product computed apart (padding lanes zero); the dx pass's dgate, dup and dalpha equal
    the single dx pass on h followed by SwiGLU's backward in torch."""
    gate, up = (torch.randn(n, a * lanes, device=DEV) for _ in range(2))
    alpha = 1 + 0.3 * torch.randn(a, lanes, device=DEV)
    h = F.silu(gate) * up
    u = torch.full((a, n, width), float("nan"), device=DEV)
    wt.walsh_in_raw(gate, alpha, a, width=width, out=u, up=up)
    assert rel_err(u, wt.walsh_in_raw(h, alpha, a, width=width)) < 1e-6, seed
    assert torch.all(u[..., lanes:] == 0), seed
    du = torch.randn(a, n, width, device=DEV)
    dgate, dup = (torch.full_like(gate, float("nan")) for _ in range(2))
    ws.walsh_out_swiglu_gain_raw(du, alpha, gate, up, out=dgate, out1=dup)
    _, _, dalpha = ws.walsh_out_swiglu_gain_raw(du, alpha, gate, up)
    dh, want_dalpha = wt.walsh_out_gain_raw(du, alpha, h, a)
    g = gate.clone().requires_grad_()
    u_ = up.clone().requires_grad_()
    want_dgate, want_dup = torch.autograd.grad(F.silu(g) * u_, (g, u_), dh)
    for k, (got, want) in enumerate(((dgate, want_dgate), (dup, want_dup),
                                     (dalpha, want_dalpha))):
        assert rel_err(got, want) < 1e-6, (k, seed)


def test_saves_gate_up_u_and_out():
    """For its backward, autograd keeps gate and up (the group's outputs, kept by it too),
    u and the output: no h of the product's size."""
    a, n, li, lo = 8, 11, 5, 7
    leaves = _leaves(a, n, li, lo, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ws.swiglu_linear(*leaves)
    ptrs = {t.data_ptr() for t in saved}
    assert {leaves[0].data_ptr(), leaves[1].data_ptr(), out.data_ptr()} <= ptrs
    big = sorted(t.numel() for t in saved if t.numel() >= n * a * min(li, lo))
    assert big == sorted([n * a * li] * 2 + [a * n * 8, n * a * lo])  # gate, up, u, out


def test_ops_pass_opcheck_and_compile(seed):
    """torch.library.opcheck on the forward and backward ops, and the compiled op (fullgraph)
    with its backward equal to eager."""
    a, n, li, lo = 8, 6, 5, 3
    leaves = _leaves(a, n, li, lo, torch.float32)
    torch.library.opcheck(torch.ops.walsh.swiglu_linear.default, tuple(leaves))
    plain = [t.detach() for t in leaves]
    out = ws.swiglu_linear(*plain)
    u = wt.walsh_in_raw(plain[0], plain[3], a, width=8, up=plain[1])
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.walsh.swiglu_linear_backward.default,
                          (dout, *plain, u, out))
    results = []
    for fn in (ws.swiglu_linear,
               torch.compile(ws.swiglu_linear, fullgraph=True, backend="aot_eager")):
        got = _run(fn, leaves, dout)
        results.append([got[0], *got[1]])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled), seed


def test_strided_inputs(seed):
    """gate and up as transposed views (not contiguous): the same results as contiguous."""
    a, n, li, lo = 4, 20, 6, 5
    leaves = _leaves(a, n, li, lo, torch.float32)
    strided = [t.detach().t().contiguous().t().requires_grad_() for t in leaves[:2]]
    assert not strided[0].is_contiguous()
    grad = torch.randn(n, a * lo, device=DEV)
    out, got = _run(ws.swiglu_linear, [*strided, *leaves[2:]], grad)
    ref_out, ref = _run(ws.swiglu_linear, leaves, grad)
    assert torch.equal(out, ref_out), seed
    for k, (g, r) in enumerate(zip(got, ref)):
        assert torch.equal(g, r), (k, seed)


def test_rejects_bad_inputs():
    gate, up, w, alpha, beta = _leaves(4, 3, 5, 6, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        ws.swiglu_linear(gate, up[:, :8], w, alpha, beta)
    with pytest.raises(ValueError, match="up dtype"):
        ws.swiglu_linear(gate, up.double(), w, alpha, beta)
    with pytest.raises(ValueError, match="one layer's walsh_in"):
        wt._launch(gate, alpha, 4, 5, 3, in_mode=True, other=gate, up=up)
    with pytest.raises(ValueError, match="up must be a contiguous"):
        wt.walsh_in_raw(gate, alpha, 4, up=up[:2])


def test_fuse_swiglu_marks_only_triton_layers_without_act_quant():
    """Only a ``triton`` Walsh layer without activation quantization computes the product
    itself; otherwise swiglu_down calls the layer on the product (same results), and the
    marked layer's parent is run by its parent's op (``run_by_parent``)."""
    mk = lambda impl="triton", **kw: WalshLinear(32, 16, blocks=4, impl=impl, **kw).to(DEV)
    layers = {"triton": mk(), "act8": mk(act_bits=8), "blocks": mk("blocks"),
              "fused": mk("fused"), "dense": mk("dense"), "bias": mk(bias=True)}
    for m in layers.values():
        fuse_swiglu(m)
    assert {k: m.swiglu_input for k, m in layers.items()} == {
        "triton": True, "act8": False, "blocks": False, "fused": False, "dense": False,
        "bias": True}
    assert run_by_parent(layers["triton"]) and not run_by_parent(layers["blocks"])
    torch.nn.init.normal_(layers["bias"].bias)
    gate, up = torch.randn(2, 7, 32, device=DEV), torch.randn(2, 7, 32, device=DEV)
    for name, m in layers.items():  # unmarked layers: the fallback runs (both sides alike)
        got = swiglu_down(m, gate, up)
        m.swiglu_input = False
        want = m(F.silu(gate) * up)
        assert got.shape == (2, 7, 16) and rel_err(got, want) < 1e-6, name


def test_swiglu_module_is_per_token():
    """The MLP mixes no tokens: a change at one position changes that position's output
    only (the fused op's token tiles must not leak)."""
    mlp = SwiGLU(lambda i, o, **kw: WalshLinear(i, o, blocks=4, impl="triton"), 32, 64, 1.0,
                 group=True, fuse=True).to(DEV)
    assert mlp.down.swiglu_input
    x = torch.randn(3, 9, 32, device=DEV)
    y = x.clone()
    y[1, 4] += 1.0
    diff = (mlp(x) - mlp(y)).abs().amax(-1)  # [3, 9]
    assert diff[1, 4] > 0 and diff.sum() == diff[1, 4]


@pytest.mark.parametrize("group", [True, False])
def test_model_with_and_without_the_fusion(group, seed):
    """walsh_swiglu on and off: the same loss and gradients (fp32), with and without the
    gate, up group; the fused run's paths say so."""
    from walsh.models import WalshLM

    cfg = small_config(n_embd=64, algebra="walsh", algebra_dim=4, walsh_impl="triton",
                       ternary=True, walsh_group=group)
    fused = WalshLM(cfg).to(DEV)
    plain = WalshLM(cfg.replace(walsh_swiglu=False)).to(DEV)
    assert "2 x WalshLinear: walsh_impl=triton (silu(gate) * up inside)" in fused.linear_paths()
    assert "silu" not in plain.linear_paths()
    assert_models_agree(fused, plain, seed)


# -- full shapes on the GPU -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("c,hidden", [(2048, 5504), (1024, 2752), (768, 2048)])
def test_full_shape_compiled_cuda(c, hidden, seed):
    """At 16k tokens, bf16: the MLP with the fusion (eager and compiled) against the same MLP
    with the product apart (the 1.3B FFN's 172-lane padded rows, the 350M's 86, the 125M's
    64: each width has its own launch, ``walsh_launch.SWIGLU_DX``). Against the ``blocks``
    path the MLP is two bf16 layers deep (gate and up, then down), whose errors add: measured
    1.3e-2 at the 1.3B shape, so the naive bounds are the single layers' tests'."""
    make = lambda i, o, **kw: WalshLinear(i, o, blocks=32, impl="triton", ternary=True, **kw)
    ref = SwiGLU(make, c, hidden, 1.0, group=True).cuda()
    mlp = SwiGLU(make, c, hidden, 1.0, group=True, fuse=True).cuda()
    mlp.load_state_dict(ref.state_dict())
    x = torch.randn(16, 1024, c, device="cuda")
    g = torch.randn(16, 1024, c, device="cuda")
    assert_bf16_runs_agree([(ref, [ref]), (mlp, [mlp]), (torch.compile(mlp), [mlp])], x, [g],
                           seed)
