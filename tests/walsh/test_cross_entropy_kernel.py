"""walsh.kernels.cross_entropy (a chunk's log-sum-exp and gradient in one pass) against its
reference ``walsh.loss.ce_chunk_naive``, and the loss on the kernel against the loss in torch:
on CPU under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes, on CUDA where there is
one; outputs poisoned with NaN, fresh inputs each run."""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV, TOL, PoisonedTorch, rel_err

pytest.importorskip("triton")
from walsh.kernels import cross_entropy as ce  # noqa: E402
from walsh.loss import ce_chunk_naive, linear_cross_entropy  # noqa: E402


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(ce, "torch", PoisonedTorch())


def _chunk(rows, vocab, dtype):
    logits = (torch.randn(rows, vocab, device=DEV) * 3).to(dtype)
    tgt = torch.randint(0, vocab, (rows,), device=DEV)
    tgt[0] = vocab - 1  # the row's last column, in the last (masked) block
    scale = torch.rand(rows, device=DEV)
    scale[-1] = 0.0  # an ignored row: g all zero
    return logits, tgt, scale


def _assert_matches_naive(logits, tgt, scale, dtype, seed):
    """The kernel's lse, picked and g against ``ce_chunk_naive``'s."""
    lse, picked, g = ce.ce_chunk_raw(logits, tgt, scale, True)
    r_lse, r_picked, r_g = ce_chunk_naive(logits, tgt, scale, True)
    assert lse.dtype == picked.dtype == torch.float32 and g.dtype == dtype
    assert rel_err(lse, r_lse) < 1e-6, seed  # fp32 inside whatever the logits' dtype
    assert torch.equal(picked, r_picked), seed  # the target's logit, read, not computed
    if r_g.abs().max() > 0:
        assert rel_err(g.float(), r_g.float()) < TOL[dtype], seed
    else:  # one column: softmax 1, minus the one-hot, is 0 everywhere
        assert torch.equal(g, r_g), seed
    assert torch.equal(g[-1], torch.zeros_like(g[-1])), seed
    # each row's gradient sums to scale * (1 - 1) = 0: the one-hot sits in its column
    assert g.float().sum(1).abs().max().item() < TOL[dtype] * max(1.0, scale.max().item()), seed


# vocabularies below, at and past one BLOCK_V load (a row of one, one masked block, several)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 1), (5, 7), (37, 101), (3, ce.BLOCK_V),
                                        (4, ce.BLOCK_V + 3), (2, 2 * ce.BLOCK_V + 1)])
def test_ce_chunk_matches_naive(rows, vocab, dtype, poisoned, seed):
    _assert_matches_naive(*_chunk(rows, vocab, dtype), dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,width", [(3, 1, 8), (5, 57, 64), (4, ce.BLOCK_V - 1,
                                                                      ce.BLOCK_V + 64)])
def test_ce_chunk_padded_vocabulary(rows, vocab, width, dtype, poisoned, seed):
    """Logits [c, W] of which the first ``vocab`` columns count (the loss's padded head): the
    kernel's lse, picked and g against the reference's, both against the unpadded chunk's,
    and g exactly 0 on the padding whatever the padding's logits hold."""
    logits, tgt, scale = _chunk(rows, vocab, dtype)
    padded = torch.cat([logits, (torch.randn(rows, width - vocab, device=DEV) * 50).to(dtype)],
                       dim=1)                                          # [c, W]
    ref = ce_chunk_naive(logits, tgt, scale, True)
    for fn in (ce.ce_chunk_raw, ce_chunk_naive):
        lse, picked, g = fn(padded, tgt, scale, True, vocab)
        assert g.shape == (rows, width) and g.dtype == dtype
        assert rel_err(lse, ref[0]) < 1e-6, (fn, seed)
        assert torch.equal(picked, ref[1]), (fn, seed)
        if vocab > 1:
            assert rel_err(g[:, :vocab].float(), ref[2].float()) < TOL[dtype], (fn, seed)
        else:  # one column: softmax 1, minus the one-hot, is 0
            assert torch.equal(g[:, :1], ref[2]), (fn, seed)
        assert torch.equal(g[:, vocab:], torch.zeros_like(g[:, vocab:])), (fn, seed)
    assert torch.equal(padded[:, :vocab], logits)  # the reference wrote nothing into its input


