"""RoPE inside the q and k projections' passes (the Walsh kernel's ROPE; ``walsh_linear`` and
``walsh_group`` with ``rope``) against RoPE apart (``walsh.layers.common.apply_rope``): the
passes, forward and every gradient on odd sizes (fp32 1e-5, bf16 1e-2 relative), what autograd
keeps, the marking rule, the model with and without, and causality. On CPU under
TRITON_INTERPRET=1 (tests/conftest.py); the ``gpu`` test repeats it at the 1.3B attention's
shape, compiled.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV, TOL, assert_bf16_runs_agree, assert_models_agree, rel_err, small_config

pytest.importorskip("triton")
from walsh.kernels import walsh_group as wg  # noqa: E402
from walsh.kernels import walsh_launch  # noqa: E402
from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402
from walsh.layers.common import (  # noqa: E402
    apply_rope,
    rope_cache,
    rope_lanes,
    rope_table_dtype,
)
from walsh.layers.hadamard import fuse_rope, group_layers, shared_input  # noqa: E402


def _tables(t, d, offset=0):
    """RoPE's fp32 tables [T, D/2] at positions offset..offset+t-1 (as the model slices them)."""
    cos, sin = rope_cache(offset + t, d, device=DEV)
    return cos[offset:].contiguous(), sin[offset:].contiguous()


