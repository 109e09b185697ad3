"""Chunked linear cross-entropy (MODEL_SPEC section 7): equal to full CE in loss and gradients,
bf16-tolerant, and its autograd graph never keeps an [N, V] tensor."""

from __future__ import annotations

import functools

import pytest
import torch
from _helpers import DEV, rel_err

from walsh.loss import linear_cross_entropy, naive_linear_cross_entropy, padded_vocab

N, C, V = 37, 16, 101




def make_inputs(seed: int = 0, n: int = N, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, C, generator=gen).to(dtype)
    w = torch.randn(V, C, generator=gen) * 0.5
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[[0, 5, 17, n - 1]] = -100  # includes the last, partial chunk
    return h, w, targets


def loss_and_grads(fn, h, w, targets, chunk):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = fn(h, w, targets, chunk=chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [8, 1, 36, 37, 1000], ids=lambda c: f"chunk{c}")
def test_fused_equals_naive_loss_and_grads(chunk):
    h, w, targets = make_inputs()
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, targets, chunk)
    ref, rh, rw = loss_and_grads(naive_linear_cross_entropy, h, w, targets, chunk)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    assert gh.shape == h.shape and gw.shape == w.shape
    assert rel_err(gh, rh) < 1e-5
    assert rel_err(gw, rw) < 1e-5
    # ignored rows get exactly zero gradient
    assert torch.equal(gh[targets == -100], torch.zeros_like(gh[targets == -100]))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("vocab", [1, 2, 63, 64, 128], ids=lambda v: f"V{v}")
def test_fused_equals_naive_at_padded_and_unpadded_widths(vocab, impl):
    """Vocabularies under VOCAB_ALIGN (a 1-word one: every softmax is 1, every gradient 0),
    and multiples of it (no padding), on either chunk pass: the padded head changes nothing a
    caller sees."""
    if impl == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(vocab)
    h = torch.randn(N, C, generator=gen).to(DEV)
    w = (torch.randn(vocab, C, generator=gen) * 0.5).to(DEV)
    targets = torch.randint(0, vocab, (N,), generator=gen)
    targets[[0, N - 1]] = -100
    targets = targets.to(DEV)
    fn = functools.partial(linear_cross_entropy, impl=impl)
    loss, gh, gw = loss_and_grads(fn, h, w, targets, 8)
    ref, rh, rw = loss_and_grads(naive_linear_cross_entropy, h, w, targets, 8)
    assert gw.shape == (vocab, C) and gh.shape == (N, C)
    if vocab == 1:
        assert loss.item() == 0 and not gh.any() and not gw.any()
        return
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5


def test_fused_loss_of_no_tokens_is_zero():
    """An empty chunk list (n = 0): loss 0 and zero gradients of the inputs' shapes, where full
    CE's mean over nothing is NaN."""
    h = torch.randn(0, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), chunk=8)
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, C)
    assert w.grad.shape == (V, C) and not w.grad.any()


def test_naive_reference_is_plain_cross_entropy():
    h, w, targets = make_inputs(1)
    logits = (h.double() @ w.double().T)
    valid = targets != -100
    lse = logits.logsumexp(-1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    by_hand = ((lse - picked)[valid]).mean()
    got = linear_cross_entropy(h, w, targets, chunk=8)
    assert abs(got.item() - by_hand.item()) / by_hand.item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_out_scale_is_respected(dtype):
    """Backward multiplies both gradients by the incoming gradient (a loss weight, 1 /
    accumulation steps), in fp32: 1/3 is not a bf16 number, and two backward passes add."""
    h, w, targets = make_inputs(2, dtype=dtype)
    grads = {}
    for name, fn in (("fused", linear_cross_entropy), ("naive", naive_linear_cross_entropy)):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        for _ in range(2):  # accumulated, as over micro steps
            (fn(hh, ww, targets, chunk=8) / 3).backward()
        grads[name] = (hh.grad.float(), ww.grad)
    for got, want in zip(grads["fused"], grads["naive"], strict=True):
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 4e-3)


def test_bf16_input_gradient_scaled_in_fp32():
    """dh for a bf16 h is the kept gradient times grad_out in fp32, rounded once: exactly
    bf16(dh_1 * fp32(1/3)), where a bf16 grad_out (0.33398) would differ."""
    h, w, targets = make_inputs(9, dtype=torch.bfloat16)
    grads = []
    for scale in (1.0, 3.0):
        hh = h.clone().requires_grad_(True)
        (linear_cross_entropy(hh, w, targets, chunk=8) / scale).backward()
        grads.append(hh.grad)
    want = (grads[0].float() * torch.tensor(1 / 3.0)).to(torch.bfloat16)
    assert torch.equal(grads[1], want)


