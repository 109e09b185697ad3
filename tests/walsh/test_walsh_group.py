"""The shared-input group of Walsh layers (walsh.kernels.walsh_group) against its naive
reference and against the layers one by one: forward and every gradient on odd sizes, fp32
(1e-5) and bf16 (1e-2) relative bounds, fresh random inputs (the seed is in every failure
message), launchers' outputs written into NaN-poisoned buffers; what autograd keeps; the model
with and without grouping. On CPU under TRITON_INTERPRET=1 (tests/conftest.py); the ``gpu``
tests repeat it at the 1.3B model's shapes and compiled.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _helpers import DEV, TOL, assert_bf16_runs_agree, assert_models_agree, rel_err, small_config

pytest.importorskip("triton")
from walsh.kernels import walsh_group as wg  # noqa: E402
from walsh.kernels import walsh_launch  # noqa: E402
from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402
from walsh.layers.hadamard import group_layers, groupable, shared_input  # noqa: E402


def _group(p, a, n, li, lo, dtype, dev=DEV):
    """x [N, A*LI] and p layers' (w, alpha, beta), each a leaf that requires grad."""
    x = torch.randn(n, a * li, device=dev).to(dtype)
    ws = [(torch.randn(a, lo, li, device=dev) / li**0.5).to(dtype) for _ in range(p)]
    alphas = [(1 + 0.3 * torch.randn(a, li, device=dev)).to(dtype) for _ in range(p)]
    betas = [(1 + 0.3 * torch.randn(a, lo, device=dev)).to(dtype) for _ in range(p)]
    return [t.requires_grad_() for t in (x, *ws, *alphas, *betas)]


def _run(fn, leaves, p, grads):
    """(outputs, gradients of every leaf) of fn(x, ws, alphas, betas) against ``grads``."""
    x, rest = leaves[0], leaves[1:]
    outs = fn(x, rest[:p], rest[p:2 * p], rest[2 * p:])
    return outs, torch.autograd.grad([o.float() for o in outs], leaves, grads)


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a,n,li,lo", [(32, 37, 3, 2), (4, 70, 5, 7), (8, 9, 24, 24),
                                       (4, 3, 250, 9)])  # rows of 256: two chunks of 128
def test_group_forward_and_grads_match_naive(p, dtype, a, n, li, lo, seed):
    leaves = _group(p, a, n, li, lo, dtype)
    refs = [t.detach().float().requires_grad_() for t in leaves]
    grads = [torch.randn(n, a * lo, device=DEV).to(dtype).float() for _ in range(p)]
    outs, got = _run(wg.walsh_group, leaves, p, grads)
    want_outs, want = _run(wg.walsh_group_naive, refs, p, grads)
    assert len(outs) == p and all(o.dtype == dtype for o in outs)
    for o, r in zip(outs, want_outs):
        assert rel_err(o, r) < TOL[dtype], seed
    for k, (g, r) in enumerate(zip(got, want)):
        assert g.shape == r.shape and rel_err(g, r) < TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_on_the_dot_matches_naive(dtype, seed):
    """The group's passes with the blocks mixed by the tensor-core dot, which the grid above
    meets only past BUTTERFLY_MAX_LANES lanes (on a GPU): forced at 24 lanes
    (``walsh_launch.transform_mix``)."""
    with walsh_launch.transform_mix("dot"):
        p, a, n, li, lo = 3, 32, 21, 24, 8
        assert walsh_launch.use_dot(a, li) and walsh_launch.use_dot(a, lo)
        leaves = _group(p, a, n, li, lo, dtype)
        refs = [t.detach().float().requires_grad_() for t in leaves]
        grads = [torch.randn(n, a * lo, device=DEV).to(dtype).float() for _ in range(p)]
        outs, got = _run(wg.walsh_group, leaves, p, grads)
        want_outs, want = _run(wg.walsh_group_naive, refs, p, grads)
        for o, r in zip(outs, want_outs):
            assert rel_err(o, r) < TOL[dtype], seed
        for k, (g, r) in enumerate(zip(got, want)):
            assert rel_err(g, r) < TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_equals_the_layers_one_by_one(dtype, seed):
    """Against the single-layer op: the same kernels' arithmetic, but one batched GEMM over
    P*A blocks where each layer had its own, dx's P terms added in fp32 before one rounding
    (one by one, autograd adds the rounded terms), and dalpha's shares over other token
    tiles: a tenth of the naive bound (bf16 outputs may round 1 ulp apart), and for dx the
    naive bound (in bf16 the one-by-one dx carries P + 1 roundings, 3e-3 apart measured)."""
    p, a, n, li, lo = 3, 16, 45, 6, 5
    leaves = _group(p, a, n, li, lo, dtype)
    grads = [torch.randn(n, a * lo, device=DEV).to(dtype).float() for _ in range(p)]
    outs, got = _run(wg.walsh_group, leaves, p, grads)
    one_by_one = lambda x, ws, al, be: [wf.walsh_linear(x, *t) for t in zip(ws, al, be)]
    ref_outs, ref = _run(one_by_one, leaves, p, grads)
    for o, r in zip(outs, ref_outs):
        assert rel_err(o, r) < TOL[dtype] / 10, seed
    for k, (g, r) in enumerate(zip(got, ref)):
        assert rel_err(g, r) < TOL[dtype] / (1 if k == 0 else 10), (k, seed)


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("a,n,lanes,width", [(32, 37, 24, 24), (4, 70, 5, 8),
                                             (4, 3, 250, 256)])  # two chunks of 128 lanes
