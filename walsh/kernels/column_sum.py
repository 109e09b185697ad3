"""Column sums of kernels' fp32 partial results: the last step of the fused gain gradients.

The Walsh transforms' gain passes (``walsh.kernels.walsh_transform``, ``walsh_linear``), the
one-pass du + dW block GEMM (``walsh.kernels.block_matmul``), the MLP's chained backward
(``walsh.kernels.walsh_mlp``) and the one-kernel layer (``walsh_linear``'s ``_launch``,
``walsh_impl="fused"``, which sums its one table with ``column_sum``) write one row of
partial sums per program, part [P, C] fp32 (in the transforms P = ceil(tokens /
GAIN_TOKENS), or GAIN_NARROW_TOKENS, and C = A * L; in the one-kernel layer P = ceil(tokens /
BLOCK_M); in the block GEMM P = the token splits and C = G * M * K), and the gradient is
their sum over rows.
Each column's rows are added in one program, in a fixed order, BLOCK_R rows at a time:
deterministic, no atomics.

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

Several tables in one launch (``column_sums``, up to ``MAX_TABLES``; session 31): a layer's
backward op makes 3 to 7 tables (dbeta, dW and dalpha per layer), each of which took one
launch of about 3.3 us on an H200 (192 launches in a walsh-h-125m step, 0.63 ms: session 30's
profile), far more than the tables' bytes take. The backward ops now keep their tables and sum
them all at the end, in one launch: the programs are dealt to the tables in order,
ceil(C_k / BLOCK_C) each, and each table is summed by the same tiles in the same order as
``column_sum`` alone would (bit-equal under the interpreter; compiled, the in-tile reduction
tree is the compiler's choice for each kernel, and on an H200 the batched kernel's last bits
differed from the one-table kernel's: fp32 rounding, deterministic run to run).

Code order: naive reference, kernels, launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from walsh.kernels.registry import WIDE_NUMEL, wrap_triton

# [BLOCK_R, BLOCK_C] fp32 tiles on 4 warps: the sweep's best at 256 x 768-3072 and 1,024 x 3072
# (module doc); within 3% of the best at 256 x 5504, 0.25 us behind at 16 rows
BLOCK_R, BLOCK_C = 512, 16
# tables one launch takes (the kernel's argument slots; a group of three layers makes 7)
MAX_TABLES = 8


def column_sum_naive(part: torch.Tensor) -> torch.Tensor:
    """part [P, C] -> [C], the sum over rows, in part's dtype."""
    return part.sum(0)


@triton.jit
def _table_sum(src_ptr, dst_ptr, R, C, pid, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               WIDE: tl.constexpr):
    """dst[c] = sum_r src[r, c] for the BLOCK_C columns of this table's program pid, rows in
    order; src [R, C] contiguous."""
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)                          # [BLOCK_C]
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)                                 # [BLOCK_R]
        r = r.to(tl.int64) if WIDE else r
        tile = tl.load(src_ptr + r[:, None] * C + c[None, :],
                       mask=(r[:, None] < R) & (c[None, :] < C), other=0.0)  # [BLOCK_R, BLOCK_C]
        acc += tl.sum(tile, axis=0)
    tl.store(dst_ptr + c, acc, mask=c < C)


@triton.jit
def _column_sums_kernel(s0, d0, r0, c0, s1, d1, r1, c1, s2, d2, r2, c2, s3, d3, r3, c3,
                        s4, d4, r4, c4, s5, d5, r5, c5, s6, d6, r6, c6, s7, d7, r7, c7,
                        TABLES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        WIDE: tl.constexpr):
    """Table k's sums (s_k [r_k, c_k] -> d_k [c_k]) by programs e_{k-1} .. e_k - 1, e_k the
    running total of ceil(c_k / BLOCK_C); slots past TABLES are never read. Written out per
    slot: a Triton kernel takes no list of pointers, and a pointer table in memory would
    cost each program a dependent load before its first tile."""
    pid = tl.program_id(0)
    e0 = tl.cdiv(c0, BLOCK_C)
    if pid < e0:
        _table_sum(s0, d0, r0, c0, pid, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 1:
        e1 = e0 + tl.cdiv(c1, BLOCK_C)
        if (pid >= e0) & (pid < e1):
            _table_sum(s1, d1, r1, c1, pid - e0, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 2:
        e2 = e1 + tl.cdiv(c2, BLOCK_C)
        if (pid >= e1) & (pid < e2):
            _table_sum(s2, d2, r2, c2, pid - e1, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 3:
        e3 = e2 + tl.cdiv(c3, BLOCK_C)
        if (pid >= e2) & (pid < e3):
            _table_sum(s3, d3, r3, c3, pid - e2, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 4:
        e4 = e3 + tl.cdiv(c4, BLOCK_C)
        if (pid >= e3) & (pid < e4):
            _table_sum(s4, d4, r4, c4, pid - e3, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 5:
        e5 = e4 + tl.cdiv(c5, BLOCK_C)
        if (pid >= e4) & (pid < e5):
            _table_sum(s5, d5, r5, c5, pid - e4, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 6:
        e6 = e5 + tl.cdiv(c6, BLOCK_C)
        if (pid >= e5) & (pid < e6):
            _table_sum(s6, d6, r6, c6, pid - e5, BLOCK_R, BLOCK_C, WIDE)
    if TABLES > 7:
        e7 = e6 + tl.cdiv(c7, BLOCK_C)
        if (pid >= e6) & (pid < e7):
            _table_sum(s7, d7, r7, c7, pid - e6, BLOCK_R, BLOCK_C, WIDE)


def column_sums(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """parts[k] [P_k, C_k] fp32 -> [C_k] fp32 each, the sums over rows, ``MAX_TABLES`` tables
    a launch (each summed as ``column_sum`` sums it alone: module doc)."""
    for k, part in enumerate(parts):
        if part.ndim != 2 or part.dtype != torch.float32:
            raise ValueError(f"column_sums: table {k} must be a 2-D fp32 tensor, got "
                             f"{tuple(part.shape)} {part.dtype}")
    parts = [p.contiguous() for p in parts]
    # every column written by the kernel; tables without rows sum to 0 there too
    outs = [torch.empty(p.shape[1], device=p.device, dtype=torch.float32) for p in parts]
    live = [(p, o) for p, o in zip(parts, outs) if p.shape[1] > 0]
    for s in range(0, len(live), MAX_TABLES):
        batch = live[s:s + MAX_TABLES]
        slots = []
        for p, o in batch:
            slots += [p, o, p.shape[0], p.shape[1]]
        for _ in range(MAX_TABLES - len(batch)):  # unused slots (TABLES bounds them): empties
            # of their own, never aliases of a table (compile tracks each argument's writes)
            slots += [batch[0][0].new_empty(0), batch[0][1].new_empty(0), 0, 0]
        programs = sum(triton.cdiv(p.shape[1], BLOCK_C) for p, _ in batch)
        wrap_triton(_column_sums_kernel)[(programs,)](
            *slots, TABLES=len(batch), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            WIDE=max(p.numel() for p, _ in batch) >= WIDE_NUMEL)
    return outs


def column_sum(part: torch.Tensor) -> torch.Tensor:
    """part [P, C] fp32 -> [C] fp32, the sum over rows (``column_sum_naive``'s signature)."""
    if part.ndim != 2 or part.dtype != torch.float32:
        raise ValueError(f"column_sum takes a 2-D fp32 tensor, got {tuple(part.shape)} "
                         f"{part.dtype}")
    return column_sums([part])[0]
