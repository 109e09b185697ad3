"""Roofline time of a training step from each kernel's FLOPs and bytes (``walsh bench train``).

For each kernel that a step runs in the structured linear layers (forward and backward, the path
each layer's config selects), in attention and in the tied LM head, the roofline time is
    max(bf16 FLOPs / peak + int8 ops / (2 peak), bytes / bandwidth)
and the step's roofline is their sum. The ceilings are measured (``walsh bench layer``'s copy
and 8192^3 bf16 GEMM); INT8 tensor cores count at twice the bf16 rate (Hopper's ratio).

Counted: each kernel's operands read once and its results written once; activations bf16
(2 B), latent weights fp32 (the ternary quantizer reads them twice and writes bf16), weight
gradients written in their dtype. The kernel lists follow ``walsh.kernels.walsh_linear`` (the
three-kernel and one-kernel paths), ``walsh.kernels.int8_linear`` and the dense GEMM path;
the PyTorch ``blocks`` path is costed as the three-kernel one, with its du and dW GEMMs
apart where the ``triton`` path does them in one pass over dy (rows of at most 96 lanes).
A layer in a group of P that shares its input (``walsh.kernels.walsh_group``) is costed with
its 1/P share of the group's read of x (walsh_in, and the dx pass) and of its dx write.
SwiGLU's product is a pass of its own each way (forward: gate, up read, h written; backward:
dh, gate, up read, dgate, dup written), except where the down projection computes it in its
own passes (``walsh.kernels.walsh_swiglu``: its walsh_in reads gate and up, its dx pass reads
du, gate and up and writes dgate and dup), or the whole MLP is one op (``walsh.kernels.
walsh_mlp``: gate and up written once and read once, dgate and dup never stored). RoPE on q
and k is a pass of its own each way (q and k read and written) except where their walsh_out
rotates them (``walsh_rope``; its tables are read from L2 and not counted, nor are the extra
in-register lane moves). Not counted:
normalization and residual passes, embeddings, the optimizer, launch overhead, and the LM head
weight re-read per loss chunk. The sum is therefore a lower bound on a step, and a measured
step over it ("x roof") says how far the whole step is from its kernels' ideal.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from walsh.layers import StructuredLinear, WalshLinear
from walsh.loss import padded_vocab
from walsh.models import WalshLM

ACT = 2  # bytes per activation element (bf16)


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float  # bf16 (or fp32-accumulated 16-bit) tensor-core FLOPs
    int8_ops: float  # INT8 tensor-core operations
    bytes: float

    def ms(self, peak_tflops: float, bandwidth_gbs: float) -> float:
        compute = (self.flops + self.int8_ops / 2) / (peak_tflops * 1e12)
        return 1e3 * max(compute, self.bytes / (bandwidth_gbs * 1e9))


def _walsh_kernels(layer: WalshLinear, n: int) -> list[Kernel]:
    """The structured Walsh path at n tokens: transforms, A batched GEMMs, gains."""
    i, o, a, w = layer.in_features, layer.out_features, layer.blocks, layer.weight.numel()
    g = 2 * n * i * o / a  # the A block GEMMs
    # H counted as [A, A] dots (the kernels' tensor-core dot on wide rows; narrow rows, at
    # most BUTTERFLY_MAX_LANES lanes, add and subtract A log2(A) times instead: bytes bind)
    hi, ho = 2 * a * n * i, 2 * a * n * o
    share = 1 / max(1, layer.in_group)  # of a group's x read and dx write (one per group)
    # the input's passes: walsh_in's reads (x, or gate and up) and the dx pass's reads and
    # writes besides du (x and dx, or gate, up, dgate and dup); in the MLP's one op
    # (``walsh.kernels.walsh_mlp``) the down projection's walsh_in is chained to gate's and up's
    # walsh_out (gate and up not read back) and its dx pass to their walsh_in + dbeta (gate
    # and up read, dgate and dup never written), which then only write dy
    reads_in, dx_pass = (2, 4) if layer.swiglu_input else (share, 2 * share)
    if layer.in_mlp and layer.swiglu_input:  # down: u_d written; du_d, gate, up read
        reads_in, dx_pass = 0, 2
    dout_reads = 0 if layer.in_mlp and not layer.swiglu_input else 2  # dout and out
    if layer.impl == "fused":
        return [
            Kernel("walsh fused fwd", g + hi + ho, 0, ACT * (n * i + n * o + w)),
            Kernel("walsh fused dx+dalpha", g + hi + ho, 0, ACT * (n * o + 2 * n * i + w)),
            Kernel("walsh fused dbeta", g + hi + ho, 0, ACT * (n * i + n * o + w)),
            Kernel("walsh_in (dout, x)", ho + hi, 0, 2 * ACT * (n * o + n * i)),
            Kernel("bmm dw", g, 0, ACT * (n * o + n * i + w)),
        ]
    return [
        Kernel("walsh_in", hi, 0, ACT * n * i * (1 + reads_in)),
        Kernel("bmm fwd", g, 0, ACT * (n * i + n * o + w)),
        # y read, out written (out is saved for dbeta = sum dout * out / beta)
        Kernel("walsh_out", ho, 0, 2 * ACT * n * o),
        # the backward's transforms compute the gains' gradients in the same pass: dout and
        # the saved out read, dy written; du and x read, dx written
        Kernel("walsh_in (dout) + dbeta", ho, 0, (1 + dout_reads) * ACT * n * o),
        Kernel("walsh_out (du) + alpha + dalpha", hi, 0, ACT * n * i * (1 + dx_pass)),
    ] + ([Kernel("bmm dx + dw", 2 * g, 0, ACT * (n * o + 2 * n * i + 2 * w))]  # dy read once
         if _du_dw_in_one_pass(layer) else
         [Kernel("bmm dx", g, 0, ACT * (n * o + n * i + w)),
          Kernel("bmm dw", g, 0, ACT * (n * o + n * i + w))])


def _du_dw_in_one_pass(layer: WalshLinear) -> bool:
    """Whether the layer's du = dy W and dW = dy^T u share one pass over dy: the ``triton``
    path's rule by row width (``walsh.kernels.block_matmul.block_mm_dual``); the ``blocks``
    path's torch.bmm's read dy twice."""
    if layer.impl != "triton":
        return False
    from walsh.kernels.block_matmul import one_pass_du_dw  # needs triton, as the path does
    from walsh.kernels.walsh_transform import row_width

    return one_pass_du_dw(*(row_width(f // layer.blocks)
                            for f in (layer.in_features, layer.out_features)))


def _dense_kernels(layer: StructuredLinear, n: int) -> list[Kernel]:
    """One GEMM per pass on the materialized [out, in] weight (bf16, or INT8 forward/dx)."""
    i, o = layer.in_features, layer.out_features
    f = 2 * n * i * o
    out: list[Kernel] = []
    if layer.blocks > 1:  # blocks -> dense matrix, and its gradient back to the blocks
        p = layer.weight.numel()
        out += [Kernel("materialize", 0, 0, ACT * (p + i * o)),
                Kernel("materialize^T", 0, 0, 4 * (i * o + p))]
    if layer.int8_matmul:
        out.append(Kernel("int8 GEMM fwd", 0, f, n * i + i * o + ACT * n * o))
        if layer.int8_dx:
            out.append(Kernel("int8 GEMM dx", 0, f, n * o + i * o + ACT * n * i))
        else:
            out.append(Kernel("GEMM dx", f, 0, ACT * (n * o + i * o + n * i)))
        out.append(Kernel("x_q from codes", 0, 0, n * i + ACT * n * i))
    else:
        out += [Kernel("GEMM fwd", f, 0, ACT * (n * i + i * o + n * o)),
                Kernel("GEMM dx", f, 0, ACT * (n * o + i * o + n * i))]
    out.append(Kernel("GEMM dw", f, 0, ACT * (n * o + n * i) + 4 * i * o))
    return out


def linear_kernels(layer: StructuredLinear, n: int) -> list[Kernel]:
    """Every kernel of one training step (forward + backward) of ``layer`` at ``n`` tokens."""
    out = []
    if layer.ternary:  # absmean pass and apply pass over the fp32 latent weight, bf16 written
        p = layer.weight.numel()
        out.append(Kernel("ternary quantize", 3 * p, 0, 4 * p + 4 * p + ACT * p))
    if isinstance(layer, WalshLinear) and layer.impl != "dense":
        return out + _walsh_kernels(layer, n)
    return out + _dense_kernels(layer, n)


def model_kernels(model: WalshLM, batch: int, seq_len: int) -> list[Kernel]:
    """The kernels of one training step of ``model`` on ``batch`` sequences of ``seq_len``."""
    c = model.config
    n, d, t = batch * seq_len, c.n_embd, seq_len
    out = [k for layer in model.structured_layers() for k in linear_kernels(layer, n)]
    # SwiGLU's product where the down projection does not compute it (forward: gate, up read,
    # h written; backward: dh, gate, up read, dgate, dup written)
    h = c.mlp_hidden
    apart = sum(not getattr(b.mlp.down, "swiglu_input", False) for b in model.blocks)
    out += apart * [Kernel("SwiGLU fwd", 0, 0, 3 * ACT * n * h),
                    Kernel("SwiGLU bwd", 0, 0, 5 * ACT * n * h)]
    # RoPE where q's and k's walsh_out does not rotate them: q and k read and written, each way
    rope_apart = sum(not getattr(b.attn, "rope_inside", False) for b in model.blocks)
    out += rope_apart * [Kernel("RoPE fwd", 0, 0, 4 * ACT * n * d),
                         Kernel("RoPE bwd", 0, 0, 4 * ACT * n * d)]
    # flash attention: 2 T C FLOPs per token forward (causal), backward twice that; reads
    # q, k, v (and o, do in backward), writes o (dq, dk, dv)
    out += c.n_layer * [Kernel("attention fwd", 2 * n * t * d, 0, 4 * ACT * n * d),
                        Kernel("attention bwd", 4 * n * t * d, 0, 8 * ACT * n * d)]
    # tied head + cross-entropy (walsh.loss): the logits, dh = g W and dW = g^T h all in the
    # forward (h read, W read by two GEMMs, dh written, dW written in fp32); the backward
    # scales the kept dh and dW by the loss's gradient (read and written; dW [W, C] fp32,
    # the vocabulary padded to VOCAB_ALIGN rows, read into [V, C]). The chunk pass over the
    # logits (read, g written) is not counted
    v = padded_vocab(c.vocab_size)
    out += [Kernel("LM head fwd", 6 * n * d * v, 0, ACT * (2 * n * d + 2 * v * d) + 4 * v * d),
            Kernel("LM head bwd", 0, 0, 2 * ACT * n * d + 8 * v * d)]
    return out


def step_roofline_ms(model: WalshLM, batch: int, seq_len: int, peak_tflops: float,
                     bandwidth_gbs: float) -> float:
    """Sum over the step's kernels of each one's roofline time, in ms."""
    return sum(k.ms(peak_tflops, bandwidth_gbs) for k in model_kernels(model, batch, seq_len))


def step_breakdown(model: WalshLM, batch: int, seq_len: int, peak_tflops: float,
                   bandwidth_gbs: float) -> list[tuple[str, int, float]]:
    """The step's roofline by kernel name: (name, kernels of that name per step, ms), slowest
    first; the ms sum to ``step_roofline_ms``. A layer in a group counts its own kernels
    (with its share of the group's passes), so a count is layers' kernels, not launches.
    Set against a profile's kernel times, it says which part of a step is furthest from its
    ideal (``walsh model info --roofline``; docs/benchmarks.md, session 20)."""
    count: dict[str, int] = collections.Counter()
    ms: dict[str, float] = collections.defaultdict(float)
    for k in model_kernels(model, batch, seq_len):
        count[k.name] += 1
        ms[k.name] += k.ms(peak_tflops, bandwidth_gbs)
    return sorted(((name, count[name], ms[name]) for name in count), key=lambda r: -r[2])


def breakdown_table(model: WalshLM, batch: int, seq_len: int, peak_tflops: float,
                    bandwidth_gbs: float) -> str:
    """``step_breakdown`` as text: a header with the step's roofline, then one line per kernel
    name (ms, share, count). Printed by ``walsh model info --roofline`` and appended to the
    summary of ``walsh bench train --profile`` when the run has ceilings, beside the measured
    kernel times."""
    rows = step_breakdown(model, batch, seq_len, peak_tflops, bandwidth_gbs)
    total = sum(r[2] for r in rows)
    lines = [f"roofline of a training step, {batch} x {seq_len} tokens, at {peak_tflops:g} "
             f"TFLOP/s and {bandwidth_gbs:g} GB/s: {total:.2f} ms"]
    lines += [f"  {ms:9.3f} ms {100 * ms / total:5.1f}%  {n:5d}x  {name}" for name, n, ms in rows]
    return "\n".join(lines) + "\n"