def test_group_launchers_write_every_output(p, a, n, lanes, width, seed):
    """Into NaN-poisoned buffers: walsh_in_group_raw equals walsh_in_raw with each alpha bit
    for bit (padding lanes zero), and walsh_out_group_gain_raw's dx and dalpha the sums of the
    single passes (fp32)."""
    x = torch.randn(n, a * lanes, device=DEV)
    alpha = 1 + 0.3 * torch.randn(p, a, lanes, device=DEV)
    u = torch.full((p, a, n, width), float("nan"), device=DEV)
    wg.walsh_in_group_raw(x, alpha, width=width, out=u)
    for k in range(p):
        assert torch.equal(u[k], wt.walsh_in_raw(x, alpha[k], a, width=width)), (k, seed)
    dus = [torch.randn(a, n, width, device=DEV) for _ in range(p)]
    dx = torch.full((n, a * lanes), float("nan"), device=DEV)
    _, dalpha = wg.walsh_out_group_gain_raw(dus, alpha, x, out=dx)
    singles = [wt.walsh_out_gain_raw(du, alpha[k], x, a) for k, du in enumerate(dus)]
    assert rel_err(dx, sum(s[0] for s in singles)) < 1e-6, seed
    for k, (_, da) in enumerate(singles):
        assert rel_err(dalpha[k], da) < 1e-6, (k, seed)


def test_group_saves_its_outputs_and_u():
    """For dbeta, autograd keeps each output itself (attention and SwiGLU keep the same
    tensors) and one u for the group: nothing else of an activation's size."""
    p, a, n, li, lo = 3, 8, 11, 5, 7
    leaves = _group(p, a, n, li, lo, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = wg.walsh_group(leaves[0], leaves[1:1 + p], leaves[1 + p:1 + 2 * p],
                              leaves[1 + 2 * p:])
    ptrs = {t.data_ptr() for t in saved}
    assert all(o.data_ptr() in ptrs for o in outs)
    big = sorted(t.numel() for t in saved if t.numel() >= n * a * min(li, lo))
    assert big == sorted([n * a * li, p * a * n * 8] + [n * a * lo] * p)  # x, u, the outs
    outs = wg.walsh_group(leaves[0], leaves[1:1 + p], leaves[1 + p:1 + 2 * p],
                          leaves[1 + 2 * p:])  # (saved-tensor hooks skip the version check)
    outs[1].mul_(2)  # a saved output changed in place: autograd refuses, loudly
    with pytest.raises(RuntimeError, match="inplace operation"):
        sum(o.sum() for o in outs).backward()


def test_group_ops_pass_opcheck_and_compile(seed):
    """torch.library.opcheck on the forward and backward ops (schema, fake against real,
    autograd registration; list arguments and outputs), and the compiled group (fullgraph)
    with its backward equal to eager."""
    p, a, n, li, lo = 2, 8, 6, 5, 3
    leaves = _group(p, a, n, li, lo, torch.float32)
    x, ws, al, be = leaves[0], leaves[1:1 + p], leaves[1 + p:1 + 2 * p], leaves[1 + 2 * p:]
    torch.library.opcheck(torch.ops.walsh.walsh_group.default, (x, ws, al, be, None, None, 0))
    outs = [o.detach() for o in wg.walsh_group(x, ws, al, be)]
    u = wg.walsh_in_group_raw(x.detach(), torch.stack(al).detach(), width=8)
    douts = [torch.randn_like(o) for o in outs]
    plain = [t.detach() for t in leaves]
    torch.library.opcheck(torch.ops.walsh.walsh_group_backward.default,
                          (douts, plain[0], plain[1:1 + p], plain[1 + p:1 + 2 * p],
                           plain[1 + 2 * p:], u, outs, None, None, 0))
    results = []
    for fn in (wg.walsh_group, torch.compile(wg.walsh_group, fullgraph=True, backend="aot_eager")):
        got = _run(fn, leaves, p, douts)
        results.append([*got[0], *got[1]])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled), seed


def test_group_rejects_bad_inputs():
    x, w1, w2, a1, a2, b1, b2 = _group(2, 4, 3, 5, 6, torch.float32)
    with pytest.raises(ValueError, match="2 to 3 layers"):
        wg.walsh_group(x, [w1], [a1], [b1])
    with pytest.raises(ValueError, match="2 to 3 layers"):
        wg.walsh_group(x, [w1, w2] * 2, [a1, a2] * 2, [b1, b2] * 2)
    with pytest.raises(ValueError, match="layer 1's shapes"):
        wg.walsh_group(x, [w1, w2[:, :5]], [a1, a2], [b1, b2])
    with pytest.raises(ValueError, match="layer 0's alpha dtype"):
        wg.walsh_group(x, [w1, w2], [a1.double(), a2], [b1, b2])
    with pytest.raises(ValueError, match="at most 3"):
        wt._launch(x, torch.ones(4, 4, 5), 4, 5, 3, in_mode=True, group=4)


