"""Triton kernels against their naive references (walsh.kernels): forward and every gradient on
a grid with odd sizes, fp32 (1e-5) and bf16 (1e-2) relative bounds, fresh random inputs each
run (the seed is in every failure message), outputs written into NaN-poisoned buffers.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; the tests
marked ``gpu`` repeat them at the 125M model's shapes on CUDA.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from _helpers import rel_err

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from walsh import quant  # noqa: E402
from walsh.kernels import int8_linear as ik  # noqa: E402
from walsh.kernels import ternary as tk  # noqa: E402
from walsh.kernels import walsh_linear as wf  # noqa: E402
from walsh.kernels import walsh_transform as wt  # noqa: E402
from walsh.layers import WalshLinear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def seed() -> int:
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


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
# fp16 takes the transforms' TF32 dot, bf16 the bf16 dot, fp32 the IEEE dot
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
    walsh_out + sum_i T * (S H Y) (T token-major, Y block-major). ``tokens``
    (per program, GAIN_TOKENS) makes programs loop over several token slabs, ragged at the end
    (37 tokens in slabs of 4, 1030 in slabs of 16), or over one; 256 lanes are two chunks of
    walsh_in's 128-lane tile (each chunk divides its own lanes' shares by beta)."""
    monkeypatch.setattr(wt, "GAIN_TOKENS", tokens)
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


@pytest.mark.parametrize("setting", [("WIDE_NUMEL", 1), ("OUT_TILE", 64), ("IN_TILE", 256)])
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
    monkeypatch.setattr(wt, *setting)
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


@pytest.mark.parametrize("setting", [("OUT_TILE", 64), ("WIDE_NUMEL", 1)])
@pytest.mark.parametrize("a,n,lanes", [(16, 5, 130)])  # A >= 16: the tensor-core dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walsh_out_padded_rows_chunks_and_wide(setting, a, n, lanes, dtype, seed, monkeypatch):
    """walsh_out and walsh_out + dalpha from NaN-padded rows (136 lanes for 130)
    read in several chunks of lanes (OUT_TILE 64: three chunks, the last one's lanes 130-135
    NaN) or with int64 offsets: bit-equal to unpadded rows under the same setting."""
    monkeypatch.setattr(wt, *setting)
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


def test_walsh_transform_slab_rule():
    """(lanes per chunk, tokens per slab): whole tokens of next_pow2 lanes, chunks of the tile
    past it, and one two-tile chunk for a token of between one and two tiles' lanes that is no
    whole number of tiles (the 1.3B FFN's 172 lanes: 256, not 128 + 44)."""
    got = {(lanes, tile): wt._slab(lanes, tile) for lanes, tile in
           [(1, 128), (24, 128), (64, 128), (86, 128), (172, 128), (256, 128), (300, 128),
            (24, 256), (172, 256), (300, 256), (600, 256)]}
    assert got == {(1, 128): (1, 128), (24, 128): (32, 4), (64, 128): (64, 2),
                   (86, 128): (128, 1), (172, 128): (256, 1), (256, 128): (128, 1),
                   (300, 128): (128, 1), (24, 256): (32, 8), (172, 256): (256, 1),
                   (300, 256): (256, 1), (600, 256): (256, 1)}


@triton.jit
def _bf16_values_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, wt._bf16_values(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


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


def _assert_layers_agree(ref, fast, x, shape, seed, tol=1e-5):
    """fast(x) equals ref(x) (fp32, ``tol``) in its output, the input's gradient and every
    parameter's gradient; returns fast's output."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    assert out_f.shape == out_r.shape == shape
    assert rel_err(out_f, out_r) < tol, seed
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) < tol, seed
    for name, p in ref.named_parameters():
        assert rel_err(dict(fast.named_parameters())[name].grad, p.grad) < tol, (name, seed)
    return out_f


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
    out_f = _assert_layers_agree(ref, fast, x, (3, 7, 48), seed)
    with pytest.raises(ValueError, match="int8_matmul needs"):
        make_linear(algebra, dim, 64, 48, ternary=True, int8_matmul=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # one op, no breaks
    assert rel_err(compiled(x), out_f) < 1e-6, seed
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # fp32 bias, bf16 product
        assert fast(x).dtype == ref(x).dtype == torch.bfloat16


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
    _assert_layers_agree(ref, fast, torch.randn(2, 7, 40, device=DEV), (2, 7, 24), seed)


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


# -- registration -----------------------------------------------------------------------------
_SCAN = """
import json
import walsh.kernels.int8_linear, walsh.kernels.walsh_linear, walsh.kernels.ternary
import walsh.kernels.walsh_group, walsh.kernels.walsh_swiglu
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
    walsh, linear, colsum = "_walsh_kernel", "_walsh_linear_kernel", "_column_sum_kernel"
    eager, traced, kernels = json.loads(out.splitlines()[-1])
    assert eager and traced
    assert kernels == {
        "walsh::int8_mm": ["_int8_matmul_kernel"],
        "walsh::int8_linear": ["_int8_matmul_kernel"],
        "walsh::ternary_ste": ["_abs_partial_kernel", "_ternary_apply_kernel"],
        "walsh::walsh_in": [walsh],
        "walsh::walsh_out": [walsh],
        "walsh::walsh_in_gain": [colsum, walsh],
        "walsh::walsh_out_gain": [colsum, walsh],
        "walsh::walsh_linear": [colsum, walsh, linear],  # (sorted by name)
        "walsh::walsh_linear_backward": [colsum, walsh, linear],
        "walsh::walsh_group": [walsh],
        "walsh::walsh_group_backward": [colsum, walsh],
        "walsh::swiglu_linear": [walsh],
        "walsh::swiglu_linear_backward": [colsum, walsh],
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