def _lanes(cos, sin, features):
    """The kernels' per-lane tables [T, features] of ``_tables``'s (heads of D)."""
    return rope_lanes(cos, sin, features // (2 * cos.shape[1]))


def _rotate(z, cos, sin, sign=1):
    """z [B*T, F] rotated in heads of D (apply_rope; sign -1: back)."""
    t, d = cos.shape[0], 2 * cos.shape[1]
    return apply_rope(z.view(-1, t, z.shape[1] // d, d), cos, sign * sin).reshape(z.shape)


# a, lanes, row width, head dim, tokens per sequence, sequences: heads within a block, across
# four blocks, of the whole row; two 256-lane chunks; a 2-lane block
SHAPES = [(4, 6, 8, 6, 5, 3), (32, 4, 8, 16, 7, 2), (8, 2, 8, 16, 3, 2), (4, 250, 256, 40, 3, 1)]


@pytest.mark.parametrize("a,lanes,width,d,t,b", SHAPES)
def test_passes_rotate_and_rotate_back(a, lanes, width, d, t, b, seed):
    """Into NaN-poisoned buffers (fp32): walsh_out with RoPE equals RoPE of the plain pass's
    result; its backward pass (walsh_in + dbeta) on a rotated output and its gradient equals
    the plain pass on both rotated back."""
    n = t * b
    cos, sin = _tables(t, d, offset=3)
    y = torch.randn(a, n, width, device=DEV)
    beta = 1 + 0.3 * torch.randn(a, lanes, device=DEV)
    out = torch.full((n, a * lanes), float("nan"), device=DEV)
    lanes_rope = _lanes(cos, sin, a * lanes)
    wt.walsh_out_raw(y, beta, a, lanes=lanes, out=out, rope=lanes_rope)
    plain = wt.walsh_out_raw(y, beta, a, lanes=lanes)
    assert rel_err(out, _rotate(plain, cos, sin)) < 1e-6 and rel_err(out, plain) > 0.1, seed
    dout = torch.randn(n, a * lanes, device=DEV)
    dy = torch.full((a, n, width), float("nan"), device=DEV)
    _, dbeta = wt.walsh_in_gain_raw(dout, beta, out, a, width=width, out=dy, rope=lanes_rope)
    want_dy, want_dbeta = wt.walsh_in_gain_raw(_rotate(dout, cos, sin, -1).contiguous(), beta,
                                               _rotate(out, cos, sin, -1).contiguous(), a,
                                               width=width)
    assert rel_err(dy, want_dy) < 1e-6 and rel_err(dbeta, want_dbeta) < 1e-6, seed


def test_rope_passes_on_the_dot_and_on_butterflies_agree(seed):
    """walsh_out with RoPE and its backward pass (fp32), the blocks mixed by the tensor-core
    dot (forced at 8 lanes by ``walsh_launch.transform_mix``, where the rule takes
    butterflies): within fp32 rounding of the butterflies' results, and walsh_out against
    RoPE of the naive transform."""
    a, lanes, width, d, t, b = 32, 8, 8, 16, 7, 2
    n = t * b
    cos, sin = _tables(t, d, offset=3)
    y = torch.randn(a, n, width, device=DEV)
    beta = 1 + 0.3 * torch.randn(a, lanes, device=DEV)
    dout = torch.randn(n, a * lanes, device=DEV)
    lanes_rope = _lanes(cos, sin, a * lanes)
    runs = []
    for mix in ("butterflies", "dot"):  # the rule's at 8 lanes, then the dot forced
        with walsh_launch.transform_mix(mix):
            assert walsh_launch.use_dot(a, lanes) == (mix == "dot")
            out = wt.walsh_out_raw(y, beta, a, lanes=lanes, rope=lanes_rope)
            runs.append((out, *wt.walsh_in_gain_raw(dout, beta, out, a, width=width,
                                                    rope=lanes_rope)))
    want = _rotate(wt.walsh_out_naive(y[..., :lanes], beta), cos, sin)
    assert rel_err(runs[1][0], want) < 1e-6, seed
    for k, (bf, dot) in enumerate(zip(*runs)):
        assert rel_err(bf, dot) < 1e-6, (k, seed)


def test_fp16_tables_for_bf16_data(seed):
    """bf16 data with fp16 tables (``rope_table_dtype``): walsh_out with RoPE and its backward
    pass within bf16's bound of the rotation in fp32, and the output within about one bf16
    rounding of the same pass with fp32 tables (not bit-equal: the fp16 tables are what the
    pass reads). fp16 tables for fp32 data are refused (``test_rejects_bad_inputs``)."""
    a, lanes, d, t, b = 32, 6, 16, 7, 2  # heads of 16 lanes across blocks of 6
    n = t * b
    cos, sin = _tables(t, d, offset=3)
    t32 = _lanes(cos, sin, a * lanes)
    t16 = rope_lanes(cos, sin, a * lanes // d, torch.float16)
    assert t16[0].dtype == torch.float16 and torch.equal(t16[0], t32[0].half())
    bf = torch.bfloat16
    y = torch.randn(a, n, lanes, device=DEV).to(bf)
    beta = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).clamp(min=0.25).to(bf)  # ``_layer``
    out16 = wt.walsh_out_raw(y, beta, a, rope=t16)
    out32 = wt.walsh_out_raw(y, beta, a, rope=t32)
    want = _rotate(wt.walsh_out_raw(y.float(), beta.float(), a), cos, sin)
    assert out16.dtype == bf and rel_err(out16, want) < TOL[bf], seed
    assert rel_err(out16, out32) < 2**-8 and not torch.equal(out16, out32), seed
    dout = torch.randn(n, a * lanes, device=DEV).to(bf)
    dy, dbeta = wt.walsh_in_gain_raw(dout, beta, out16, a, rope=t16)
    want_dy, want_dbeta = wt.walsh_in_gain_raw(
        _rotate(dout.float(), cos, sin, -1).contiguous(), beta.float(),
        _rotate(out16.float(), cos, sin, -1).contiguous(), a)
    assert rel_err(dy, want_dy) < TOL[bf] and rel_err(dbeta, want_dbeta) < TOL[bf], seed


def test_rope_table_dtype_follows_the_compute_dtype():
    """fp32 tables for fp32 activations, fp16 for bf16 and fp16 ones, and for fp32 activations
    under a bf16 autocast (the layers compute them in bf16)."""
    x = torch.randn(2, 3)
    assert rope_table_dtype(x) == torch.float32
    assert rope_table_dtype(x.bfloat16()) == rope_table_dtype(x.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rope_table_dtype(x) == torch.float16


def _layer(a, li, lo, n, dtype, p=1):
    """[x, w.., alpha.., beta..]: beta kept >= 0.25. The op recovers z = out / beta from its
    saved rotated output rotated back, whose rounding mixes each lane with its pair partner:
    a lane whose beta is far below its partner's beta * z gets dbeta to that partner's
    precision over beta (a bf16 draw with beta = 0.002 gave dbeta 1.1e-2 relative over 24
    lanes, against at most 5e-3 over 150 other draws; ``walsh.kernels.walsh_transform``)."""
    x = torch.randn(n, a * li, device=DEV).to(dtype)
    ws = [(torch.randn(a, lo, li, device=DEV) / li**0.5).to(dtype) for _ in range(p)]
    als = [(1 + 0.3 * torch.randn(a, li, device=DEV)).to(dtype) for _ in range(p)]
    bes = [(1 + 0.3 * torch.randn(a, lo, device=DEV)).clamp(min=0.25).to(dtype)
           for _ in range(p)]
    return [t.requires_grad_() for t in (x, *ws, *als, *bes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a,li,lo,d,t,b", [(4, 5, 6, 8, 5, 3), (32, 3, 2, 4, 7, 2),
                                           (8, 24, 24, 64, 3, 2)])
def test_linear_with_rope_matches_naive(dtype, a, li, lo, d, t, b, seed):
    n = t * b
    cos, sin = _tables(t, d)
    leaves = _layer(a, li, lo, n, dtype)
    refs = [z.detach().float().requires_grad_() for z in leaves]
    out = wf.walsh_linear(*leaves, rope=_lanes(cos, sin, a * lo))
    want = _rotate(wf.walsh_linear_naive(*refs), cos, sin)
    # the upstream gradient of a bf16 output is bf16: the reference gets the same values
    g = torch.randn(n, a * lo, device=DEV).to(dtype).float()
    got, ref = torch.autograd.grad(out.float(), leaves, g), torch.autograd.grad(want, refs, g)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype], seed
    for k, (p, q) in enumerate(zip(got, ref)):
        assert rel_err(p, q) < TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_rotates_its_first_outputs(dtype, seed):
    """q, k, v as a group with RoPE on q and k (n_rope = 2), v untouched."""
    a, li, lo, d, t, b, p = 4, 5, 6, 8, 5, 3, 3
    n = t * b
    cos, sin = _tables(t, d)
    leaves = _layer(a, li, lo, n, dtype, p)
    refs = [z.detach().float().requires_grad_() for z in leaves]
    outs = wg.walsh_group(leaves[0], leaves[1:4], leaves[4:7], leaves[7:],
                          rope=_lanes(cos, sin, a * lo), n_rope=2)
    want = wg.walsh_group_naive(refs[0], refs[1:4], refs[4:7], refs[7:])
    want = [_rotate(o, cos, sin) if k < 2 else o for k, o in enumerate(want)]
    gs = [torch.randn(n, a * lo, device=DEV).to(dtype).float() for _ in range(p)]  # as above
    got = torch.autograd.grad([o.float() for o in outs], leaves, gs)
    ref = torch.autograd.grad(want, refs, gs)
    for o, w in zip(outs, want):
        assert rel_err(o, w) < TOL[dtype], seed
    for k, (p_, q) in enumerate(zip(got, ref)):
        assert rel_err(p_, q) < TOL[dtype], (k, seed)


def test_saves_the_rotated_output():
    """The op saves its own (rotated) output for dbeta: the tensor SDPA keeps as its q or k,
    so that RoPE inside adds nothing to what is kept (apart, q and k before RoPE were kept
    beside SDPA's rotated copies)."""
    a, li, lo, d, t, b = 4, 5, 6, 8, 5, 3
    cos, sin = _tables(t, d)
    leaves = _layer(a, li, lo, t * b, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z) or z, lambda z: z):
        out = wf.walsh_linear(*leaves, rope=_lanes(cos, sin, a * lo))
    assert out.data_ptr() in {z.data_ptr() for z in saved}


def test_ops_pass_opcheck_and_compile(seed):
    """torch.library.opcheck on the layer's and the group's ops with RoPE's tables, and the
    compiled layer (fullgraph) with its backward equal to eager."""
    a, li, lo, d, t, b = 8, 5, 4, 8, 3, 2
    n = t * b
    cos, sin = _lanes(*_tables(t, d), a * lo)
    leaves = _layer(a, li, lo, n, torch.float32)
    torch.library.opcheck(torch.ops.walsh.walsh_linear.default, (*leaves, False, cos, sin))
    plain = [z.detach() for z in leaves]
    out, u = torch.ops.walsh.walsh_linear.default(*plain, False, cos, sin)
    torch.library.opcheck(torch.ops.walsh.walsh_linear_backward.default,
                          (torch.randn_like(out), *plain, u, out, False, cos, sin))
    group = _layer(a, li, lo, n, torch.float32, 2)
    torch.library.opcheck(torch.ops.walsh.walsh_group.default,
                          (group[0], group[1:3], group[3:5], group[5:], cos, sin, 1))
    fn = lambda *z: wf.walsh_linear(*z, rope=(cos, sin))
    g = torch.randn(n, a * lo, device=DEV)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        o = f(*leaves)
        results.append([o, *torch.autograd.grad(o, leaves, g)])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled), seed


def test_rejects_bad_inputs():
    x, w, al, be = _layer(4, 5, 6, 15, torch.float32)
    cos, sin = _lanes(*_tables(5, 8), 24)
    with pytest.raises(ValueError, match="T must divide the tokens"):
        wf.walsh_linear(x, w, al, be, rope=_lanes(*_tables(4, 8), 24))
    with pytest.raises(ValueError, match=r"data must be torch.float32 contiguous \[T, 24\]"):
        wf.walsh_linear(x, w, al, be, rope=_lanes(*_tables(5, 8), 16))
    with pytest.raises(ValueError, match="lanes must be even"):
        wf.walsh_linear(x, w[:, :5], al, be[:, :5], rope=_lanes(*_tables(5, 4), 20))
    with pytest.raises(ValueError, match="must be torch.float32 contiguous"):  # fp16 tables
        wf.walsh_linear(x, w, al, be, rope=(cos.half(), sin.half()))  # for fp32 data
    with pytest.raises(ValueError, match="not one_kernel"):
        wf.walsh_linear(x, w, al, be, one_kernel=True, rope=(cos, sin))
    with pytest.raises(ValueError, match="n_rope"):
        wg.walsh_group(x, [w, w], [al, al], [be, be], n_rope=1)
    with pytest.raises(ValueError, match="one layer's walsh_out"):
        wt._launch(x, al, 4, 5, 15, in_mode=True, rope=(cos[:, :20], sin[:, :20]))
    with pytest.raises(ValueError, match="fuse_rope marked"):
        WalshLinear(20, 24, blocks=4, impl="triton")(x[:, :20], rope=(cos, sin))
    # the layers: x's rows must be the tables' sequences, and the rotated layers lead a group
    q, k, v = (WalshLinear(32, 32, blocks=4, impl="triton") for _ in range(3))
    assert fuse_rope([q, k], 8)
    tabs = _lanes(*_tables(5, 8), 32)
    with pytest.raises(ValueError, match="T = the tables' 5 rows"):
        q(torch.randn(3, 4, 32, device=DEV), rope=tabs)
    with pytest.raises(ValueError, match="T = the tables' 5 rows"):
        q(torch.randn(15, 32, device=DEV), rope=tabs)
    group_layers([v, q, k])
    with pytest.raises(ValueError, match="must lead"):
        shared_input([v, q, k], torch.randn(3, 5, 32, device=DEV), rope=tabs)


def test_fuse_rope_marks_only_fitting_triton_layers():
    """All of q and k or none: ``triton`` Walsh layers without activation quantization or
    bias, whose blocks hold whole pairs of lanes."""
    mk = lambda impl="triton", out=32, **kw: WalshLinear(32, out, blocks=4, impl=impl, **kw)
    assert fuse_rope([mk(), mk()], 8)
    for other in (mk(bias=True), mk(act_bits=8), mk("blocks"), mk("fused"), mk(out=36)):
        pair = [mk(), other]
        assert not fuse_rope(pair, 4 if other.out_features == 36 else 8)
        assert not any(m.rope_output for m in pair)


@pytest.mark.parametrize("group", [True, False])
def test_model_with_and_without_rope_inside(group, seed):
    """walsh_rope on and off: the same loss and gradients (fp32), grouped or one by one; the
    paths say so; and the model stays causal (a later token changes no earlier logit)."""
    from walsh.models import WalshLM

    cfg = small_config(n_embd=128, algebra="walsh", algebra_dim=32, walsh_impl="triton",
                       ternary=True, walsh_group=group)  # heads of 16 lanes: 4 blocks
    inside = WalshLM(cfg).to(DEV)
    apart = WalshLM(cfg.replace(walsh_rope=False)).to(DEV)
    assert inside.linear_paths().startswith("4 x WalshLinear: walsh_impl=triton"
                                            + " (grouped)" * group + " (RoPE inside)")
    assert "RoPE" not in apart.linear_paths()
    assert_models_agree(inside, apart, seed)
    idx = torch.randint(0, 256, (2, 19), device=DEV)
    with torch.no_grad():
        changed = idx.clone()
        changed[:, 11] = (changed[:, 11] + 1) % 256
        before, after = inside(idx), inside(changed)
    assert torch.equal(before[:, :11], after[:, :11]), seed
    assert not torch.equal(before[:, 11:], after[:, 11:]), seed


@pytest.mark.parametrize("dtype,table", [(torch.float32, torch.float32),
                                         (torch.bfloat16, torch.float16)])
def test_model_builds_the_tables_once(dtype, table):
    """Every layer's op gets the one pair of per-lane tables the model built for the step, so
    the backward keeps one copy (built per layer, each kept its own: 16 MiB a layer at 1.3B),
    in ``rope_table_dtype``'s dtype (fp16 for a bf16 model)."""
    from walsh.models import WalshLM

    cfg = small_config(n_embd=128, algebra="walsh", algebra_dim=32, walsh_impl="triton",
                       ternary=True)
    model = WalshLM(cfg).to(DEV, dtype)
    idx = torch.randint(0, 256, (2, 19), device=DEV)
    tables = []
    keep = lambda z: tables.append(z) if z.dtype == table and z.shape == (19, 128) else None
    with torch.autograd.graph.saved_tensors_hooks(lambda z: keep(z) or z, lambda z: z):
        model(idx, idx)
    assert len(tables) == 2 * cfg.n_layer  # cos and sin, by each layer's q, k, v group op
    assert len({z.data_ptr() for z in tables}) == 2


# -- full shapes on the GPU -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["walsh-h-1b3", "walsh-h-125m"])
def test_attention_full_shape_compiled_cuda(preset, seed):
    """At 16k tokens, bf16: attention with RoPE inside q's and k's passes (eager and compiled)
    against the same attention with RoPE apart (heads of 128 lanes over 64-lane blocks at
    1.3B, of 64 over 24-lane blocks at 125M)."""
    from walsh.models import WalshLM, get_preset

    cfg = get_preset(preset, walsh_impl="triton", n_layer=1)
    inside = WalshLM(cfg).cuda()
    apart = WalshLM(cfg.replace(walsh_rope=False)).cuda()
    apart.load_state_dict(inside.state_dict())
    assert inside.blocks[0].attn.rope_inside and not apart.blocks[0].attn.rope_inside
    x = torch.randn(16, 1024, cfg.n_embd, device="cuda")
    g = torch.randn(16, 1024, cfg.n_embd, device="cuda")
    cos, sin = inside.rope_cos[:1024], inside.rope_sin[:1024]
    runs = []
    for model, compiled in ((apart, False), (inside, False), (inside, True)):
        attn = model.blocks[0].attn
        fn = torch.compile(attn) if compiled else attn
        runs.append((lambda xs, fn=fn: fn(xs, cos, sin), [attn]))
    assert_bf16_runs_agree(runs, x, [g], seed)
