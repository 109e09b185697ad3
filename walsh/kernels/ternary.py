"""Fused ternary weight quantization (absmean, codes, scaled effective weight) in two launches.

``ternary_ste(w, per_component=False, out_dtype=None)`` is the kernel twin of
``walsh.quant.ternary_ste`` (the naive reference, same signature): forward gamma * Q written
directly in ``out_dtype`` (bf16 under autocast: half the bytes of an fp32 copy plus a cast),
backward the straight-through identity (dL/dw = dL/dw_eff, cast to w's dtype).

Passes over w [G, M] (G = A components if ``per_component`` else 1, M elements each):
1. ``_abs_partial_kernel``: partial sums of |w| per (group, program) into [G, P], P at most
   ``PARTS``: program p adds blocks p, p + P, p + 2P, ... of ``BLOCK`` elements, in that order.
2. ``_ternary_apply_kernel``: every program first adds its group's P partials (a fixed
   reduction tree over at most ``PARTS`` values, read from L2), so the scale is deterministic
   (no atomics: a resumed run reproduces its weights bit for bit); then Q = sign(w) *
   (|w / gamma| > 1/2), which equals clip(round(w / gamma), -1, 1) for every input
   (round-half-even sends +-1/2 to 0), with an IEEE division (``div_rn``) so that the codes
   match torch's exactly for the same gamma.
Why the partials are added inside the apply kernel: the Walsh layers' weights are small
(18k-352k elements at the 125M-1.3B presets), so the quantizer's HBM time is under a
microsecond and each launch costs about one (in a CUDA graph); a torch sum between the two
kernels was a third launch. Measured on an H200 in CUDA graphs (session 13,
docs/benchmarks.md): 4.6-5.8 us -> 2.9-3.7 us at 74k-352k elements, still 7.5-31x the HBM time,
which is less than one launch; 34.8 -> 34.3 us at 11.3M (2.2x).
``absmean_scale`` (``ternary_quantize``'s scale; the layers' INT8 path quantizes with
``walsh.quant`` in torch) still adds the partials with torch, so its scale may differ from
``ternary_ste``'s in the last bit (another summation order).

Code order (Liger style): kernels, launchers, autograd (an op), functional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.bf16_round import _stored
from walsh.kernels.registry import INTERPRETED, kernel_op, wrap_triton
from walsh.quant import EPS

BLOCK = 1024
# at most this many partial sums per group: enough programs to fill an H100/H200 (132 SMs) for
# the large dense-ternary weights, few enough that each apply program reads them cheaply. A
# power of two, like BLOCK, so that (it * P + p) * BLOCK stays under 2**31 for any group of
# fewer than 2**31 elements (the masked overshoot past M cannot wrap around)
PARTS = 512


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _abs_partial_kernel(w_ptr, part_ptr, M, P, ITERS, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    p = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):  # blocks p, p + P, ...: each step's programs read adjacent blocks
        offs = (it * P + p) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(w_ptr + g * M + offs, mask=offs < M, other=0.0).to(tl.float32))
    tl.store(part_ptr + g * P + p, tl.sum(acc, axis=0))


@triton.jit
def _ternary_apply_kernel(w_ptr, part_ptr, out_ptr, codes_ptr, M, P, divisor, eps,
                          WRITE_CODES: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr,
                          INTERPRETED: tl.constexpr):
    g = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    w = tl.load(w_ptr + g * M + offs, mask=mask, other=0.0).to(tl.float32)
    # the group's total: its P partial sums (PB = next_pow2(P)), the same tree in every program
    k = tl.arange(0, PB)
    t = tl.sum(tl.load(part_ptr + g * P + k, mask=k < P, other=0.0), axis=0)
    # gamma = max(total / divisor, eps) with an IEEE division, as torch computes it; the float
    # arguments cast to fp32 (compiled, inductor passes Python floats as fp64)
    s = tl.maximum(tl.math.div_rn(t, tl.cast(divisor, tl.float32)), tl.cast(eps, tl.float32))
    r = tl.math.div_rn(w, tl.zeros_like(w) + s)
    q = tl.where(r > 0.5, 1.0, tl.where(r < -0.5, -1.0, 0.0))
    # gamma * Q rounded once to out's dtype (to nearest under the interpreter too)
    tl.store(out_ptr + g * M + offs, _stored(q * s, out_ptr, INTERPRETED), mask=mask)
    if WRITE_CODES:
        tl.store(codes_ptr + g * M + offs, q.to(tl.int8), mask=mask)


# -- launchers --------------------------------------------------------------------------------
def _groups(w: torch.Tensor, per_component: bool) -> tuple[torch.Tensor, int, int]:
    w2 = w.detach().contiguous()
    g = w.shape[0] if per_component else 1
    return w2, g, w2.numel() // g


def _abs_partials(w2: torch.Tensor, g: int, m: int) -> torch.Tensor:
    """fp32 [G, P] partial sums of |w| per group of ``_groups``' (w2, g, m), P <= ``PARTS``
    (P >= 1: a group without elements gets one zero)."""
    blocks = max(1, triton.cdiv(m, BLOCK))
    p = min(blocks, PARTS)
    part = torch.empty(g, p, device=w2.device, dtype=torch.float32)
    wrap_triton(_abs_partial_kernel)[(g, p)](w2, part, m, p, triton.cdiv(blocks, p),
                                             BLOCK=BLOCK)
    return part


def absmean_scale(w: torch.Tensor, per_component: bool = False) -> torch.Tensor:
    """gamma (fp32): a scalar, or [A, 1, ..., 1] per component, as ``walsh.quant``'s."""
    w2, g, m = _groups(w, per_component)
    scale = (_abs_partials(w2, g, m).sum(dim=1) / m).clamp(min=EPS)  # [G]
    return scale.view(g, *([1] * (w.ndim - 1))) if per_component else scale.reshape(())


