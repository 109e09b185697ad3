"""The Walsh-Hadamard block transforms (walsh.kernels.walsh_transform) against their naive
references, alone and with their gains' gradients; launch settings; padded rows; the ops.

The bounds and conventions: ``TOL`` and ``DEV`` in tests/_helpers.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _helpers import DEV, TOL, assert_rounded_once, rel_err

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from walsh.kernels import walsh_launch as wl  # noqa: E402
from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.kernels.bf16_round import _bf16_values  # noqa: E402
from walsh.kernels.column_sum import column_sum  # noqa: E402

# -- Walsh-Hadamard transforms ----------------------------------------------------------------
# Every case has >= 16 gain entries: a gain's gradient is a sum over tokens, and with a handful
# of entries its norm is small often enough (a chi-square tail: 4.5% of draws at 2 entries) for
# bf16's per-term rounding to exceed 1e-2 of it.
# (A, N, lanes): tiles of many tokens (few lanes), of two (33 lanes -> 64 padded) and of one
# token in two chunks of 128 lanes (130 lanes), N not a multiple of the tokens per tile; and
# the presets' 24 lanes (padded to 32), 40 (64), 96 (128), 136 and 172 (the 1.3B FFN; two
# chunks of 128)
GRID = [(32, 5, 3), (16, 9, 2), (8, 7, 5), (4, 66, 4), (2, 3, 9), (32, 4, 1), (32, 1, 24),
        (32, 7, 33), (2, 5, 130), (16, 3, 130), (32, 7, 24), (4, 11, 40), (16, 9, 96),
        (2, 5, 136), (8, 5, 172)]


# which: (fused op, raw launcher, naive reference, input shape for (a, n, lanes))
TRANSFORMS = {
    "walsh_in": (wt.walsh_in, wt.walsh_in_raw, wt.walsh_in_naive,
                 lambda a, n, lanes: ((n, a * lanes), (a, n, lanes))),
    "walsh_out": (wt.walsh_out, wt.walsh_out_raw, wt.walsh_out_naive,
                  lambda a, n, lanes: ((a, n, lanes), (n, a * lanes))),
}


@pytest.mark.parametrize("which", list(TRANSFORMS))
@pytest.mark.parametrize("a,n,lanes", GRID)
# on rows wider than BUTTERFLY_MAX_LANES (and A >= 16) fp16 takes the transforms' TF32 dot,
# bf16 the bf16 dot, fp32 the IEEE dot; narrower rows the butterflies
# (test_walsh_transform_butterflies_and_dot_agree forces each path at the other's width)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_walsh_transform_forward_and_grads(which, a, n, lanes, dtype, seed):
    op, raw_op, naive, shapes = TRANSFORMS[which]
    in_shape, out_shape = shapes(a, n, lanes)
    x = torch.randn(in_shape, device=DEV, dtype=dtype, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(dtype).requires_grad_()
    xr, gr = (t.detach().float().requires_grad_() for t in (x, gain))
    poisoned = torch.full(out_shape, float("nan"), device=DEV, dtype=dtype)
    raw = raw_op(x.detach(), gain.detach(), a, out=poisoned)
    out, ref = op(x, gain), naive(xr, gr)
    assert rel_err(raw, ref) < TOL[dtype] and rel_err(out, ref) < TOL[dtype], seed
    g = torch.randn_like(ref).to(dtype).float()  # a bf16 output's upstream gradient is bf16
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    assert rel_err(x.grad, xr.grad) < TOL[dtype], seed
    assert rel_err(gain.grad, gr.grad) < TOL[dtype], seed


@pytest.mark.parametrize("which", ["walsh_in", "walsh_out"])
@pytest.mark.parametrize("a,n,lanes,tokens", [(2, 1, 1, 16), (4, 37, 25, 128),
                                              (32, 2500, 3, 16), (8, 1030, 7, 64),
                                              (16, 3, 130, 16), (32, 7, 33, 2),
                                              (16, 100, 130, 16), (4, 0, 5, 16),
                                              (32, 300, 24, 64), (4, 37, 40, 16),
                                              (16, 50, 96, 8), (8, 21, 136, 16),
                                              (32, 40, 172, 16), (4, 37, 256, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walsh_transform_with_gain_grad(which, a, n, lanes, tokens, dtype, seed, monkeypatch):
    """The backward passes: a transform plus a gain's gradient in one kernel, against the naive
    transform and gain_grad_naive in fp32: walsh_in + sum_i T * F / gain (both token-major:
    dout and the forward's out F = beta * z; lanes whose gain is exactly 0 get exactly 0),
    walsh_out + sum_i T * (S H Y) (T token-major, Y block-major). ``tokens`` (per program,
    GAIN_TOKENS and GAIN_NARROW_TOKENS) makes programs loop over several token slabs, ragged at
    the end (37 tokens in slabs of 4, 1030 in slabs of 16), or over one; 256 lanes are two
    chunks of walsh_in's 128-lane tile (each chunk divides its own lanes' shares by beta)."""
    monkeypatch.setattr(wl, "GAIN_TOKENS", tokens)
    monkeypatch.setattr(wl, "GAIN_NARROW_TOKENS", tokens)  # one layer's dx pass, <= 24 lanes
    tok = torch.randn(n, a * lanes, device=DEV, dtype=dtype)      # token-major: dout or x
    blk = torch.randn(a, n, lanes, device=DEV, dtype=dtype)       # block-major: du
    gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(dtype)
    ones = torch.ones(a, lanes, device=DEV)
    if which == "walsh_in":  # dy = S H (beta dout), dbeta = sum dout * out / beta
        gain[-1, 0] = 0.0  # no z to recover from out there: dbeta 0
        fwd = torch.randn(n, a * lanes, device=DEV, dtype=dtype)  # the forward's out
        gf = gain.float()
        z = torch.where(gf != 0, fwd.float().view(n, a, lanes) / gf, 0.0).view(n, a * lanes)
        gain_ref = wt.gain_grad_naive(tok.float(), z, a)
        poisoned = torch.full((a, n, lanes), float("nan"), device=DEV, dtype=dtype)
        out, g = wt.walsh_in_gain_raw(tok, gain, fwd, a, out=poisoned)
        assert g[-1, 0] == 0
        ref = wt.walsh_in_naive(tok.float(), gain.float())
    else:  # dx = alpha * S H du, dalpha = sum x * S H du
        gain_ref = wt.gain_grad_naive(tok.float(), wt.walsh_out_naive(blk.float(), ones), a)
        poisoned = torch.full((n, a * lanes), float("nan"), device=DEV, dtype=dtype)
        out, g = wt.walsh_out_gain_raw(blk, gain, tok, a, out=poisoned)
        ref = wt.walsh_out_naive(blk.float(), gain.float())
    assert out is poisoned and (n == 0 or rel_err(out, ref) < TOL[dtype]), seed
    # the same inputs (bf16 values are exact in fp32 and TF32), fp32 sums either way
    assert g.shape == (a, lanes) and g.dtype == torch.float32
    # summed=False (a backward op sums its tables in one launch): the table gives g exactly
    table = (wt.walsh_in_gain_raw(tok, gain, fwd, a, summed=False) if which == "walsh_in"
             else wt.walsh_out_gain_raw(blk, gain, tok, a, summed=False))[1]
    assert torch.equal(column_sum(table).view(a, lanes), g), seed
    if n == 0:  # no tokens: a zero gradient, not the empty buffer's contents
        assert torch.equal(g, torch.zeros_like(g))
    else:
        assert rel_err(g, gain_ref) < 1e-5, seed
    with pytest.raises(ValueError, match="other operand"):  # not token-major [N, A*L]
        wt.walsh_in_gain_raw(tok, gain, blk, a) if which == "walsh_in" else \
            wt.walsh_out_gain_raw(blk, gain, blk, a)


@pytest.mark.parametrize("one_kernel", [None, False, True])  # None: the walsh_out op alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walsh_ops_save_out_for_dbeta(one_kernel, dtype, seed):
    """dbeta = sum dout * out / beta from the op's own output: autograd keeps that very tensor
    (nothing of its size beside it but the three-kernel path's u; the one-kernel path keeps
    neither); lanes whose beta is exactly 0 get dbeta 0 (module doc of walsh_transform), the
    others and every other gradient match the naive path; an in-place change of the saved out
    makes the backward raise instead of using it."""
    a, n, li, lo = 16, 9, 5, 7
    beta = (1 + 0.3 * torch.randn(a, lo, device=DEV)).to(dtype)
    beta[0, 0] = beta[5, 6] = 0.0
    dead = beta == 0
    if one_kernel is None:
        inputs = [torch.randn(a, n, lo, device=DEV, dtype=dtype), beta]  # y, beta
        op, naive = wt.walsh_out, wt.walsh_out_naive
    else:
        inputs = [torch.randn(n, a * li, device=DEV, dtype=dtype),
                  (torch.randn(a, lo, li, device=DEV) / li**0.5).to(dtype),
                  (1 + 0.3 * torch.randn(a, li, device=DEV)).to(dtype), beta]
        op = functools.partial(wf.walsh_linear, one_kernel=one_kernel)
        naive = wf.walsh_linear_naive
    inputs = [t.requires_grad_() for t in inputs]
    refs = [t.detach().float().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = op(*inputs)
    numels = sorted(t.numel() for t in saved)
    if one_kernel is None:  # out and beta; y is not kept
        assert numels == sorted([out.numel(), beta.numel()])
    elif not one_kernel:  # x, w, alpha, beta, u [A, N, 8 lanes] and out
        assert numels == sorted([t.numel() for t in inputs] + [a * n * 8, out.numel()])
    else:  # x, w, alpha, beta and two empties
        assert numels == sorted([t.numel() for t in inputs] + [0, 0])
    assert any(t.data_ptr() == out.data_ptr() for t in saved) == (one_kernel is not True)
    g = torch.randn(out.shape, device=DEV).to(dtype).float()
    (out.float() * g).sum().backward()
    (naive(*refs) * g).sum().backward()
    for t, r in zip(inputs[:-1], refs[:-1]):
        assert rel_err(t.grad, r.grad) < TOL[dtype], seed
    db, db_ref = inputs[-1].grad, refs[-1].grad
    if one_kernel:  # recomputed from x: exact at beta = 0 too
        assert rel_err(db, db_ref) < TOL[dtype], seed
    else:
        assert torch.equal(db[dead], torch.zeros_like(db[dead]))
        assert rel_err(db[~dead], db_ref[~dead]) < TOL[dtype], seed
        changed = op(*inputs)
        changed.mul_(2)  # the saved out changed in place: autograd refuses, loudly
        with pytest.raises(RuntimeError, match="inplace operation"):
            changed.sum().backward()


@pytest.mark.parametrize("setting", [(wt, "WIDE_NUMEL", 1), (wl, "OUT_TILE", 64),
                                     (wl, "IN_TILE", 256), (wl, "OUT_NARROW_LANES", 0),
                                     (wl, "GAIN_NARROW_LANES", 0)])
@pytest.mark.parametrize("a,n,lanes", [(32, 37, 24), (16, 5, 130), (4, 70, 3)])
def test_walsh_transform_launch_settings_bit_equal(setting, a, n, lanes, seed, monkeypatch):
    """Settings that change how, not what, the kernels compute give bit-equal outputs: int64
    offsets (taken by tensors of 2**31 elements or more, WIDE_NUMEL; also bit-equal partial
    sums) and each transform's tile (chunks of a token's lanes, tokens per slab)."""
    tok = torch.randn(n, a * lanes, device=DEV, dtype=torch.bfloat16)
    blk = torch.randn(a, n, lanes, device=DEV, dtype=torch.bfloat16)
    gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(torch.bfloat16)
    calls = [lambda: (wt.walsh_in_raw(tok, gain, a),), lambda: (wt.walsh_out_raw(blk, gain, a),),
             lambda: wt.walsh_in_gain_raw(tok, gain, tok.flip(0), a),
             lambda: wt.walsh_out_gain_raw(blk, gain, tok, a)]
    before = [call() for call in calls]
    monkeypatch.setattr(*setting)
    for call, ref in zip(calls, before):
        got = call()
        assert torch.equal(got[0], ref[0]), seed
        if len(ref) > 1:  # the partial sums: other shares per program with another tile
            assert rel_err(got[1], ref[1]) < 1e-6, seed


@pytest.mark.parametrize("a,n,lanes", [(32, 9, 5), (16, 7, 172), (4, 11, 86), (8, 6, 16)])
def test_walsh_transform_padded_rows(a, n, lanes, seed):
    """Block-major rows wider than the lanes (``row_width``: 16-byte rows for cuBLAS): walsh_in
    (and walsh_in + dbeta) writes zeros past L; walsh_out and walsh_out + dalpha read NaN there
    (the padding is read as 16-byte runs), which reaches none of their results; and
    every result is bit-equal to the unpadded one (the gains' fp32 sums to 1e-6: a wider row
    can change the tokens per program, so the sums' grouping)."""
    width = wt.row_width(lanes) if lanes % 8 else lanes + 8
    tok = torch.randn(n, a * lanes, device=DEV, dtype=torch.bfloat16)
    blk = torch.randn(a, n, lanes, device=DEV, dtype=torch.bfloat16)
    wide = torch.full((a, n, width), float("nan"), device=DEV, dtype=torch.bfloat16)
    wide[:, :, :lanes] = blk
    gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(torch.bfloat16)
    poisoned = torch.full((a, n, width), float("nan"), device=DEV, dtype=torch.bfloat16)
    u = wt.walsh_in_raw(tok, gain, a, out=poisoned, width=width)
    assert torch.equal(u[:, :, :lanes], wt.walsh_in_raw(tok, gain, a)), seed
    assert torch.equal(u[:, :, lanes:], torch.zeros_like(u[:, :, lanes:]))
    out = wt.walsh_out_raw(wide, gain, a, lanes=lanes)
    assert torch.equal(out, wt.walsh_out_raw(blk, gain, a)), seed
    poisoned = torch.full((a, n, width), float("nan"), device=DEV, dtype=torch.bfloat16)
    fwd = tok.flip(0)  # any token-major tensor (the forward's out)
    dy, dbeta = wt.walsh_in_gain_raw(tok, gain, fwd, a, out=poisoned, width=width)
    dy0, dbeta0 = wt.walsh_in_gain_raw(tok, gain, fwd, a)
    assert dy.shape == (a, n, width) and torch.equal(dy[:, :, :lanes], dy0), seed
    assert torch.equal(dy[:, :, lanes:], torch.zeros_like(dy[:, :, lanes:]))
    assert rel_err(dbeta, dbeta0) < 1e-6, seed
    dx, dalpha = wt.walsh_out_gain_raw(wide, gain, tok, a)
    dx0, dalpha0 = wt.walsh_out_gain_raw(blk, gain, tok, a)
    assert torch.equal(dx, dx0) and rel_err(dalpha, dalpha0) < 1e-6, seed
    with pytest.raises(ValueError, match="cannot hold"):
        wt.walsh_in_raw(tok, gain, a, width=lanes - 1)
    with pytest.raises(ValueError, match="the gain must be"):  # a gain of the row width
        wt.walsh_out_raw(wide, torch.ones(a, width, device=DEV, dtype=torch.bfloat16), a,
                         lanes=lanes)


@pytest.mark.parametrize("setting", [(wl, "OUT_TILE", 64), (wt, "WIDE_NUMEL", 1)])
@pytest.mark.parametrize("a,n,lanes", [(16, 5, 130)])  # A >= 16: the tensor-core dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walsh_out_padded_rows_chunks_and_wide(setting, a, n, lanes, dtype, seed, monkeypatch):
    """walsh_out and walsh_out + dalpha from NaN-padded rows (136 lanes for 130)
    read in several chunks of lanes (OUT_TILE 64: three chunks, the last one's lanes 130-135
    NaN) or with int64 offsets: bit-equal to unpadded rows under the same setting."""
    monkeypatch.setattr(*setting)
    width = wt.row_width(lanes)
    blk = torch.randn(a, n, lanes, device=DEV, dtype=dtype)
    wide = torch.full((a, n, width), float("nan"), device=DEV, dtype=dtype)
    wide[:, :, :lanes] = blk
    tok = torch.randn(n, a * lanes, device=DEV, dtype=dtype)
    gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(dtype)
    out = wt.walsh_out_raw(wide, gain, a, lanes=lanes)
    assert torch.equal(out, wt.walsh_out_raw(blk, gain, a)), seed
    dx, dalpha = wt.walsh_out_gain_raw(wide, gain, tok, a)
    dx0, dalpha0 = wt.walsh_out_gain_raw(blk, gain, tok, a)
    assert torch.equal(dx, dx0) and rel_err(dalpha, dalpha0) < 1e-6, seed


@pytest.mark.parametrize("a,n,lanes", [(32, 37, 24), (8, 20, 7), (16, 9, 40)])
def test_walsh_transform_bf16_results_rounded_once(a, n, lanes, seed):
    """Without a gain a pass's bf16 result is the exact transform of bf16 values rounded once,
    to nearest: no further from it than its own rounding (a truncating cast, the Triton
    interpreter's, is ~2x further; ``_stored``). walsh_in, walsh_out and a dx pass's output;
    A = 8 and A = 32 at 24 lanes mix by butterflies, A = 16 at 40 lanes by the dot."""
    ones = torch.ones(a, lanes, dtype=torch.float64, device=DEV)
    tok = torch.randn(n, a * lanes, device=DEV).to(torch.bfloat16)
    blk = torch.randn(a, n, lanes, device=DEV).to(torch.bfloat16)
    out_ref = wt.walsh_out_naive(blk.double(), ones)
    for got, want in ((wt.walsh_in_raw(tok, None, a), wt.walsh_in_naive(tok.double(), ones)),
                      (wt.walsh_out_raw(blk, None, a), out_ref),
                      (wt.walsh_out_gain_raw(blk, None, tok, a)[0], out_ref)):
        assert got.dtype == torch.bfloat16
        assert_rounded_once(got, want, seed)


@pytest.mark.parametrize("a,n,lanes", [(32, 37, 24), (16, 9, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walsh_transform_butterflies_and_dot_agree(a, n, lanes, dtype, seed):
    """Both ways of mixing the blocks (``walsh_launch.use_dot``: butterflies on rows of at
    most BUTTERFLY_MAX_LANES lanes, the dot on wider ones), each forced at the other's width
    (``walsh_launch.transform_mix``): walsh_in and walsh_out with their input and gain
    gradients against the naive reference."""
    assert wl.use_dot(a, lanes) == (lanes > wl.BUTTERFLY_MAX_LANES)
    for mix in ("dot", "butterflies"):  # every row by the dot, every row by butterflies
        with wl.transform_mix(mix):
            assert wl.use_dot(a, lanes) == (mix == "dot")
            for which in TRANSFORMS:
                op, _, naive, shapes = TRANSFORMS[which]
                in_shape, _ = shapes(a, n, lanes)
                x = torch.randn(in_shape, device=DEV).to(dtype).requires_grad_()
                gain = (1 + 0.3 * torch.randn(a, lanes, device=DEV)).to(dtype).requires_grad_()
                xr, gr = (t.detach().float().requires_grad_() for t in (x, gain))
                out, ref = op(x, gain), naive(xr, gr)
                assert rel_err(out, ref) < TOL[dtype], (which, mix, seed)
                g = torch.randn_like(ref).to(dtype).float()
                (out.float() * g).sum().backward()
                (ref * g).sum().backward()
                assert rel_err(x.grad, xr.grad) < TOL[dtype], (which, mix, seed)
                assert rel_err(gain.grad, gr.grad) < TOL[dtype], (which, mix, seed)


def test_transform_mix_forces_one_way_and_restores_the_rule():
    """``walsh_launch.transform_mix`` (``walsh bench layer / train --transform-mix``): inside,
    every width takes the dot (A >= 16) or butterflies (A up to BUTTERFLY_MAX_BLOCKS); on the
    way out, by an error too, the rule is back; an unknown mix is named."""
    rule = {(a, lanes): wl.use_dot(a, lanes) for a in (4, 32, 512) for lanes in (24, 64, 172)}
    assert not rule[32, 24] and rule[32, 64] and rule[32, 172] and not rule[4, 172]
    with wl.transform_mix("dot"):
        assert all(wl.use_dot(a, lanes) == (a >= 16) for a, lanes in rule)
    with wl.transform_mix("rule"):
        assert {k: wl.use_dot(*k) for k in rule} == rule
    with pytest.raises(RuntimeError, match="inside"), wl.transform_mix("butterflies"):
        assert all(wl.use_dot(a, lanes) == (a > wl.BUTTERFLY_MAX_BLOCKS) for a, lanes in rule)
        raise RuntimeError("inside")
    assert {k: wl.use_dot(*k) for k in rule} == rule
    with pytest.raises(ValueError, match="'wide'"), wl.transform_mix("wide"):
        pass


def test_walsh_transform_slab_rule():
    """(lanes per chunk, tokens per slab): whole tokens of next_pow2 lanes, chunks of the tile
    past it, and one two-tile chunk for a token of between one and two tiles' lanes that is no
    whole number of tiles (the 1.3B FFN's 172 lanes: 256, not 128 + 44)."""
    got = {(lanes, tile): wl._slab(lanes, tile) for lanes, tile in
           [(1, 128), (24, 128), (64, 128), (86, 128), (172, 128), (256, 128), (300, 128),
            (24, 256), (172, 256), (300, 256), (600, 256)]}
    assert got == {(1, 128): (1, 128), (24, 128): (32, 4), (64, 128): (64, 2),
                   (86, 128): (128, 1), (172, 128): (256, 1), (256, 128): (128, 1),
                   (300, 128): (128, 1), (24, 256): (32, 8), (172, 256): (256, 1),
                   (300, 256): (256, 1), (600, 256): (256, 1)}


def test_walsh_transform_rope_backward_stages():
    """walsh_in + dbeta with RoPE takes ROPE_NARROW_STAGES on rows of at most
    ROPE_NARROW_LANES lanes (24), GAIN_STAGES past them (32, 64) and without RoPE; the
    other passes' launch does not depend on RoPE."""
    def stages(width, rope, in_mode=True, gain=True):
        return wl._launch_params(in_mode, 1, width, gain, False, rope)[3]

    narrow, default = wl.ROPE_NARROW_STAGES, wl.GAIN_STAGES[True]
    assert narrow != default  # else this test could not tell the two apart
    assert [stages(w, True) for w in (24, 32, 64)] == [narrow, default, default]
    assert [stages(w, False) for w in (24, 32, 64)] == [default] * 3
    assert stages(24, True, in_mode=False, gain=False) == stages(24, False, False, False)
    assert stages(24, True, gain=False) == stages(24, False, gain=False)


def test_walsh_transform_narrow_out_tile():
    """One layer's walsh_out takes OUT_NARROW_TILE on rows of at most OUT_NARROW_LANES lanes
    (24 and 32: 4 tokens of 32 lanes a slab), its dx + dalpha pass that tile and
    GAIN_NARROW_TOKENS tokens a program on rows of at most GAIN_NARROW_LANES (24; 32 lanes take
    OUT_TILE's 8 tokens a slab and GAIN_TOKENS); OUT_TILE and GAIN_TOKENS past them (64: 4
    tokens of 64); walsh_in, a group's dx pass and SwiGLU's keep theirs."""
    def launch(width, in_mode=False, gain=False, group=1, swiglu=False):
        lb, bt, _, _, tokens = wl._launch_params(in_mode, group, width, gain, swiglu)
        return lb, bt, tokens

    narrow, default = wl.GAIN_NARROW_TOKENS, wl.GAIN_TOKENS
    assert wl.OUT_NARROW_TILE != wl.OUT_TILE and narrow != default  # else this test could
    # not tell them apart
    assert [launch(w)[:2] for w in (24, 32, 64)] == [(32, 4), (32, 4), (64, 4)]
    assert [launch(w, gain=True) for w in (24, 32, 64)] == [(32, 4, narrow), (32, 8, default),
                                                             (64, 4, default)]
    assert launch(24, in_mode=True) == launch(24, in_mode=True, gain=True) == (32, 4, default)
    assert launch(24, gain=True, group=2) == (*wl._slab(24, wl.GROUP_OUT_TILE), default)
    assert launch(24, gain=True, swiglu=True) == (*wl._slab(24, wl.OUT_TILE), default)


@triton.jit
def _bf16_values_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, _bf16_values(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def test_bf16_values_round_to_nearest_even(seed):
    """The interpreter's stand-in for a bf16 dot's operand (``_bf16_values``) rounds fp32 as the
    GPU and torch do: to the nearest bf16, ties to even, past the largest bf16 to inf, and
    subnormals too; exactly."""
    ulp = 2.0**-7  # bf16's spacing in [1, 2)
    edge = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2**-20,
                         3.3999e38, -3.3999e38, 1e-40, -3e-39, 0.0, -0.0, 65504.0])
    x = torch.cat([edge, torch.randn(5000) * 10.0 ** torch.randint(-30, 30, (5000,))])
    x = x.to(DEV)
    y = torch.full_like(x, float("nan"))
    _bf16_values_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16).float()
    bits, want_bits = y.view(torch.int32), want.view(torch.int32)  # -0.0 is not 0.0 here
    bad = (bits != want_bits).nonzero()[:5].flatten().tolist()
    assert torch.equal(bits, want_bits), (seed, bad)
    assert y[0] == 1.0 and y[1] == 1 + 2 * ulp and y[4] == float("inf")  # ties to even; overflow


def test_walsh_transform_rejects_bad_gains():
    x = torch.randn(3, 12, device=DEV)
    with pytest.raises(ValueError, match="power of two"):
        wt.walsh_in(x, torch.ones(3, 4, device=DEV))
    with pytest.raises(ValueError, match="gain dtype"):
        wt.walsh_in(x, torch.ones(4, 3, device=DEV, dtype=torch.bfloat16))


@pytest.mark.parametrize("which", ["walsh_in", "walsh_out"])
def test_transform_ops_compile_and_pass_opcheck(which, seed):
    """The standalone transforms' ops (walsh_out's saves its own out for dbeta; walsh_in_gain
    takes dy's row width as an int): torch.library.opcheck on each op (schema,
    fake against real, autograd registration), and the compiled transform with its backward
    equal to eager."""
    a, n, lanes = 8, 6, 5
    tok = torch.randn(n, a * lanes, device=DEV)
    blk = torch.randn(a, n, lanes, device=DEV)
    gain = 1 + 0.3 * torch.randn(a, lanes, device=DEV)
    if which == "walsh_out":
        torch.library.opcheck(torch.ops.walsh.walsh_out.default,
                              (blk.clone().requires_grad_(), gain.clone().requires_grad_()))
        torch.library.opcheck(torch.ops.walsh.walsh_in_gain.default, (tok, gain, tok.flip(0), 8))
        x = blk
    else:
        torch.library.opcheck(torch.ops.walsh.walsh_in.default,
                              (tok.clone().requires_grad_(), gain.clone().requires_grad_()))
        torch.library.opcheck(torch.ops.walsh.walsh_out_gain.default, (blk, gain, tok))
        x = tok
    fn = getattr(wt, which)
    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xs, gs = x.clone().requires_grad_(), gain.clone().requires_grad_()
        out = f(xs, gs)
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        grads.append((out.detach(), xs.grad, gs.grad))
    for eager, compiled in zip(*grads):
        assert torch.equal(eager, compiled), seed


# -- full shapes on the GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [381_300, 381_301])  # 32 x n x 176 just below / at 2**31
def test_walsh_transform_offsets_at_the_int32_limit(n, seed):
    """The transforms' int32 offsets (below WIDE_NUMEL = 2**31 elements) and int64 ones (from
    it on) at the limit: the last tokens of [N, 32 x 172] -> [32, N, 176] (the 1.3B FFN's
    padded rows) and back equal the same tokens transformed alone (about 4 GB a tensor)."""
    a, lanes, width, tail = 32, 172, 176, 5
    assert (a * n * width >= wt.WIDE_NUMEL) == (n == 381_301)
    x = torch.randn(n, a * lanes, device="cuda", dtype=torch.bfloat16)
    gain = (1 + 0.3 * torch.randn(a, lanes, device="cuda")).to(torch.bfloat16)
    u = wt.walsh_in_raw(x, gain, a, width=width)                       # [32, N, 176]
    assert torch.equal(u[:, -tail:], wt.walsh_in_raw(x[-tail:], gain, a, width=width)), seed
    out = wt.walsh_out_raw(u, gain, a, lanes=lanes)                    # [N, 32 x 172]
    assert torch.equal(out[-tail:], wt.walsh_out_raw(u[:, -tail:].contiguous(), gain, a,
                                                     lanes=lanes)), seed