def test_all_targets_ignored_is_finite_zero():
    h, w, targets = make_inputs(3)
    targets[:] = -100
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, targets, 8)
    assert loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_bf16_hidden_close_to_fp32():
    h, w, targets = make_inputs(4)
    ref = naive_linear_cross_entropy(h, w, targets)
    hb = h.to(torch.bfloat16).requires_grad_(True)
    loss = linear_cross_entropy(hb, w, targets, chunk=8)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad).all()
    _, rh, _ = loss_and_grads(naive_linear_cross_entropy, h, w, targets, 8)
    assert rel_err(hb.grad.float(), rh) < 3e-2


def test_autocast_bf16_close_to_fp32():
    h, w, targets = make_inputs(5)
    ref = naive_linear_cross_entropy(h, w, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk=8)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2


def test_bad_shapes_raise():
    h, w, targets = make_inputs()
    with pytest.raises(ValueError):
        linear_cross_entropy(h[None], w, targets)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, targets[:-1])


def _saved_shapes(fn, h, w, targets, chunk):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(h, w, targets, chunk=chunk)
    loss.backward()  # the graph still works with the hooks
    return shapes


def test_fused_graph_keeps_no_full_logits():
    h, w, targets = make_inputs(6)
    fused = _saved_shapes(linear_cross_entropy, h, w, targets, 8)
    naive = _saved_shapes(naive_linear_cross_entropy, h, w, targets, 8)
    numel = [torch.Size(s).numel() for s in fused]
    assert fused, "nothing saved for backward at all?"
    assert N * V not in numel, f"fused loss saved an [N, V]-sized tensor: {fused}"
    # nor anything chunk x V or larger than the inputs themselves (dW is kept [W, C], W the
    # vocabulary padded to VOCAB_ALIGN)
    assert max(numel) <= max(N * C, padded_vocab(V) * C), fused
    # the same probe sees the [N, V] logits/log-softmax of the naive version: the test can fail
    assert N * V in [torch.Size(s).numel() for s in naive], naive


@pytest.mark.parametrize("which", ["h", "w", "none"])
def test_gradients_only_for_inputs_that_want_them(which, monkeypatch):
    """The gradients are formed in the forward only for the inputs that require them (a frozen
    head, evaluation under ``torch.no_grad``): nothing is kept for the others, the chunk pass
    is asked for no gradient when neither wants one, and the loss is the same either way."""
    import walsh.loss as wl

    asked = []

    def spy(logits, tgt, scale, want_grad, vocab):
        asked.append(want_grad)
        return naive_pass(logits, tgt, scale, want_grad, vocab)

    naive_pass = wl.ce_chunk_naive
    monkeypatch.setattr(wl, "ce_chunk_naive", spy)
    h, w, targets = make_inputs(7)
    ref, rh, rw = loss_and_grads(naive_linear_cross_entropy, h, w, targets, 8)
    h = h.clone().requires_grad_(which != "w")
    w = w.clone().requires_grad_(which == "w")
    if which == "none":
        with torch.no_grad():
            loss = linear_cross_entropy(h, w, targets, chunk=8, impl="torch")
        assert loss.grad_fn is None
        assert asked and not any(asked)
    else:
        loss = linear_cross_entropy(h, w, targets, chunk=8, impl="torch")
        kept_h, kept_w = loss.grad_fn.saved_tensors
        assert (kept_h is None) == (which == "w") and (kept_w is None) == (which == "h")
        assert asked and all(asked)
        loss.backward()
        got, want = (h.grad, rh) if which == "h" else (w.grad, rw)
        assert rel_err(got, want) < 1e-5
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_equals_eager(impl):
    """Under torch.compile (as the trainer runs it; one graph) the loss and both gradients
    match eager, on either chunk pass (the kernel's op traces through its fake)."""
    if impl == "triton":
        pytest.importorskip("triton")
    h, w, targets = (t.to(DEV) for t in make_inputs(8))  # the kernel's tensors on its device
    fn = functools.partial(linear_cross_entropy, impl=impl)
    eager = loss_and_grads(fn, h, w, targets, 8)
    compiled = loss_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True),
                              h, w, targets, 8)
    for a, b in zip(eager, compiled, strict=True):
        assert rel_err(b, a) < 1e-6
