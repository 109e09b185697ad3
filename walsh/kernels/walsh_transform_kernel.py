"""The Triton kernel of the Walsh-Hadamard transforms (``walsh.kernels.walsh_transform``).

One kernel serves every pass: walsh_in (token-major x -> block-major u = S H (alpha * x)),
walsh_out (block-major y -> token-major out = beta * S H y), each optionally with its gain's
gradient summed in the same pass (``GAIN``), groups of layers that share an input (``P``;
``walsh.kernels.walsh_group``), the MLP's down projection with SwiGLU's product inside
(``SWIGLU``; ``walsh.kernels.walsh_swiglu``), and attention's q and k projections with RoPE
applied to their output (``ROPE``). The launchers, ops and the naive references are
in ``walsh.kernels.walsh_transform``, whose module doc gives the math.

How the A blocks are mixed (``_transform``): rows of at most ``walsh_launch.
BUTTERFLY_MAX_LANES`` lanes, and every row when A < 16, by log2(A) butterfly stages in fp32
registers (session 33: at 24 lanes the dx + dalpha pass 37 -> 29 us on an H200, where the
tensor-core dot's operand and result layouts cost shared-memory round trips); wider rows by a
tensor-core dot with H (before session 33 rows of A < 16 summed a broadcast product instead).

Precision: the slab is held in fp32, products and sums accumulate in fp32, and S and beta are
applied in fp32 before the one rounding to the output dtype (the naive butterfly rounds at each
of its log2(A) stages). The butterflies add the fp32 slab as it is, so a bf16 walsh_in's
alpha * x is not rounded to bf16 first as on the dot (below): the two paths differ by that
rounding, each within the tests' bounds of the naive path. The dot's operands follow the
input dtype:
- bf16: a bf16 ``tl.dot``. H (+-1) and bf16 inputs are exact in bf16; walsh_in rounds alpha * x
  to bf16 first, as the naive path does. Before session 11 this was a TF32 dot (alpha * x kept
  10 mantissa bits); bf16 operands take fewer registers (the TF32 slabs spilled at 172 lanes),
  and on an H200 the plain transforms and walsh_out + dalpha took 3-11% less time, walsh_in +
  dbeta 21-28% less with its 3-stage loop (``GAIN_STAGES``; docs/benchmarks.md, session 11).
  Under the Triton interpreter (CI) the same bf16-rounded operands go through an fp32 dot
  (``_bf16_values``): the interpreter's bf16 dot multiplies the raw bits (triton 3.9); and its
  cast to bf16 truncates, so bf16 results are rounded to nearest before the store there
  (``_stored``), as the GPU's cast does; both helpers are in ``walsh.kernels.bf16_round``.
- fp16: a TF32 dot (fp16 values are exact in TF32, not in bf16).
- fp32: an IEEE dot (no TF32): fp32 matches the reference to ~1e-7.
"""

from __future__ import annotations

import triton
import triton.language as tl

from walsh.kernels.bf16_round import _bf16_values, _stored


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _hadamard(A: tl.constexpr, LOG_A: tl.constexpr):
    """H [A, A] fp32 with H[h, g] = (-1)^popcount(h & g), built in registers."""
    bits = tl.arange(0, A)[:, None] & tl.arange(0, A)[None, :]
    par = tl.zeros([A, A], dtype=tl.int32)
    for b in tl.static_range(LOG_A):
        par += (bits >> b) & 1
    return 1.0 - 2.0 * (par & 1).to(tl.float32)


@triton.jit
def _butterfly(y, A: tl.constexpr, H: tl.constexpr, M: tl.constexpr):
    """One butterfly stage of y [A, M]: rows r and r + H of each group of 2H rows -> their sum
    and difference. The pair axis is moved last for ``tl.split`` / ``tl.join``; where a thread
    holds the block axis whole the moves are register renames."""
    pairs = tl.permute(tl.reshape(y, [A // (2 * H), 2, H, M]), [0, 2, 3, 1])  # [A/2H, H, M, 2]
    a, b = tl.split(pairs)                                                   # [A/2H, H, M]
    return tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 3, 1, 2]), [A, M])


