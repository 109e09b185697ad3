"""The Walsh-Hadamard layer's two block transforms, each fused with its gain and layout change.

WalshLinear (``walsh.layers.hadamard``) computes, for x [N, A*n_in], alpha [A, n_in],
beta [A, n_out] and S = 1/sqrt(A), H the Sylvester Hadamard matrix (+-1):
    u = walsh_in(x, alpha)    [A, N, n_in]   u[h,i,j] = S sum_g H[h,g] alpha[g,j] x[i, g n_in + j]
    y = bmm(u, W^T)           [A, N, n_out]  the A small GEMMs (``walsh.kernels.block_matmul``)
    out = walsh_out(y, beta)  [N, A*n_out]   out[i, h n_out + j] = beta[h,j] S sum_g H[h,g] y[g,i,j]
Each transform is one kernel pass over tiles of whole tokens: read the [A, tokens, lanes] slab
once, scale, multiply by H on the tensor cores (``tl.dot``; A >= 16 on rows wider than
``walsh_launch.BUTTERFLY_MAX_LANES``) or by butterfly stages in registers (narrower rows, and
A < 16), write in the other layout.
The naive references (``walsh_in_naive``, ``walsh_out_naive``) are the layer's ``blocks`` path
(``walsh.layers.hadamard``), re-exported here.

Backward reuses the forward kernel (H is symmetric, so each transform's adjoint is the other
one), with the gain's gradient summed in the same pass (``GAIN``): d walsh_in: dx = alpha *
walsh_out(du) and dalpha = sum_i x * walsh_out(du) (``walsh_out_gain_raw``: du and x read, dx
written); d walsh_out: dy = walsh_in(dout, beta) and dbeta = sum_i dout * z with z = S H y,
the forward's result before beta, taken as out / beta from the forward's own output
(``walsh_in_gain_raw``: dout and out read, dy written; each program divides its share by
beta). Each program writes its share of the sum (fp32) and a second kernel adds the shares in
a fixed order (``walsh.kernels.column_sum``): deterministic, no atomics.
Why out / beta: dbeta needs S H y, and the saved tensor that gives it has changed twice.
Until session 10 y was saved, and the backward recomputed S H y with a second tensor-core dot
on the block-major y, converted in registers to dout's token-major layout (2.0-3.8x its
roofline, session 9). Sessions 10-13 had walsh_out write z = S H y beside out, one more
[N, A*n_out] write per forward, saved instead of y. Since session 14 the op saves its output
out itself: out = beta * z is written anyway, and the consumers of the gate, up and value
projections (SwiGLU, attention) keep that very tensor for their own backward, so nothing more
is stored for them. Dividing by beta is as accurate as the saved z was: out rounds beta * z
once, so out / beta is z with the relative error of z rounded to the saved dtype (bf16 and fp32
at any beta; fp16 while beta * z stays in fp16's normal range: below it, fp16's subnormals
lose bits that z itself would have kept); the division (the GPU's fp32 divide, within 2 ulp)
is of each program's fp32 sum, not of each element. With RoPE inside (q, k) the saved output
is the rotated one, rotated back in the backward: its rounding mixes each lane with its pair
partner, so out / beta is z up to the partner's rounding over beta, and a lane whose beta is
far below its partner's beta * z gets a coarser dbeta (bf16, 15 tokens: a lane at beta =
0.002 put dbeta 1.1e-2 off, relative over 24 lanes, against at most 5e-3 over 150 draws with
no such lane; tests/walsh/test_walsh_rope.py draws beta >= 0.25). A lane whose beta is
exactly 0 has out = 0 there and no z to recover: its dbeta is 0 (the lane stays at 0; beta
starts at 1 and is not decayed, so training does not land on 0; a lane set to 0 by hand stays
dead under this path, where the ``blocks``, ``dense`` and ``fused`` paths would revive it).
(Before session 8 the sums were a third kernel reading the transform's output back, and
dbeta's walsh_out(y) a fourth that wrote it.)

Precision: the kernel's arithmetic (fp32 slabs, the dot's operands by input dtype) is
described in ``walsh.kernels.walsh_transform_kernel``.
dbeta sums dout times the saved out, in the input dtype (bf16 in training), and divides by beta
in fp32: z to the precision of bf16, as the naive path has it (its autograd saves the bf16
S H y), where the second dot had used S H y in fp32 (session 10 measured the two dbeta 1.6e-3
apart, relative, at 16k tokens).

Code order: naive references, launchers, autograd (ops), functional; the kernel is in
``walsh.kernels.walsh_transform_kernel``, its launch configuration (tiles and warps by pass
and width, measured) in ``walsh.kernels.walsh_launch``.
"""