def test_ce_chunk_vocab_past_width_named():
    """The kernel and its reference refuse a vocabulary of 0 or wider than the logits alike
    (the reference would otherwise take every column silently)."""
    logits, tgt, scale = _chunk(2, 8, torch.float32)
    for fn in (ce.ce_chunk_raw, ce_chunk_naive):
        for vocab in (0, 9):
            with pytest.raises(ValueError, match=rf"vocab must lie in \[1, 8\].*got {vocab}"):
                fn(logits, tgt, scale, True, vocab)


def test_ce_chunk_int64_offsets(monkeypatch, poisoned, seed):
    """The WIDE path (int64 row offsets, taken from 2^31 elements) at a small shape."""
    monkeypatch.setattr(ce, "WIDE_NUMEL", 0)
    _assert_matches_naive(*_chunk(5, 300, torch.float32), torch.float32, seed)


def test_ce_chunk_without_gradient(poisoned, seed):
    logits, tgt, scale = _chunk(6, 300, torch.float32)
    lse, picked, g = ce.ce_chunk_raw(logits, tgt, scale, False)
    assert g.numel() == 0
    assert rel_err(lse, torch.logsumexp(logits, -1)) < 1e-6, seed
    assert torch.equal(picked, logits.gather(1, tgt[:, None]).squeeze(1)), seed


def test_ce_chunk_bad_shapes_name_them():
    logits, tgt, scale = _chunk(4, 10, torch.float32)
    with pytest.raises(ValueError, match=r"ce_chunk: .*\(4, 10\), \(3,\)"):
        ce.ce_chunk_raw(logits, tgt[:3], scale, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_on_the_kernel_equals_torch(dtype, seed):
    """``impl="triton"`` against ``impl="torch"``: the loss and both gradients, chunks with a
    partial last one and ignored targets."""
    h = torch.randn(45, 24, device=DEV).to(dtype)
    w = torch.randn(203, 24, device=DEV) * 0.5
    t = torch.randint(0, 203, (45,), device=DEV)
    t[[3, 44]] = -100
    out = {}
    for impl in ("triton", "torch"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = linear_cross_entropy(hh, ww, t, chunk=16, impl=impl)
        loss.backward()
        out[impl] = (loss.detach().float(), hh.grad.float(), ww.grad)
    for a, b in zip(out["triton"], out["torch"], strict=True):
        assert rel_err(a, b) < TOL[dtype], seed


def test_loss_impl_is_checked():
    from walsh.models.config import WalshConfig

    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match=r"WalshConfig.loss_impl: must be one of .*'cuda'"):
        WalshConfig(loss_impl="cuda")


def test_model_loss_follows_loss_impl(monkeypatch, seed):
    """``loss_impl`` reaches ``WalshLM.head_loss``: "triton" runs the kernel's launcher,
    "torch" does not, and the two losses agree (same weights, same batch)."""
    from _helpers import small_config

    from walsh.models.lm import WalshLM

    launched = []
    raw = ce.ce_chunk_raw

    def spy(*args):
        launched.append(1)
        return raw(*args)

    monkeypatch.setattr(ce, "ce_chunk_raw", spy)
    torch.manual_seed(seed)
    model = WalshLM(small_config(vocab_size=97, block_size=16, n_embd=32,
                                 loss_impl="triton")).to(DEV)
    idx = torch.randint(0, 97, (2, 16), device=DEV)
    tgt = torch.randint(0, 97, (2, 16), device=DEV)
    got = model(idx, tgt)
    assert launched, "loss_impl=triton did not reach the kernel"
    launched.clear()
    model.config.loss_impl = "torch"
    want = model(idx, tgt)
    assert not launched, "loss_impl=torch ran the kernel"
    assert rel_err(got.detach(), want.detach()) < 1e-5, seed