def ternary_apply(w: torch.Tensor, scale: torch.Tensor, per_component: bool,
                  out_dtype: torch.dtype, write_codes: bool = False,
                  out: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                  divisor: float = 1.0, eps: float = 0.0):
    """(gamma * Q in out_dtype, int8 codes or None) with gamma = max(sum(scale[g]) / divisor,
    eps) per group: ``scale`` fp32 [G] (a scale per group; the defaults use it as it is) or
    [G, P] (partial sums, added by the kernel); ``out`` and ``codes``: contiguous buffers to
    write into (tests poison them)."""
    w2, g, m = _groups(w, per_component)
    parts = scale.reshape(g, -1).contiguous()  # [G, P]
    if out is None:
        out = torch.empty(w.shape, device=w.device, dtype=out_dtype)
    if codes is None:
        # unwritten without codes: an empty of its own, never an alias of out
        codes = torch.empty(w.shape if write_codes else 0, device=w.device, dtype=torch.int8)
    p = parts.shape[1]
    grid = (g, triton.cdiv(m, BLOCK))
    wrap_triton(_ternary_apply_kernel)[grid](w2, parts, out, codes, m, p, float(divisor),
                                        float(eps), WRITE_CODES=write_codes, BLOCK=BLOCK,
                                        PB=triton.next_power_of_2(p), INTERPRETED=INTERPRETED)
    return out, (codes if write_codes else None)


# -- autograd (an op, ``walsh.kernels.registry``) ---------------------------------------------
@kernel_op("walsh::ternary_ste", lambda w, per_component, out_dtype:
           torch.empty_like(w, dtype=out_dtype))
def _ternary_ste_op(w: torch.Tensor, per_component: bool, out_dtype: torch.dtype) -> torch.Tensor:
    # two launches: partial sums, and apply (which adds them, divides and clamps)
    w2, g, m = _groups(w, per_component)
    out, _ = ternary_apply(w, _abs_partials(w2, g, m), per_component, out_dtype, divisor=m,
                           eps=EPS)
    return out


def _setup(ctx, inputs, output):
    ctx.w_dtype = inputs[0].dtype
    # no gradient in (a grouped Walsh layer whose output reached no loss): none out, not zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, grad):  # straight through: dL/dw = dL/dw_eff
    return None if grad is None else grad.to(ctx.w_dtype), None, None


_ternary_ste_op.register_autograd(_backward, setup_context=_setup)


# -- functional -------------------------------------------------------------------------------
def ternary_ste(w: torch.Tensor, per_component: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Effective weight gamma * Q [same shape as w] in ``out_dtype`` (default w's dtype), with
    the straight-through gradient; the fused twin of ``walsh.quant.ternary_ste``."""
    return _ternary_ste_op(w, per_component, out_dtype or w.dtype)


def ternary_quantize(w: torch.Tensor, per_component: bool = False):
    """(int8 codes, fp32 scale) like ``walsh.quant.ternary_quantize``: the scale from
    ``absmean_scale`` (partials added by torch), then the apply kernel with that scale, so the
    codes are exactly torch's rule for the scale returned."""
    scale = absmean_scale(w, per_component)
    _, codes = ternary_apply(w, scale, per_component, torch.float32, write_codes=True)
    return codes, scale