from __future__ import annotations

import math

import torch
import triton

from walsh.kernels.column_sum import column_sum
from walsh.kernels.registry import INTERPRETED, WIDE_NUMEL, kernel_op, wrap_triton

# the launch configuration (tiles, tables, row widths); row_width re-exported for the layers'
# modules
from walsh.kernels.walsh_launch import (  # noqa: F401
    MAX_GROUP,
    _launch_params,
    checked_launch,
    program_slabs,
    row_width,
    use_dot,
)

# the kernel and its helper (``_hadamard``: walsh.kernels.walsh_linear's too)
from walsh.kernels.walsh_transform_kernel import _hadamard, _walsh_kernel  # noqa: F401

# the naive references (same signatures), re-exported beside their kernels
from walsh.layers.hadamard import walsh_in_naive, walsh_out_naive  # noqa: F401


def gain_grad_naive(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    """a, b [N, A*L] -> fp32 [A, L] = sum over tokens of a * b: the gradient of a per-lane gain
    (alpha or beta) given the upstream gradient and the tensor it multiplied."""
    return (a.float() * b.float()).sum(0).view(blocks, -1)


# -- launcher ---------------------------------------------------------------------------------
def _check_token_major(name: str, t: torch.Tensor | None, want: tuple[int, int],
                       dtype: torch.dtype, contiguous: bool = False) -> None:
    """A token-major operand of ``_launch`` (None: unused) is [N, A*L] in src's dtype, and
    contiguous where the kernel writes it or reads it without a copy."""
    if t is not None and (tuple(t.shape) != want or t.dtype != dtype
                          or (contiguous and not t.is_contiguous())):
        what = "contiguous " if contiguous else ""
        raise ValueError(f"{name} must be a {what}{want} {dtype} tensor, got {tuple(t.shape)} "
                         f"{t.dtype}")


def _launch(src: torch.Tensor, scale: torch.Tensor | None, a: int, lanes: int, n_tok: int,
            in_mode: bool, out: torch.Tensor | None = None, other: torch.Tensor | None = None,
            width: int | None = None, group: int = 1, more: tuple[torch.Tensor, ...] = (),
            up: torch.Tensor | None = None, out1: torch.Tensor | None = None,
            rope: tuple[torch.Tensor, torch.Tensor] | None = None,
            launch: tuple[int, int, int, int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dst, fp32 partial sums [rows, group * A*L] of the gain gradient or None without
    ``other``); ``width``: the block-major tensors' row width (>= lanes; default lanes);
    ``other``: the gain's token-major [N, A*L] operand. ``group`` > 1 (``_walsh_kernel``'s P):
    scale is [group, A, L]; in_mode writes dst [group, A, N, width]; else the sources are src
    and ``more`` (group in all, each [A, N, width]). ``up`` (token-major [N, A*L]; the kernel's
    SWIGLU): the input is silu(gate) * up with gate = src (in_mode, no gain) or gate = other
    (else, with a scale), which then writes dgate to dst and dup to ``out1``. ``rope``: fp32 (or
    fp16) per-lane (cos, sin) [T, A*L] of a rotated output (``rope_lanes``; the kernel's ROPE):
    walsh_out rotates its result; walsh_in with the gain (its backward) rotates dout and the
    saved output back. ``launch``: (LB lanes per chunk, tokens per slab, warps, stages, tokens
    per program of a gain pass) in place of the table's ``_launch_params`` (``walsh bench
    launch --pass`` sweeps them; ``walsh_launch.checked_launch``)."""
    if not 1 <= group <= MAX_GROUP or (not in_mode and len(more) != group - 1) or (
            in_mode and (more or (group > 1 and other is not None))):
        raise ValueError(f"a group of {group} layers (at most {MAX_GROUP}) needs one source "
                         "per layer without a gain gradient (walsh_in) or with (walsh_out); got "
                         f"{1 + len(more)} sources, gain gradient {other is not None}")
    if up is not None and (group > 1 or (other is not None) == in_mode or (
            not in_mode and (scale is None or out1 is None))):
        raise ValueError("silu(gate) * up as the input is one layer's walsh_in without a gain "
                         "gradient, or its walsh_out with the gain, its gradient and a second "
                         "output")
    if rope is not None:
        _check_rope(rope, n_tok, a * lanes, lanes,
                    group == 1 and up is None and (other is not None) == in_mode, src.dtype)
    tokens = (n_tok, a * lanes)  # the token-major operands' shape, in src's dtype
    _check_token_major("the gain's other operand", other, tokens, src.dtype)
    _check_token_major("up", up, tokens, src.dtype, contiguous=True)
    _check_token_major("out1", out1, tokens, src.dtype, contiguous=True)
    srcs = [t.contiguous() for t in (src, *more)]
    width = lanes if width is None else width
    if width < lanes:
        raise ValueError(f"block-major rows of {width} lanes cannot hold {lanes}")
    if not in_mode and any(tuple(t.shape) != (a, n_tok, width) for t in srcs):
        raise ValueError(f"block-major sources must be {(a, n_tok, width)} for {n_tok} tokens, "
                         f"got {[tuple(t.shape) for t in srcs]}")
    shape = (a, n_tok, width) if in_mode else (n_tok, a * lanes)
    shape = (group, *shape) if in_mode and group > 1 else shape
    dst = torch.empty(shape, device=src.device, dtype=src.dtype) if out is None else out
    if dst.shape != shape or not dst.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(shape)} tensor, got {tuple(dst.shape)}")
    lb, bt, warps, stages, tokens = (
        checked_launch(launch, "walsh transform") if launch else _launch_params(
            in_mode, group, width, other is not None, up is not None, rope is not None))
    chunks = triton.cdiv(width, lb)
    iters = 1 if other is None else program_slabs(tokens, bt, n_tok)
    rows = triton.cdiv(n_tok, bt * iters)
    part = None
    if other is not None:
        # every entry written (masked lanes past L are not entries); no rows without tokens
        part = torch.empty(rows, group * a * lanes, device=src.device, dtype=torch.float32)
    want = (a, lanes) if group == 1 else (group, a, lanes)
    if scale is not None and tuple(scale.shape) != want:
        raise ValueError(f"the gain must be {want} for {lanes} lanes of {a} blocks, got "
                         f"{tuple(scale.shape)}")
    if n_tok * width == 0:
        return dst, part
    # unused pointers get empties of their own, never aliases of used ones
    def arg(t, dtype=src.dtype):
        return t.contiguous() if t is not None else src.new_empty(0, dtype=dtype)

    srcs += [arg(None) for _ in range(MAX_GROUP - len(srcs))]
    wrap_triton(_walsh_kernel)[(rows, chunks)](
        *srcs, dst, arg(scale), arg(other), arg(part, torch.float32), arg(up), arg(out1),
        *(arg(t, torch.float32) for t in (rope or (None, None))), n_tok,
        rope[0].shape[0] if rope else 1, iters, 1.0 / math.sqrt(a), A=a,
        LOG_A=int(math.log2(a)), L=lanes, LP=width, LB=lb, BT=bt, P=group, IN_MODE=in_mode,
        HAS_SCALE=scale is not None, GAIN=other is not None, SWIGLU=up is not None,
        ROPE=rope is not None,
        USE_DOT=use_dot(a, lanes), IEEE=src.dtype == torch.float32,
        BF16_DOT=src.dtype == torch.bfloat16, INTERPRETED=INTERPRETED,
        WIDE=group * n_tok * a * width >= WIDE_NUMEL,
        STAGES=stages, num_warps=warps)
    return dst, part


def _check_rope(rope, n_tok: int, features: int, lanes: int, allowed: bool,
                dtype: torch.dtype) -> None:
    """RoPE's per-lane tables fit the pass: cos, sin contiguous [T, features]
    (``walsh.layers.common.rope_lanes``), fp32, or fp16 for data narrower than fp32
    (``rope_table_dtype``: fp16 tables would cost fp32 data its precision), with T dividing the
    tokens (the rows of a batch of sequences of T), and pairs of lanes inside a block (L even)."""
    cos, sin = rope
    if not allowed:
        raise ValueError("RoPE goes with one layer's walsh_out, or its walsh_in with the gain "
                         "gradient (its backward)")
    t = cos.shape[0] if cos.ndim == 2 else 0
    kinds = (torch.float32,) if dtype == torch.float32 else (torch.float32, torch.float16)
    if (cos.shape != sin.shape or cos.dtype not in kinds or sin.dtype != cos.dtype
            or not (cos.is_contiguous() and sin.is_contiguous()) or t == 0
            or cos.shape[1] != features):
        names = " or ".join(str(k) for k in kinds)
        raise ValueError(f"RoPE's per-lane tables (rope_lanes) for {dtype} data must be {names} "
                         f"contiguous [T, {features}], got cos {tuple(cos.shape)} {cos.dtype}, "
                         f"sin {tuple(sin.shape)} {sin.dtype}")
    if n_tok % t or lanes % 2:
        raise ValueError(f"RoPE with T = {t} does not fit {n_tok} tokens in blocks of {lanes} "
                         "lanes (T must divide the tokens, and the lanes must be even)")


def _check(name: str, t: torch.Tensor, scale: torch.Tensor) -> None:
    a = scale.shape[0]
    if a < 2 or a & (a - 1):
        raise ValueError(f"{name}: blocks must be a power of two >= 2, got {a}")
    if scale.dtype != t.dtype:
        raise ValueError(f"{name}: gain dtype {scale.dtype} != input dtype {t.dtype}")


def walsh_in_raw(x: torch.Tensor, alpha: torch.Tensor | None, a: int,
                 out: torch.Tensor | None = None, width: int | None = None,
                 up: torch.Tensor | None = None, launch: tuple | None = None) -> torch.Tensor:
    """[N, A*L] -> [A, N, width] (no autograd; width >= L, default L, lanes past L zeros);
    ``out``: a buffer to write into (tests poison it); ``up`` [N, A*L]: transform silu(x) * up
    instead of x (``walsh.kernels.walsh_swiglu``); ``launch``: as ``_launch``'s."""
    lanes = x.shape[-1] // a
    return _launch(x, alpha, a, lanes, x.shape[0], in_mode=True, out=out, width=width,
                   up=up, launch=launch)[0]


def walsh_out_raw(y: torch.Tensor, beta: torch.Tensor | None, a: int,
                  out: torch.Tensor | None = None, lanes: int | None = None,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                  launch: tuple | None = None) -> torch.Tensor:
    """[A, N, W] -> [N, A*L] from the first L = ``lanes`` (default W) lanes of each row (no
    autograd); ``rope``: per-lane (cos, sin) [T, A*L] (``rope_lanes``), the result rotated;
    ``launch``: as ``_launch``'s."""
    lanes = y.shape[2] if lanes is None else lanes
    return _launch(y, beta, a, lanes, y.shape[1], in_mode=False, out=out, width=y.shape[2],
                   rope=rope, launch=launch)[0]


def walsh_in_gain_raw(x: torch.Tensor, alpha: torch.Tensor | None, fwd: torch.Tensor, a: int,
                      out: torch.Tensor | None = None, width: int | None = None,
                      rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                      summed: bool = True, launch: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(walsh_in_raw(x, alpha, width=width), fp32 [A, L] sum over tokens of x * fwd / alpha)
    in one pass, fwd token-major like x (without alpha: sum x * fwd): a walsh_out's backward,
    dy and dbeta from dout = x, beta = alpha and the forward's output fwd = beta * S H y
    (lanes where beta is 0 get 0: the module doc). ``rope``: x and fwd are of a rotated
    output (``walsh_out_raw``'s), rotated back in the pass. ``summed=False``: the sum's fp32
    partial table [P, A*L] in its place, for a caller that sums several tables in one launch
    (``column_sum.column_sums``). ``launch``: as ``_launch``'s."""
    lanes = x.shape[-1] // a
    dst, part = _launch(x, alpha, a, lanes, x.shape[0], in_mode=True, out=out, other=fwd,
                        width=width, rope=rope, launch=launch)
    return dst, (column_sum(part).view(a, lanes) if summed else part)


def walsh_out_gain_raw(y: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor, a: int,
                       out: torch.Tensor | None = None, summed: bool = True,
                       launch: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(walsh_out_raw(y, scale), fp32 [A, L] sum over tokens of x * walsh_out_raw(y, None)) in
    one pass: a walsh_in's backward, dx = alpha * S H du and dalpha from du = y, alpha = scale
    and the saved input x [N, A*L]; y's rows may be wider than L (what lies past L reaches no
    result). ``summed=False``: the partial table [P, A*L] in the sum's place (as
    ``walsh_in_gain_raw``'s); ``launch``: as ``_launch``'s."""
    lanes = x.shape[-1] // a
    dst, part = _launch(y, scale, a, lanes, y.shape[1], in_mode=False, out=out, other=x,
                        width=y.shape[2], launch=launch)
    return dst, (column_sum(part).view(a, lanes) if summed else part)


# -- autograd: ops (``walsh.kernels.registry``) --------------------------------------------------
# The gains' gradients are computed inside ops (the transforms' backward passes below). Written
# as torch ops (a product, a sum over N, a view to [A, L]) inside the backward, the compiled
# backward under torch 2.11 returned a flat [A*L] gradient once N reached 16k tokens
# ("CompiledFunctionBackward returned an invalid gradient ... got [768] but expected [32, 24]";
# 2k and 4k tokens passed); as ops they did not. The cause inside inductor was not pinned down.
def _walsh_in_fake(x, alpha):
    a = alpha.shape[0]
    return x.new_empty(a, x.shape[0], x.shape[1] // a)


@kernel_op("walsh::walsh_in", _walsh_in_fake)
def _walsh_in_op(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return walsh_in_raw(x, alpha, alpha.shape[0])


def _in_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _in_backward(ctx, du):
    x, alpha = ctx.saved_tensors
    # the op (not the raw launcher), so that compile can trace the backward with fake tensors
    dx, dalpha = _walsh_out_gain_op(du, alpha, x)  # alpha * S H du, sum x * S H du
    return dx, dalpha.to(alpha.dtype)


_walsh_in_op.register_autograd(_in_backward, setup_context=_in_setup)


def _walsh_out_fake(y, beta):
    return y.new_empty(y.shape[1], y.shape[0] * beta.shape[1])


@kernel_op("walsh::walsh_out", _walsh_out_fake)
def _walsh_out_op(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return walsh_out_raw(y, beta, beta.shape[0], lanes=beta.shape[1])


def _out_setup(ctx, inputs, output):
    ctx.width = inputs[0].shape[2]  # dy's rows are as wide as y's
    ctx.save_for_backward(output, inputs[1])  # out (= beta * S H y) for dbeta, not y


def _out_backward(ctx, dout):
    out, beta = ctx.saved_tensors
    # S H (beta dout), sum dout * out / beta
    dy, dbeta = _walsh_in_gain_op(dout, beta, out, ctx.width)
    return dy, dbeta.to(beta.dtype)


_walsh_out_op.register_autograd(_out_backward, setup_context=_out_setup)


# the backward passes: a transform with its gain's gradient in the same pass (no autograd)
def _walsh_in_gain_fake(x, alpha, fwd, width):
    a, lanes = alpha.shape
    return (x.new_empty(a, x.shape[0], width), x.new_empty(a, lanes, dtype=torch.float32))


@kernel_op("walsh::walsh_in_gain", _walsh_in_gain_fake)
def _walsh_in_gain_op(x: torch.Tensor, alpha: torch.Tensor, fwd: torch.Tensor, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return walsh_in_gain_raw(x, alpha, fwd, alpha.shape[0], width=width)


def _walsh_out_gain_fake(y, scale, x):
    a = scale.shape[0]
    return (y.new_empty(y.shape[1], x.shape[1]),  # x's lanes (y's rows may be wider)
            y.new_empty(a, x.shape[1] // a, dtype=torch.float32))


@kernel_op("walsh::walsh_out_gain", _walsh_out_gain_fake)
def _walsh_out_gain_op(y: torch.Tensor, scale: torch.Tensor, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return walsh_out_gain_raw(y, scale, x, scale.shape[0])


# -- functional -------------------------------------------------------------------------------
def walsh_in(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x [N, A*L], alpha [A, L] (x's dtype) -> u [A, N, L] = S H (alpha * x) per token."""
    _check("walsh_in", x, alpha)
    return _walsh_in_op(x, alpha)


def walsh_out(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """y [A, N, L], beta [A, L] (y's dtype) -> out [N, A*L] = beta * (S H y), token-major
    (saved for dbeta: an in-place change of it before the backward raises autograd's error)."""
    _check("walsh_out", y, beta)
    if y.ndim != 3 or beta.shape[1] != y.shape[2]:
        raise ValueError(f"walsh_out: y {tuple(y.shape)} and beta {tuple(beta.shape)} do not fit "
                         "y [A, N, L], beta [A, L]")
    return _walsh_out_op(y, beta)
