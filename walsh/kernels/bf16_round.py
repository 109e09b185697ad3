"""bf16 results as the GPU rounds them, also under the Triton interpreter (CI).

Under TRITON_INTERPRET=1 (triton 3.9) ``.to(tl.bfloat16)`` truncates where the GPU's cast
rounds to nearest, and a bf16 ``tl.dot`` multiplies the raw bits. Every kernel that stores
bf16 stores through ``_stored`` (the Walsh transforms, the block GEMM, the one-kernel layer,
the ternary quantizer, the INT8 GEMM); the transforms' bf16 dots take ``_bf16_values``'
operands under the interpreter. On a GPU ``INTERPRETED`` is False and the branch compiles away.
Truncated, a kernel's bf16 outputs lean one way: the CPU bf16 layer test's dbeta error reached
0.0096 of its 1e-2 bound over 40 seeds, 0.0045 rounded (session 22); half of a bf16 ternary
weight's elements came out one ulp under gamma * Q (session 23).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bf16_values(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32: the interpreter's
    stand-in for a bf16 dot's operand, and ``_stored``'s rounding. Bit arithmetic on the fp32
    pattern (finite x): add half an ulp of bf16, less one unless the kept last bit is odd, and
    clear the low 16 bits. A NaN whose low 16 bits are set would come out wrong (0x7F800001
    as inf); arithmetic's NaNs (0x7FC00000) and those of bf16 values have them clear."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _stored(y, ptr, INTERPRETED: tl.constexpr):
    """fp32 y as ptr's elements. Under the interpreter a bf16 y is rounded to nearest first
    (``_bf16_values``), as the GPU's cast rounds where the interpreter's truncates."""
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        y = _bf16_values(y)
    return y.to(ptr.dtype.element_ty)
