"""Column sums of a kernel's fp32 partial results: the last step of a fused gain gradient.

The Walsh transforms' gain passes (``walsh.kernels.walsh_transform``, ``walsh_linear``) write one
row of partial sums per program, part [P, C] fp32 (in the transforms P = ceil(tokens /
GAIN_TOKENS), or GAIN_NARROW_TOKENS, and C = A * L; in the one-kernel layer P = ceil(tokens /
BLOCK_M) and C = A * LD), and the gradient is their sum over rows. Each column's rows are added
in one program, in a fixed order, BLOCK_R rows at a time: deterministic, no atomics.

Why a kernel of its own rather than ``part.sum(0)``: on an H200, inside CUDA graphs, torch's
reduction took 5.1-5.4 us for every P = 256 partial table from C = 768 to 5,504 columns (0.8-5.6
MB; 1.3 us of HBM time at the most), a sixth of the 24-lane gain passes' 32 us kernel. This
kernel spreads the columns over programs of BLOCK_C and reads each program's rows in one or a
few [BLOCK_R, BLOCK_C] tiles. Swept (docs/benchmarks.md, session 12; us at 256 x 768 / 256 x
5504 / 1024 x 3072 / 16 x 768): 512 x 16 took 1.9 / 2.6 / 3.7 / 1.7, 256 x 32 2.0 / 2.5 / 4.8 /
1.6, 128 x 32 2.6 / 2.9 / 7.2 / 1.5, 64 x 32 4.0 / 4.4 / 12.7 / 1.5; torch 5.1 / 5.4 / 8.6 /
2.6. In the compiled models the change is within noise (walsh-h-1b3 +0.2%, walsh-h-125m
+0.7%): compiled, inductor traces the op bodies (``walsh.kernels.registry``) and would have
made its own reduction kernel of ``part.sum(0)`` (not profiled).

Code order: naive reference, kernel, launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.registry import WIDE_NUMEL, wrap_triton

# [BLOCK_R, BLOCK_C] fp32 tiles on 4 warps: the sweep's best at 256 x 768-3072 and 1,024 x 3072
# (module doc); within 3% of the best at 256 x 5504, 0.25 us behind at 16 rows
BLOCK_R, BLOCK_C = 512, 16


def column_sum_naive(part: torch.Tensor) -> torch.Tensor:
    """part [P, C] -> [C], the sum over rows, in part's dtype."""
    return part.sum(0)


@triton.jit
def _column_sum_kernel(src_ptr, dst_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       WIDE: tl.constexpr):
    """dst[c] = sum_r src[r, c] for this program's BLOCK_C columns, rows in order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)             # [BLOCK_C]
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)                                 # [BLOCK_R]
        r = r.to(tl.int64) if WIDE else r
        tile = tl.load(src_ptr + r[:, None] * C + c[None, :],
                       mask=(r[:, None] < R) & (c[None, :] < C), other=0.0)  # [BLOCK_R, BLOCK_C]
        acc += tl.sum(tile, axis=0)
    tl.store(dst_ptr + c, acc, mask=c < C)


def column_sum(part: torch.Tensor) -> torch.Tensor:
    """part [P, C] fp32 -> [C] fp32, the sum over rows (``column_sum_naive``'s signature)."""
    if part.ndim != 2 or part.dtype != torch.float32:
        raise ValueError(f"column_sum takes a 2-D fp32 tensor, got {tuple(part.shape)} "
                         f"{part.dtype}")
    part = part.contiguous()
    rows, cols = part.shape
    if rows * cols == 0:
        return torch.zeros(cols, device=part.device, dtype=torch.float32)
    out = torch.empty(cols, device=part.device, dtype=torch.float32)  # every column written
    wrap_triton(_column_sum_kernel)[(triton.cdiv(cols, BLOCK_C),)](
        part, out, rows, cols, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, WIDE=part.numel() >= WIDE_NUMEL)
    return out
