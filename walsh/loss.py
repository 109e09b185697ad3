"""Chunked (fused) linear cross-entropy that never keeps a [N, V] tensor alive.

For each chunk of ``chunk`` tokens: logits_c = h_c W^T [c, W] in h's dtype (W: the vocabulary V
padded, below), then one pass over them (``walsh.kernels.cross_entropy``'s kernel, or
``ce_chunk_naive`` in torch ops, fp32 inside) for the log-sum-exp lse_c [c] and the loss sum
and, when a gradient is wanted, g_c = (softmax_c - onehot) * valid / n_valid (in h's dtype);
then dh_c = g_c W [c, C] and dW += g_c^T h_c [W, C] (fp32). Backward only scales the kept dh
[N, C] and dW by the incoming gradient (a loss weight, 1 / accumulation steps). Peak extra memory is
a chunk's logits and g [c, W] (and one fp32 block on the torch path) instead of [N, V] logits
plus their softmax (MODEL_SPEC section 7; the seed kept the full fp32 logits for backward).

Why the gradient in the forward (Liger-Kernel's design): the earlier form formed g in the
backward from recomputed logits; compiled, inductor kept each chunk's logits from the
forward instead (8 x [2048, 50257] bf16 at the 125M benchmark shape, 1.6 GB) and spent four
elementwise passes on each chunk (the log-sum-exp; the exponent, the one-hot by an indexed
write, the scale and the cast; a transposed copy of g for dW): 5.4 ms of the 125M step's 34
on an H200, beside its three GEMMs' 5.0. Now one pass (the kernel) reads each chunk's logits
and writes g, and nothing the size of the logits outlives its chunk. The
compiled loss at the 125M shape (16k tokens, 768 -> 50257, forward + backward): 11.29 ms
before, 10.43 with the gradient in the forward in torch ops, 9.74 with the kernel; peak 2.47
-> 2.44 GiB (docs/benchmarks.md, session 30, at 733c937); with the padded vocabulary (below)
9.2 -> 7.5 ms and 2.44 -> 1.43 GiB, and 7.5 -> 6.9 ms at 4,096-token chunks (session 32). The
cost: dW [W, C] fp32 and dh [N, C] live from the forward to the backward (155 MB and 25 MB at
that shape); a forward that wants no gradient (evaluation, ``torch.no_grad``, a frozen head)
skips that work.

Padded vocabulary: the logits are [c, W], W the vocabulary V rounded up to ``VOCAB_ALIGN``
(50257 -> 50304 for GPT-2's), from a weight padded with zero rows in the step's one cast of it
to h's dtype; the chunk pass leaves the padding columns out of the softmax and writes 0 to
their g, so the loss and both gradients are those of the [N, V] logits. Why: at V = 50257
every [c, V] bf16 row starts at an odd element, cuBLAS wants 16-byte aligned rows, and
compiled, inductor padded each chunk's operands itself: a copy of the logits (or of g) for
each of the three GEMMs that read them, ~110 us a chunk at the 125M shape on an H200 (session
31's profile). The extra 47 columns cost 0.09% of the GEMMs' work. Aligned, g_c^T h_c reads g
transposed without a copy (at V = 50257 compile had copied each g_c, 109 us, so session 30
kept dW^T [C, V] and transposed it once in the backward, 260 us): dW is kept [W, C] and its
first V rows are the gradient. The A/B at 4,096-token chunks was within noise (C = 768: 6.92,
7.08 -> 7.17, 7.06 ms; C = 2048: 15.91, 15.91 -> 15.89, 15.83; session 32), the profile 87 us
less; kept as the simpler form.

torch 2.13 ships ``torch.nn.functional.linear_cross_entropy`` with chunking options (the same
design in torch ops); the GPU image this project benchmarks on has torch 2.11, without it.

``naive_linear_cross_entropy`` is the reference with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "triton", "torch")
# the logits' width is the vocabulary rounded up to this (module doc: "Padded vocabulary")
VOCAB_ALIGN = 64


def padded_vocab(vocab: int) -> int:
    """W: the logits' width for a vocabulary of ``vocab`` (rounded up to ``VOCAB_ALIGN``)."""
    return -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN


def chunk_vocab(vocab: int, width: int) -> int:
    """A chunk pass's ``vocab`` resolved (-1: the logits' whole width), checked to lie in
    [1, width]: shared by ``ce_chunk_naive`` and the kernel's launcher."""
    vocab = width if vocab < 0 else vocab
    if not 0 < vocab <= width:
        raise ValueError(f"ce_chunk: vocab must lie in [1, {width}] (the logits' width), "
                         f"got {vocab}")
    return vocab


