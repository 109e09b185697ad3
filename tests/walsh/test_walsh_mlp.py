"""The Walsh MLP as one op (walsh.kernels.walsh_mlp) against its naive reference and against
the group op + the SwiGLU down op it replaces: forward and every gradient on odd sizes, fp32
(1e-5) and bf16 (1e-2, or 1.5x the naive bf16 run's error where that is larger: the three
rounded layers meet draws whose sums cancel) relative bounds, fresh random inputs (the seed is
in every failure message); the chained passes into NaN-poisoned buffers against the passes
apart; what autograd keeps; opcheck and compile; the model with and without it. On CPU under
TRITON_INTERPRET=1 (tests/conftest.py); the ``gpu`` test repeats it at the models' MLP
shapes, compiled.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    DEV,
    TOL,
    assert_bf16_runs_agree,
    assert_matches_naive,
    assert_models_agree,
    assert_ops_agree,
    rel_err,
    small_config,
)
from _helpers import run_with_grads as _run

pytest.importorskip("triton")
from walsh.kernels import walsh_launch  # noqa: E402
from walsh.kernels import walsh_mlp as wm  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.kernels.walsh_group import walsh_group  # noqa: E402
from walsh.kernels.walsh_swiglu import swiglu_linear, walsh_out_swiglu_gain_raw  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402
from walsh.layers.common import SwiGLU  # noqa: E402
from walsh.layers.hadamard import fuse_mlp, group_layers, run_by_parent  # noqa: E402


def _leaves(a, n, li, lh, lo, dtype, dev=DEV):
    """x and the three layers' (w, alpha, beta), each a leaf that requires grad: [x, w_g, w_u,
    w_d, alpha_g, alpha_u, alpha_d, beta_g, beta_u, beta_d]."""
    x = torch.randn(n, a * li, device=dev)
    ws = [torch.randn(a, lh, li, device=dev) * 2 / li**0.5 for _ in range(2)]  # silu's curve
    ws.append(torch.randn(a, lo, lh, device=dev) / lh**0.5)
    alphas = [1 + 0.3 * torch.randn(a, k, device=dev) for k in (li, li, lh)]
    betas = [1 + 0.3 * torch.randn(a, k, device=dev) for k in (lh, lh, lo)]
    return [t.to(dtype).requires_grad_() for t in (x, *ws, *alphas, *betas)]


def _split(fn):
    """fn(x, ws, alphas, betas) as a function of the ten leaves."""
    return lambda *t: fn(t[0], list(t[1:4]), list(t[4:7]), list(t[7:10]))


def _apart(x, ws, alphas, betas):
    """The two ops the MLP op replaces: the gate, up group, then down with the product inside."""
    gate, up = walsh_group(x, ws[:2], alphas[:2], betas[:2])
    return swiglu_linear(gate, up, ws[2], alphas[2], betas[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a,n,li,lh,lo", [(32, 37, 3, 5, 2), (4, 70, 5, 7, 3), (16, 9, 24, 64, 24),
                                          (4, 3, 6, 250, 5)])  # hidden rows of 256: chunks
def test_forward_and_grads_match_naive(dtype, a, n, li, lh, lo, seed):
    leaves = _leaves(a, n, li, lh, lo, dtype)
    grad = torch.randn(n, a * lo, device=DEV).to(dtype).float()
    assert_matches_naive(_split(wm.walsh_mlp), _split(wm.walsh_mlp_naive), leaves, grad, dtype,
                         seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_ops_apart(dtype, seed):
    """Against the group op and the SwiGLU down op: the same transforms and GEMMs, chained
    (fp32: bit-equal but for the sums' order, a tenth of the bound; bf16: dgate and dup not
    rounded between the passes, within the bf16 bound)."""
    leaves = _leaves(16, 45, 6, 10, 5, dtype)
    grad = torch.randn(45, 16 * 5, device=DEV).to(dtype).float()
    bound = TOL[dtype] / (10 if dtype == torch.float32 else 1)
    assert_ops_agree(_split(wm.walsh_mlp), _split(_apart), leaves, grad, bound, seed)


@pytest.mark.parametrize("a,n,lanes,width", [(32, 37, 24, 24), (4, 70, 5, 8), (4, 5, 86, 88),
                                             (4, 9, 64, 64), (4, 3, 172, 176),
                                             (2, 150, 172, 176), (4, 3, 250, 256),
                                             (4, 2, 300, 304)])
# the launch table's rows; the backward cuts 88, 176 and wider rows into 64-lane chunks; 150
# tokens at 176 lanes: 3 forward programs, 2 backward rows of partial sums times 3 chunks
def test_chained_passes_write_every_output(a, n, lanes, width, seed):
    """Into NaN-poisoned buffers (fp32): the forward chain equals the two walsh_out passes and
    walsh_in on silu(gate) * up (padding lanes zero); the backward chain equals the SwiGLU dx
    pass followed by the two walsh_in + dbeta passes."""
    y_g, y_u, du = (torch.randn(a, n, width, device=DEV) for _ in range(3))
    beta_g, beta_u, alpha_d = (1 + 0.3 * torch.randn(a, lanes, device=DEV) for _ in range(3))
    nan = lambda *s: torch.full(s, float("nan"), device=DEV)  # noqa: E731
    out = (nan(n, a * lanes), nan(n, a * lanes), nan(a, n, width))
    gate, up, u_d = wm.mlp_chain_fwd_raw(y_g, y_u, beta_g, beta_u, alpha_d, lanes, out=out)
    assert all(t is o for t, o in zip((gate, up, u_d), out))
    want_gate = wt.walsh_out_raw(y_g, beta_g, a, lanes=lanes)
    want_up = wt.walsh_out_raw(y_u, beta_u, a, lanes=lanes)
    assert rel_err(gate, want_gate) < 1e-6 and rel_err(up, want_up) < 1e-6, seed
    assert rel_err(u_d, wt.walsh_in_raw(gate, alpha_d, a, width=width, up=up)) < 1e-6, seed
    assert torch.all(u_d[..., lanes:] == 0), seed
    dys = (nan(a, n, width), nan(a, n, width))
    dy_g, dy_u, dalpha_d, dbeta_g, dbeta_u = wm.mlp_chain_bwd_raw(du, gate, up, beta_g, beta_u,
                                                                  alpha_d, out=dys)
    dgate, dup, want_dalpha = walsh_out_swiglu_gain_raw(du, alpha_d, gate, up)
    want_g, want_bg = wt.walsh_in_gain_raw(dgate, beta_g, gate, a, width=width)
    want_u, want_bu = wt.walsh_in_gain_raw(dup, beta_u, up, a, width=width)
    for k, (got, want) in enumerate(((dy_g, want_g), (dy_u, want_u), (dalpha_d, want_dalpha),
                                     (dbeta_g, want_bg), (dbeta_u, want_bu))):
        assert rel_err(got, want) < 1e-6, (k, seed)
    assert torch.all(dy_g[..., lanes:] == 0) and torch.all(dy_u[..., lanes:] == 0), seed


@pytest.mark.parametrize("a,n,lanes,width", [(32, 5, 172, 176), (32, 9, 64, 64)])
def test_chained_passes_by_butterflies_equal_the_dot(a, n, lanes, width, seed):
    """The chained passes at A = 32 on rows the rule gives the dot (the 1.3B's 172 and 64
    lanes), forced to butterflies (``walsh_launch.transform_mix``, as ``--transform-mix``
    times them), against the same passes on the dot (fp32: the dot's IEEE products and the
    butterflies' adds differ in their last bits only)."""
    y_g, y_u, du = (torch.randn(a, n, width, device=DEV) for _ in range(3))
    gains = [1 + 0.3 * torch.randn(a, lanes, device=DEV) for _ in range(3)]
    runs = {}
    for mix in ("dot", "butterflies"):
        with walsh_launch.transform_mix(mix):
            assert walsh_launch.use_dot(a, lanes) == (mix == "dot")
            gate, up, u_d = wm.mlp_chain_fwd_raw(y_g, y_u, *gains, lanes)
            runs[mix] = (gate, up, u_d, *wm.mlp_chain_bwd_raw(du, gate, up, *gains))
    for k, (got, want) in enumerate(zip(runs["butterflies"], runs["dot"])):
        assert rel_err(got, want) < 1e-6, (k, seed)


def test_chain_launch_rule():
    """(lanes per chunk, tokens per slab, warps, stages, tokens per program) by width: the
    backward in 64-lane chunks of one token past 64 lanes (88 too, which ``_slab`` alone would
    make one 128-lane slab), the forward's slabs as ``_slab`` makes them, each program looping
    over several (``MLP_CHAIN``, session 29's sweeps)."""
    from walsh.kernels.walsh_launch import mlp_chain_params

    got = {(fwd, w): mlp_chain_params(fwd, w) for fwd in (True, False) for w in (24, 64, 88, 176)}
    assert got == {(True, 24): (32, 4, 8, 3, 64), (True, 64): (64, 2, 8, 3, 64),
                   (True, 88): (128, 1, 4, 3, 16), (True, 176): (256, 1, 8, 3, 64),
                   (False, 24): (32, 2, 4, 4, 64), (False, 64): (64, 1, 4, 4, 64),
                   (False, 88): (64, 1, 8, 3, 256), (False, 176): (64, 1, 8, 4, 128)}


def test_a_given_launch_overrides_the_table(seed):
    """``launch`` (``walsh bench launch``'s sweep) replaces the table's: a program covering 1
    or 3 tokens writes a partial-sum row per 1 or 3 tokens (the table's covers 64), lane
    chunks of 16 cover a 20-lane row in two programs, and every result equals the table's;
    chunks or slabs that are not powers of two are refused."""
    a, n, lanes, width = 4, 7, 20, 24
    du = torch.randn(a, n, width, device=DEV)
    gate, up = (torch.randn(n, a * lanes, device=DEV) for _ in range(2))
    gains = [1 + 0.3 * torch.randn(a, lanes, device=DEV) for _ in range(3)]
    want = wm._chain(False, du, None, gate, up, *gains)
    assert want[2].shape == (1, 3 * a * lanes)  # one program: 64 tokens a program
    for launch, rows in (((16, 1, 4, 0, 1), n), ((32, 1, 4, 0, 3), 3)):
        got = wm._chain(False, du, None, gate, up, *gains, launch=launch)
        assert got[2].shape == (rows, 3 * a * lanes), launch
        assert rel_err(got[2].sum(0), want[2].sum(0)) < 1e-6, (launch, seed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (launch, seed)
    with pytest.raises(ValueError, match="powers of two, got 24 and 1"):
        wm._chain(False, du, None, gate, up, *gains, launch=(24, 1, 4, 0, 1))


def test_saves_what_the_ops_apart_saved():
    """For its backward, autograd keeps x, u, gate, up, u_d and the output (the group op and
    the down op kept the same): no h, dgate or dup of the hidden size."""
    a, n, li, lh, lo = 8, 11, 5, 7, 3
    leaves = _leaves(a, n, li, lh, lo, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _split(wm.walsh_mlp)(*leaves)
    assert out.data_ptr() in {t.data_ptr() for t in saved}
    params = {t.data_ptr() for t in leaves[1:]}  # the weights and gains, saved as they are
    big = sorted(t.numel() for t in saved if t.data_ptr() not in params)
    # x, gate, up, u [2, A, N, 8], u_d [A, N, 8], out
    assert big == sorted([n * a * li, n * a * lh, n * a * lh, 2 * a * n * 8, a * n * 8,
                          n * a * lo])


def test_ops_pass_opcheck_and_compile(seed):
    """torch.library.opcheck on the forward and backward ops, and the compiled op (fullgraph)
    with its backward equal to eager."""
    leaves = _leaves(8, 6, 5, 7, 3, torch.float32)
    plain = [t.detach() for t in leaves]
    args = (plain[0], plain[1:4], plain[4:7], plain[7:10])
    torch.library.opcheck(torch.ops.walsh.walsh_mlp.default, args)
    out, gate, up, u, u_d = wm.mlp_forward(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.walsh.walsh_mlp_backward.default,
                          (dout, *args, u, u_d, gate, up, out))
    results = []
    for fn in (wm.walsh_mlp, torch.compile(wm.walsh_mlp, fullgraph=True, backend="aot_eager")):
        got = _run(_split(fn), leaves, dout)
        results.append([got[0], *got[1]])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled), seed


def test_rejects_bad_inputs():
    leaves = _leaves(4, 3, 5, 6, 2, torch.float32)
    x, ws, als, bes = leaves[0], leaves[1:4], leaves[4:7], leaves[7:10]
    with pytest.raises(ValueError, match="down's w, alpha, beta"):
        wm.walsh_mlp(x, ws, als, [*bes[:2], bes[2][:, :1]])
    with pytest.raises(ValueError, match="gate's w, alpha, beta"):
        wm.walsh_mlp(x[:, :8], ws, als, bes)
    with pytest.raises(ValueError, match="up's alpha dtype"):
        wm.walsh_mlp(x, ws, [als[0], als[1].double(), als[2]], bes)
    with pytest.raises(ValueError, match="three layers"):
        wm.walsh_mlp(x, ws[:2], als[:2], bes[:2])
    y = torch.randn(4, 3, 8)
    gate = torch.randn(3, 24)
    with pytest.raises(ValueError, match="gate must be a contiguous"):
        wm.mlp_chain_bwd_raw(y, gate[:, :12], gate[:, :12], *(torch.ones(4, 6),) * 3)
    with pytest.raises(ValueError, match="out must be 2 contiguous"):
        wm.mlp_chain_bwd_raw(y, gate, gate, *(torch.ones(4, 6),) * 3, out=(y,))


def _make(impl="triton", **kw):
    return lambda i, o, **k: WalshLinear(i, o, blocks=4, impl=impl, **kw, **k)


def test_fuse_mlp_marks_only_a_grouped_mlp_with_the_product_inside():
    """The MLP runs as one op only where gate, up are a group, down computes the product
    inside, and no layer has a bias; its layers are then run by their parent, and say so."""
    cases = {"all": dict(group=True, fuse=True), "no group": dict(group=False, fuse=True),
             "apart": dict(group=True, fuse=False)}
    marked = {k: SwiGLU(_make(), 32, 64, 1.0, one_op=True, **kw).one_op
              for k, kw in cases.items()}
    assert marked == {"all": True, "no group": False, "apart": False}
    assert not SwiGLU(_make(bias=True), 32, 64, 1.0, group=True, fuse=True, one_op=True).one_op
    assert not SwiGLU(_make("blocks"), 32, 64, 1.0, group=True, fuse=True, one_op=True).one_op
    mlp = SwiGLU(_make(), 32, 64, 1.0, group=True, fuse=True, one_op=True)
    assert all(m.in_mlp and run_by_parent(m) for m in (mlp.gate, mlp.up, mlp.down))
    assert "(the MLP as one op)" in mlp.down.path()
    gate, up, down = (WalshLinear(32, 64, blocks=4, impl="triton") for _ in range(3))
    group_layers([gate, up])
    assert not fuse_mlp(gate, up, down)  # down does not compute the product inside


def test_the_one_op_stops_past_max_lanes():
    """Hidden rows past ``MLP_MAX_LANES`` (176) and a down projection of another block count
    keep the two ops; the three presets take the one op (the 1.3B's 172 lanes since session
    29's chunked backward)."""
    from walsh.kernels.walsh_launch import MLP_MAX_LANES
    from walsh.models import WalshLM
    from walsh.models.presets import get_preset

    wide = SwiGLU(_make(), 32, 4 * (MLP_MAX_LANES + 8), 1.0, group=True, fuse=True, one_op=True)
    assert not wide.one_op and not any(m.in_mlp for m in (wide.gate, wide.up, wide.down))
    edge = SwiGLU(_make(), 32, 4 * MLP_MAX_LANES, 1.0, group=True, fuse=True, one_op=True)
    assert edge.one_op
    gate, up = (WalshLinear(32, 64, blocks=4, impl="triton") for _ in range(2))
    down = WalshLinear(64, 32, blocks=8, impl="triton")
    group_layers([gate, up])
    down.swiglu_input = True
    assert not fuse_mlp(gate, up, down)  # 8 blocks against 4: the op's shapes do not fit
    for name, one_op in (("125m", True), ("350m", True), ("1b3", True)):
        with torch.device("meta"):
            model = WalshLM(get_preset(f"walsh-h-{name}", walsh_impl="triton", n_layer=1))
        assert model.blocks[0].mlp.one_op == one_op, name


def test_empty_input_and_dead_gain_lanes(seed):
    """No tokens: an empty output and zero gradients. Lanes of beta_g, beta_u exactly 0 (gate
    and up are 0 there, no z to recover): the same results as the two ops, dbeta 0 there."""
    leaves = _leaves(4, 0, 5, 6, 3, torch.float32)
    out, got = _run(_split(wm.walsh_mlp), leaves, torch.zeros(0, 12, device=DEV))
    assert out.shape == (0, 12) and all(torch.all(g == 0) for g in got[1:])
    leaves = _leaves(4, 21, 5, 6, 3, torch.float32)
    with torch.no_grad():
        leaves[7][1, 2] = leaves[8][3, 0] = 0.0  # beta_g, beta_u
    grad = torch.randn(21, 12, device=DEV)
    assert_ops_agree(_split(wm.walsh_mlp), _split(_apart), leaves, grad, 1e-6, seed)
    got = _run(_split(wm.walsh_mlp), leaves, grad)[1]
    assert got[7][1, 2] == 0 and got[8][3, 0] == 0, seed


def test_mlp_module_is_per_token():
    """The MLP mixes no tokens: a change at one position changes that position's output
    only (the chained passes' token tiles must not leak)."""
    mlp = SwiGLU(_make(), 32, 64, 1.0, group=True, fuse=True, one_op=True).to(DEV)
    assert mlp.one_op
    x = torch.randn(3, 9, 32, device=DEV)
    y = x.clone()
    y[1, 4] += 1.0
    diff = (mlp(x) - mlp(y)).abs().amax(-1)  # [3, 9]
    assert diff[1, 4] > 0 and diff.sum() == diff[1, 4]


def test_model_with_and_without_the_one_op(seed):
    """walsh_mlp on and off: the same loss and gradients (fp32); the one-op run's paths say so."""
    from walsh.models import WalshLM

    cfg = small_config(n_embd=64, algebra="walsh", algebra_dim=4, walsh_impl="triton",
                       ternary=True)
    one = WalshLM(cfg).to(DEV)
    apart = WalshLM(cfg.replace(walsh_mlp=False)).to(DEV)
    assert "2 x WalshLinear: walsh_impl=triton (silu(gate) * up inside) (the MLP as one op)" \
        in one.linear_paths()
    assert "one op" not in apart.linear_paths()
    assert_models_agree(one, apart, seed)


# -- full shapes on the GPU -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("c,hidden", [(2048, 5504), (1024, 2752), (768, 2048)])
def test_full_shape_compiled_cuda(c, hidden, seed):
    """At 16k tokens, bf16: the MLP as one op (eager and compiled) against the two ops apart
    at the three presets' shapes (the 1.3B's 172-lane rows padded to 176, the 350M's 86 to 88,
    the 125M's 64: each width has its own launch, ``walsh_launch.MLP_CHAIN``)."""
    make = lambda i, o, **kw: WalshLinear(i, o, blocks=32, impl="triton", ternary=True, **kw)
    ref = SwiGLU(make, c, hidden, 1.0, group=True, fuse=True).cuda()
    mlp = SwiGLU(make, c, hidden, 1.0, group=True, fuse=True, one_op=True).cuda()
    assert mlp.one_op and not ref.one_op
    mlp.load_state_dict(ref.state_dict())
    x = torch.randn(16, 1024, c, device="cuda")
    g = torch.randn(16, 1024, c, device="cuda")
    assert_bf16_runs_agree([(ref, [ref]), (mlp, [mlp]), (torch.compile(mlp), [mlp])], x, [g],
                           seed)