@triton.jit
def _transform(x, h_mat, inv_sqrt_a, A: tl.constexpr, BT: tl.constexpr, LB: tl.constexpr,
               USE_DOT: tl.constexpr, IEEE: tl.constexpr, BF16_DOT: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """[A, BT, LB] fp32 -> S H x along axis 0, fp32: a tensor-core dot with H (``USE_DOT``,
    ``walsh_launch.use_dot``), or log2(A) butterfly stages in fp32 (A <= 256)."""
    x2 = tl.reshape(x, [A, BT * LB])
    if USE_DOT:
        if BF16_DOT:  # bf16 inputs: x rounded to bf16 (+-1 is exact), fp32 accumulation
            if INTERPRETED:  # the same products, through an fp32 dot (see _bf16_values)
                y = tl.dot(h_mat, _bf16_values(x2), input_precision="ieee")
            else:
                y = tl.dot(h_mat.to(tl.bfloat16), x2.to(tl.bfloat16))  # [A, BT * LB]
        elif IEEE:  # fp32 inputs: exact products, no TF32
            y = tl.dot(h_mat, x2, input_precision="ieee")
        else:  # fp16 inputs: +-1 and fp16 values are exact in TF32, so TF32 loses nothing
            y = tl.dot(h_mat, x2, input_precision="tf32")
    else:
        y = x2
        for s in tl.static_range(8):  # stage s pairs rows A / 2^(s+1) apart, A up to 256
            if (A >> s) >= 2:
                y = _butterfly(y, A, A >> (s + 1), BT * LB)
        tl.static_assert(A <= 256, "butterflies unrolled for up to 256 blocks")
    # S cast to fp32: compiled, inductor passes Python floats as fp64
    return tl.reshape(y, [A, BT, LB]) * tl.cast(inv_sqrt_a, tl.float32)


@triton.jit
def _silu_parts(g):
    """(sigmoid(g), silu(g) = g sigmoid(g)) of fp32 g."""
    sg = tl.sigmoid(g)
    return sg, g * sg


@triton.jit
def _swap_pairs(x, A: tl.constexpr, BT: tl.constexpr, LB: tl.constexpr):
    """x [A, BT, LB] -> x with lanes 2m and 2m + 1 swapped (a split and a join)."""
    x0, x1 = tl.split(tl.reshape(x, [A, BT, LB // 2, 2]))            # [A, BT, LB/2] each
    return tl.reshape(tl.join(x1, x0), [A, BT, LB])


@triton.jit
def _rope_lanes(cos_ptr, sin_ptr, i, j, g, T, N, A: tl.constexpr, L: tl.constexpr):
    """RoPE's per-lane tables (``walsh.layers.common.rope_lanes``, fp32 or fp16 [T, A*L]) at
    tokens i (position i % T), features g*L + j -> (c, s) [A, BT, LB] fp32: the rotated output is
    c * z + s * z', z' the pair partner's value (s = -sin on the pair's first lane). Session
    17's first try gathered [T, D/2] tables per element, pair by pair, and its backward pass
    took 520 us where this one takes 91 (the 1.3B q, H200; docs/benchmarks.md, session 18).
    One head's [T, D] tables read at lane f % D (L2-resident) measured slower in the backward
    (110 us: the modulo breaks the runs) and faster in the forward (59 against 63)."""
    off = (i % T) * (A * L) + g * L + j  # token-major like the data: contiguous runs
    ok = (i < N) & (j < L)
    return (tl.load(cos_ptr + off, mask=ok, other=0.0).to(tl.float32),
            tl.load(sin_ptr + off, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _pick(a, b, c, p: tl.constexpr):
    """The p-th of three values (p a compile-time constant): a group member's gain, source
    or sum. Those past the group's size are never defined and never picked."""
    if p == 0:
        r = a
    elif p == 1:
        r = b
    else:
        r = c
    return r


@triton.jit
def _walsh_kernel(src_ptr, src1_ptr, src2_ptr, dst_ptr, scale_ptr, other_ptr, part_ptr, up_ptr,
                  dst1_ptr, cos_ptr, sin_ptr, N, T, ITERS, inv_sqrt_a, A: tl.constexpr,
                  LOG_A: tl.constexpr, L: tl.constexpr, LP: tl.constexpr, LB: tl.constexpr,
                  BT: tl.constexpr, P: tl.constexpr, IN_MODE: tl.constexpr,
                  HAS_SCALE: tl.constexpr, GAIN: tl.constexpr, SWIGLU: tl.constexpr,
                  ROPE: tl.constexpr,
                  USE_DOT: tl.constexpr, IEEE: tl.constexpr, BF16_DOT: tl.constexpr,
                  INTERPRETED: tl.constexpr, WIDE: tl.constexpr, STAGES: tl.constexpr):
    """ITERS consecutive [A, BT, LB] slabs: BT whole tokens each (program axis 0) times a chunk
    of LB lanes (axis 1; LB a power of 2; token-major lanes past L neither read nor written)
    of every block.
    IN_MODE: src token-major x[i, g*L + j], dst block-major u[h, i, j], alpha[g, j] before H;
    else src block-major y[g, i, j], dst token-major out[i, h*L + j], beta[h, j] after H.
    Block-major rows are LP >= L lanes wide: lanes L..LP-1 are written as zeros (IN_MODE), or
    read (16-byte runs) into result lanes that are never stored or summed.
    GAIN: also the gain gradient sum_i T[i, h*L + j] * Z[i, h*L + j] of two token-major
    tensors, this program's share written to part[program 0, h*L + j] (fp32): in IN_MODE
    T = src (before the scale) and Z = other / scale (other = the forward's out = beta * z; the
    share is divided, 0 where the scale is 0), or Z = other without a scale; else T = other
    and Z = S H src (the result before the scale).
    Offsets are affine in (g, i, j) with L a compile-time constant, so each token's lanes (and
    each block's run of tokens) are read and written as contiguous runs. Offsets are int64
    only when a tensor has 2**31 elements or more (``WIDE``): int32 index math is cheaper.
    STAGES: the token loop's software-pipelining depth (``tl.range``), 0 for the compiler's
    default (``GAIN_STAGES``).
    P (1-3): a group of P layers that share their input (``walsh.kernels.walsh_group``), with
    P gains scale [P, A, L]. IN_MODE: the x slab is read once and P results written, u[p] at
    dst + p * N * A * LP; GAIN needs P = 1. Else: the P block-major sources src, src1, src2
    are read in turn and one result written, out = sum_p scale[p] * S H src_p (the group's
    dx); GAIN: part[program 0, p, h*L + j] = sum_i other * (S H src_p) for each p.
    SWIGLU (P = 1; ``walsh.kernels.walsh_swiglu``): the layer's input is h = silu(gate) * up,
    computed in fp32 from two token-major tensors and never stored. IN_MODE (no GAIN): gate =
    src, up = up_ptr's. Else (GAIN and a scale): gate = other, up = up_ptr's; the gain sum
    takes T = h, and with dh = scale * S H src (the input gradient) the pass writes dgate =
    dh * up * silu'(gate) to dst and dup = dh * silu(gate) to dst1 (token-major).
    ROPE (P = 1; positions i % T; per-lane fp32 or fp16 tables cos, sin [T, A*L],
    ``walsh.layers.common.rope_lanes``): the layer's output is RoPE(z), z = beta * S H y, its
    pairs of lanes (2m, 2m + 1) rotated: r = c * z + s * z' with z' the partner lane's value.
    OUT mode (walsh_out, no GAIN): the result rotated before its store. IN_MODE with GAIN
    (that walsh_out's backward: src = dout of the rotated output, other = the saved rotated
    output): both rotated back first, z = c * r - s * r'."""
    g = tl.arange(0, A)[:, None, None]                                 # [A, 1, 1]
    j = (tl.program_id(1) * LB + tl.arange(0, LB))[None, None, :]      # [1, 1, LB]
    g64 = g.to(tl.int64) if WIDE else g
    if HAS_SCALE:  # the P gains [P, A, L] -> [A, 1, LB] each (hoisted out of the token loop)
        s0 = tl.load(scale_ptr + g * L + j, mask=j < L, other=0.0).to(tl.float32)
        s1 = s0  # stand-ins past the group's size (never picked)
        s2 = s0
        if P > 1:
            s1 = tl.load(scale_ptr + (A + g) * L + j, mask=j < L, other=0.0).to(tl.float32)
        if P > 2:
            s2 = tl.load(scale_ptr + (2 * A + g) * L + j, mask=j < L, other=0.0).to(tl.float32)
    # one group member's block-major plane, A * N * LP elements
    plane = (N.to(tl.int64) if WIDE else N) * (A * LP)
    h_mat = _hadamard(A, LOG_A)                                        # [A, A]
    acc0 = tl.zeros([A, BT, LB], dtype=tl.float32)  # GAIN's sums, one per group member
    acc1 = acc0  # stand-ins past the group's size (never picked)
    acc2 = acc0
    if P > 1:
        acc1 = tl.zeros([A, BT, LB], dtype=tl.float32)
    if P > 2:
        acc2 = tl.zeros([A, BT, LB], dtype=tl.float32)
    for it in tl.range(0, ITERS, num_stages=STAGES if STAGES > 0 else None):
        i = ((tl.program_id(0) * ITERS + it) * BT + tl.arange(0, BT))[None, :, None]  # [1, BT, 1]
        mask = (i < N) & (j < L)                                       # [1, BT, LB]
        i64 = i.to(tl.int64) if WIDE else i
        token_major = i64 * (A * L) + g64 * L + j                      # [A, BT, LB]
        block_major = g64 * N * LP + i64 * LP + j
        if GAIN and not SWIGLU:  # T * Z's token-major operand (IN_MODE: Z = other / scale;
            # else T = other)
            o = tl.load(other_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
        if IN_MODE:
            x = tl.load(src_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            if SWIGLU:  # x = silu(gate) * up
                x = _silu_parts(x)[1] * tl.load(up_ptr + token_major, mask=mask,
                                                other=0.0).to(tl.float32)
            if ROPE:  # dout and out of a rotated output, rotated back (the adjoint):
                # z = c * r - s * r' for r = c * z + s * z' (c^2 + s^2 = 1, s' = -s)
                c, s = _rope_lanes(cos_ptr, sin_ptr, i, j, g, T, N, A, L)
                x = c * x - s * _swap_pairs(x, A, BT, LB)
                o = c * o - s * _swap_pairs(o, A, BT, LB)
            if GAIN:  # T = x before alpha
                acc0 += x * o
            for p in tl.static_range(P):
                xs = x
                if HAS_SCALE:
                    xs = x * _pick(s0, s1, s2, p)
                y = _transform(xs, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT,
                               INTERPRETED)                            # [A, BT, LB]
                # block-major rows take the padding lanes' zeros too
                tl.store(dst_ptr + p * plane + block_major, _stored(y, dst_ptr, INTERPRETED),
                         mask=(i < N) & (j < LP))
        elif SWIGLU:  # P = 1: dh = scale * S H src; gate and up read after the transform,
            # so that no slab but the sum is held across it (at 172 lanes a slab is 64 fp32
            # registers a thread)
            y = _transform(tl.load(src_ptr + block_major, mask=(i < N) & (j < LP),
                                   other=0.0).to(tl.float32),
                           h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT, INTERPRETED)
            gate = tl.load(other_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(up_ptr + token_major, mask=mask, other=0.0).to(tl.float32)
            sg, silu = _silu_parts(gate)
            acc0 += silu * up * y  # T = h
            y = y * s0  # dh
            tl.store(dst1_ptr + token_major, _stored(y * silu, dst1_ptr, INTERPRETED),
                     mask=mask)
            # silu'(gate) = sg (1 + gate (1 - sg)) = sg + silu (1 - sg)
            y = y * up * (sg + silu * (1.0 - sg))
            tl.store(dst_ptr + token_major, _stored(y, dst_ptr, INTERPRETED), mask=mask)
        else:
            for p in tl.static_range(P):
                # block-major rows are read with their padding lanes (j < LP): a mask of
                # j < L would split each row into runs of gcd(L, 8) lanes (4 at the 1.3B FFN's
                # 172, 2 at the 350M's 86), where LP's rows are 16-byte runs. The transform
                # mixes blocks, never lanes, so whatever the padding holds stays in lanes past
                # L, which are never stored or summed. Measured on an H200 (session 13,
                # docs/benchmarks.md), bit-equal: walsh_out + dalpha 260 -> 226 us at 172
                # lanes, 139 -> 116 us at 86
                src = _pick(src_ptr, src1_ptr, src2_ptr, p)
                x = tl.load(src + block_major, mask=(i < N) & (j < LP),
                            other=0.0).to(tl.float32)                  # [A, BT, LB]
                y = _transform(x, h_mat, inv_sqrt_a, A, BT, LB, USE_DOT, IEEE, BF16_DOT,
                               INTERPRETED)
                if GAIN:  # Z = S H src_p, before the scale
                    if p == 0:
                        acc0 += o * y
                    if p == 1:
                        acc1 += o * y
                    if p == 2:
                        acc2 += o * y
                if HAS_SCALE:
                    y = y * _pick(s0, s1, s2, p)
                if ROPE:  # P = 1: out = c * z + s * z', z = beta * S H y, z' its pair
                    # partner's value, moved between lanes on the transform's result. A second
                    # transform of the pair-swapped slab instead took 104 us where this takes
                    # 63 (the 1.3B q, H200; docs/benchmarks.md, session 18)
                    c, s = _rope_lanes(cos_ptr, sin_ptr, i, j, g, T, N, A, L)
                    y = c * y + s * _swap_pairs(y, A, BT, LB)
                if p == 0:
                    total = y
                else:
                    total += y
            tl.store(dst_ptr + token_major, _stored(total, dst_ptr, INTERPRETED), mask=mask)
    if GAIN:  # [A, LB]: masked tokens added zeros; lanes past L (0 * padding, maybe NaN) unstored
        gj = tl.reshape(g, [A, 1])
        jj = tl.reshape(j, [1, LB])
        row = tl.program_id(0).to(tl.int64) * (P * A * L)  # once per program: int64 either way
        for p in tl.static_range(P):
            share = tl.sum(_pick(acc0, acc1, acc2, p), axis=1)         # [A, LB]
            if IN_MODE and HAS_SCALE:  # sum dout * out / beta: z's share (0 where beta is 0)
                s2d = tl.reshape(s0, [A, LB])
                share = tl.where(s2d != 0.0, share / tl.where(s2d != 0.0, s2d, 1.0), 0.0)
            tl.store(part_ptr + row + (p * A + gj) * L + jj, share, mask=jj < L)