def ce_chunk_naive(logits: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor,
                   want_grad: bool, vocab: int = -1) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """One chunk's log-sum-exp and gradient: the reference of ``walsh.kernels.cross_entropy``.

    logits [c, W] (any float dtype) whose first ``vocab`` columns are the vocabulary (all W
    when -1; the rest padding, outside the softmax), tgt [c] long in [0, vocab), scale [c]
    fp32 -> lse [c] fp32, picked [c] fp32 (the target's logit), g = (softmax - onehot(tgt)) *
    scale [c, W] in logits' dtype, 0 on the padding (empty [0] when not ``want_grad``). In
    place on one fp32 [c, vocab] block. Targets outside [0, vocab) are the caller's error:
    ``gather`` raises here past vocab, the kernel does not check (the loss clamps
    ``ignore_index`` rows to 0 and zeroes their scale)."""
    width = logits.shape[1]
    vocab = chunk_vocab(vocab, width)
    lf = logits[:, :vocab].float() if vocab < width else logits.float()
    lse = torch.logsumexp(lf, dim=-1)                                  # [c]
    picked = lf.gather(1, tgt[:, None]).squeeze(1)                     # [c]
    if not want_grad:
        return lse, picked, logits.new_empty(0)
    # in place on lf where .float() made it a copy; fp32 logits are the caller's to keep
    g = (lf - lse[:, None] if logits.dtype == torch.float32 else lf.sub_(lse[:, None])).exp_()
    g[torch.arange(tgt.shape[0], device=g.device), tgt] -= 1.0
    g = g.mul_(scale[:, None]).to(logits.dtype)                         # [c, vocab]
    return lse, picked, F.pad(g, (0, width - g.shape[1]))               # [c, W]


def _chunk_fn(kernel: bool):
    """The chunk pass: the Triton op, or its reference (whose path imports no triton, so that
    ``impl="auto"`` runs on a CPU machine without it; CUDA builds of torch bring triton)."""
    if not kernel:
        return ce_chunk_naive
    from walsh.kernels.cross_entropy import ce_chunk

    return ce_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index, want_h, want_w, kernel):
        # h: [N, C] (compute dtype), weight: [V, C], targets: [N] long
        n = h.shape[0]
        vocab, width = weight.shape[0], padded_vocab(weight.shape[0])
        # w [W, C] in h's dtype, rows past the vocabulary zero (their logits are padding the
        # chunk pass leaves out, and their g columns are 0)
        w = weight.to(h.dtype) if width == vocab else F.pad(weight.to(h.dtype),
                                                             (0, 0, 0, width - vocab))
        valid = targets != ignore_index                                # [N]
        n_valid = valid.sum().clamp(min=1)
        scale = valid / n_valid                                        # [N] fp32: 1/n or 0
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None               # [N, C]
        grad_w = (torch.zeros((width, weight.shape[1]), dtype=torch.float32,
                              device=weight.device) if want_w else None)
        for s in range(0, n, chunk):
            hc = h[s : s + chunk]                                      # [c, C]
            tgt = targets[s : s + chunk].clamp(min=0)                  # [c]
            logits = hc @ w.T                                          # [c, W], h's dtype
            lse, picked, g = _chunk_fn(kernel)(
                logits, tgt, scale[s : s + chunk], want_h or want_w, vocab)  # g [c, W]
            del logits
            total += ((lse - picked) * valid[s : s + chunk]).sum()
            if want_h:
                grad_h[s : s + chunk] = g @ w                          # [c, C]
            if want_w:
                grad_w += (g.T @ hc).float()                           # [W, C]
            del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.vocab = weight.dtype, vocab
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out: [] (the loss's weight, e.g. 1 / accumulation steps); the kept gradients are
        # for grad_out = 1. Scaled in fp32: a bf16 grad_out would round 1/3 to 0.33398
        go = grad_out.float()
        dh = (grad_h.float() * go).to(grad_h.dtype) if grad_h is not None else None
        dw = None
        if grad_w is not None:  # [W, C] -> [V, C]
            dw = (grad_w[:ctx.vocab] * go).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean CE of logits h @ weight.T against targets. h: [N, C], weight: [V, C], targets: [N].

    ``impl``: "triton" (``walsh.kernels.cross_entropy``'s kernel for each chunk's log-sum-exp
    and gradient), "torch" (its reference in torch ops), "auto" (the kernel on CUDA tensors,
    torch elsewhere: a CPU run has no Triton to compile)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h [N, C] and targets [N], got {tuple(h.shape)}, "
                         f"{tuple(targets.shape)}")
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    grad = torch.is_grad_enabled()
    kernel = impl == "triton" or (impl == "auto" and h.is_cuda)
    _chunk_fn(kernel)  # imported here, outside the traced forward
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index,
                                         grad and h.requires_grad,
                                         grad and weight.requires_grad, kernel)


def naive_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Reference: full [N, V] logits, then ``F.cross_entropy`` (``chunk`` unused)."""
    logits = (h @ weight.to(h.dtype).T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