def test_groupable_and_shared_input():
    """Only 2-3 ``triton`` Walsh layers of one weight shape, without activation quantization,
    run as a group; otherwise shared_input calls each layer (same results)."""
    mk = lambda **kw: WalshLinear(32, 16, blocks=4, impl="triton", ternary=True, **kw).to(DEV)
    assert groupable([mk(), mk()]) and groupable([mk(), mk(), mk()])
    assert not groupable([mk()]) and not groupable([mk()] * 4)
    assert not groupable([mk(), mk(act_bits=8)])
    assert not groupable([mk(), WalshLinear(32, 8, blocks=4, impl="triton").to(DEV)])
    assert not groupable([mk(), WalshLinear(32, 16, blocks=4, impl="blocks").to(DEV)])
    x = torch.randn(2, 7, 32, device=DEV)
    layers = [mk(bias=True), mk(bias=True)]
    uneven = [mk(), WalshLinear(32, 8, blocks=4, impl="triton").to(DEV)]  # one by one
    for group in (layers, uneven):
        group_layers(group)
        for m in group:
            if m.bias is not None:
                torch.nn.init.normal_(m.bias)
        for got, m in zip(shared_input(group, x), group):
            assert got.shape == (2, 7, m.out_features) and rel_err(got, m(x)) < 1e-6


def test_unused_group_member_gets_no_gradient():
    """As alone: a layer whose output reaches no loss gets None, not zeros (which an
    optimizer's weight decay and momentum would still act on)."""
    layers = [WalshLinear(32, 16, blocks=4, impl="triton", ternary=True).to(DEV)
              for _ in range(3)]
    x = torch.randn(5, 32, device=DEV, requires_grad=True)
    group_layers(layers)
    q, _, v = shared_input(layers, x)
    (q.sum() + v.square().sum()).backward()
    assert x.grad is not None
    for m, used in zip(layers, (True, False, True)):
        for prm in m.parameters():
            assert (prm.grad is not None) == used


@pytest.mark.parametrize("algebra_dim,head_mix", [(4, False), (32, False), (32, True)])
def test_model_with_and_without_groups(algebra_dim, head_mix, seed):
    """walsh_group on and off: the same loss and gradients (fp32), with and without head
    mixing (after attention, untouched by the group); the grouped run's paths say so, and
    activation quantization leaves the layers one by one."""
    from walsh.models import WalshLM

    mix = dict(head_mix=True, head_mix_dim=4) if head_mix else {}
    cfg = small_config(n_embd=64 if algebra_dim == 4 else 128, algebra="walsh",
                       algebra_dim=algebra_dim, walsh_impl="triton", ternary=True,
                       walsh_swiglu=False, walsh_rope=False, **mix)
    grouped = WalshLM(cfg).to(DEV)
    plain = WalshLM(cfg.replace(walsh_group=False)).to(DEV)
    def paths(model):  # each layer's path without its block GEMMs' (test_block_matmul's)
        return Counter(m.path().split(" (block GEMMs")[0] for m in model.structured_layers())

    assert paths(grouped) == {"WalshLinear: walsh_impl=triton (grouped)": 10,
                              "WalshLinear: walsh_impl=triton": 4}
    assert paths(plain) == {"WalshLinear: walsh_impl=triton": 14}
    assert_models_agree(grouped, plain, seed)
    quantized = WalshLM(cfg.replace(act_bits=8))
    assert "grouped" not in quantized.linear_paths()


# -- full shapes on the GPU -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("p,c,hidden", [(3, 2048, 2048), (2, 2048, 5504), (2, 768, 2048)])
def test_group_full_shape_compiled_cuda(p, c, hidden, seed):
    """At 16k tokens, bf16: the grouped layers (eager and compiled) against the layers one by
    one on the ``blocks`` path (the 1.3B attention and FFN, with its 172-lane padded rows)."""
    layers = [WalshLinear(c, hidden, blocks=32, impl="triton", ternary=True).cuda()
              for _ in range(p)]
    refs = [WalshLinear(c, hidden, blocks=32, impl="blocks", ternary=True).cuda()
            for _ in range(p)]
    for r, m in zip(refs, layers):
        r.load_state_dict(m.state_dict())
    group_layers(layers)
    x = torch.randn(16, 1024, c, device="cuda")
    g = [torch.randn(16, 1024, hidden, device="cuda") for _ in range(p)]
    assert_bf16_runs_agree([(lambda x: [m(x) for m in refs], refs),
                            (lambda x: shared_input(layers, x), layers),
                            (torch.compile(lambda x: shared_input(layers, x)), layers)],
                           x, g, seed)
