"""Walsh-Hadamard structured linear layer (the "Hadamard 32D" layer), A = 2^k blocks.

With X[g] the A input slices (n_in each), alpha [A, n_in], beta [A, n_out] (init 1, no decay):
    U = H (alpha * X)      across the block axis, a real O(A log A) butterfly (``fwht``)
    Y_g = W_g U_g          A independent [n_out, n_in] GEMMs (one batched ``bmm``)
    out = beta * (H Y)     flattened
Closed form (a dyadic convolution): out_h = beta_h * sum_k V_{h^k} (alpha_k * x_k) with
V_m = (1/A) sum_g (-1)^popcount(g & m) W_g.  Parameters in*out/A + A*(n_in + n_out).

Implementations with the same result, chosen by ``impl`` (a config value, never an
environment switch). One gradient aside: where a beta lane is exactly 0, ``"triton"`` gives it
dbeta = 0 (it recovers S H Y from its saved output, ``walsh.kernels.walsh_transform``) and the
others the true sum; beta starts at 1 and is not decayed, so training does not meet this.
- ``"blocks"`` (default): the structured path above, in*out/A multiply-adds per token plus
  (in + out) log2(A) additions, in plain PyTorch (the reference).
- ``"dense"``: materialize the closed form [out, in] once per forward and run one GEMM (dense
  FLOPs, but one cuBLAS call; measured in docs/benchmarks.md).
- ``"triton"``: the structured path in Triton (``walsh.kernels.walsh_linear``, one op per layer
  for forward and one for backward): each transform is one kernel fused with its gain and layout
  change (in the backward also with the gain's gradient), the A GEMMs one batched call
  (``walsh.kernels.block_matmul``: Triton on narrow rows, cuBLAS on wide), and the ternary
  weight is quantized by ``walsh.kernels.ternary``; needs ``triton`` and CUDA (or
  ``TRITON_INTERPRET=1`` on CPU). The fastest path at every preset width (an H200, session 29:
  walsh-h-1b3 at 1.99x the dense model, walsh-h-125m at 1.10x; docs/benchmarks.md; slower than
  ``"dense"`` at 768 until session 22). Layers that share an input (the model's q, k, v and
  gate, up) run as one op (``shared_input``, config ``walsh_group``), which reads the input once
  and writes one input gradient (``walsh.kernels.walsh_group``). The MLP's down projection
  computes SwiGLU's silu(gate) * up in its own passes (``swiglu_down``, config ``walsh_swiglu``;
  ``walsh.kernels.walsh_swiglu``). Attention's q and k come out rotated by RoPE (``fuse_rope``,
  config ``walsh_rope``; the transform kernel's ROPE). With gate, up a group and the product
  inside down, the whole MLP is one op (``fuse_mlp``, config ``walsh_mlp``;
  ``walsh.kernels.walsh_mlp``).
- ``"fused"``: as ``"triton"``, with the whole forward (transform, A GEMMs, transform, gains)
  in one kernel per token tile, so that the activations cross HBM once each way and only x is
  saved for the backward. Measured slower than ``"triton"`` (Triton's batched dot; see
  docs/benchmarks.md); kept as the lower-memory path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walsh.algebra import _is_power_of_two, fwht
from walsh.layers.base import StructuredLinear, autocast_input
from walsh.quant import ternary_ste

WALSH_IMPLS = ("blocks", "dense", "triton", "fused")
_KERNEL_IMPLS = ("triton", "fused")


# The block transforms of the structured path, in PyTorch: the "blocks" implementation and the
# naive references of the fused kernels in walsh.kernels.walsh_transform (same signatures).
def walsh_in_naive(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x [N, A*L], alpha [A, L] -> u [A, N, L] = S H (alpha * x) per token, S = 1/sqrt(A)."""
    a, lanes = alpha.shape
    # the block axis leads so the bmm that follows needs no further copy
    u = x.reshape(-1, a, lanes).transpose(0, 1) * alpha[:, None, :]  # [A, N, L]
    return fwht(u, dim=0)


def walsh_out_naive(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """y [A, N, L], beta [A, L] -> out [N, A*L] = beta * (S H y), token-major."""
    a, n_tok, lanes = y.shape
    out = fwht(y, dim=0) * beta[:, None, :]  # [A, N, L]
    return out.transpose(0, 1).reshape(n_tok, a * lanes)


class WalshLinear(StructuredLinear):
    """``in -> out`` layer with ``blocks`` Walsh-Hadamard-mixed blocks."""

    weight_decay_names = ("weight",)  # alpha and beta are gains: never decayed

    def __init__(
        self, in_features: int, out_features: int, blocks: int = 32, impl: str = "blocks", **kw
    ) -> None:
        if not _is_power_of_two(blocks) or blocks < 2:
            raise ValueError(f"Walsh blocks must be a power of two >= 2, got {blocks}")
        if impl not in WALSH_IMPLS:
            raise ValueError(f"Walsh impl must be one of {WALSH_IMPLS}, got {impl!r}")
        if kw.get("int8_matmul"):
            # V's codes are integers (sums of A ternary codes) times one scale gamma / A, but the
            # gain alpha sits between the activation quantizer and the product, so alpha * x_q
            # is no integer operand. Quantizing alpha * x instead was built and measured
            # (session 8): the gains then act on the activations, whose extra passes made
            # walsh-h-125m 0.83x dense against 0.95x for the fake-quant path; reverted
            raise ValueError("int8_matmul is for dense and Cayley-Dickson layers, not Walsh")
        self.impl = impl
        self._kernel_fns = None  # the Triton functions, resolved here and not per forward
        if impl in _KERNEL_IMPLS:  # fail at build time, naming the config value, if no triton
            try:
                from walsh.kernels.ternary import ternary_ste as quantize
                from walsh.kernels.walsh_group import walsh_group
                from walsh.kernels.walsh_linear import walsh_linear
                from walsh.kernels.walsh_mlp import walsh_mlp
                from walsh.kernels.walsh_swiglu import swiglu_linear
            except ImportError as e:
                raise ImportError(f"walsh_impl={impl!r} needs the triton package: {e}") from e
            self._kernel_fns = {"quantize": quantize, "walsh_linear": walsh_linear,
                                "walsh_group": walsh_group, "swiglu_linear": swiglu_linear,
                                "walsh_mlp": walsh_mlp}
        super().__init__(in_features, out_features, blocks=blocks, **kw)
        self.alpha = nn.Parameter(torch.ones(blocks, self.n_in))
        self.beta = nn.Parameter(torch.ones(blocks, self.n_out))
        self.in_group = 0  # the size of its shared_input group, 0 alone (``group_layers``)
        self.swiglu_input = False  # computes silu(gate) * up itself (``fuse_swiglu``)
        self.rope_output = False  # rotates its output by RoPE inside its op (``fuse_rope``)
        self.in_mlp = False  # one of an MLP's three layers run as one op (``fuse_mlp``)

    def fan_in(self) -> int:
        return self.n_in  # each output sees one block's worth of (mixed) inputs

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "alpha"):
            with torch.no_grad():
                self.alpha.fill_(1.0)
                self.beta.fill_(1.0)

    def dense_weight(self) -> torch.Tensor:
        """[out, in]: block (h, k) = diag(beta_h) V_{h^k} diag(alpha_k)."""
        a = self.blocks
        w = self.effective_weight()  # [A, n_out, n_in]
        v = fwht(w, dim=0, normalized=True) / math.sqrt(a)  # V_m = (1/A) sum_g H_mg W_g
        idx = torch.arange(a, device=w.device)
        blocks = v[idx[:, None] ^ idx[None, :]]  # [A(h), A(k), n_out, n_in]
        blocks = blocks * self.beta[:, None, :, None] * self.alpha[None, :, None, :]
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:  # [..., in] -> [..., out]
        """``rope``: RoPE's per-lane tables (cos, sin) [T, out] (``rope_lanes``) for a layer
        ``fuse_rope`` marked: the output ([..., T, out]) comes rotated."""
        if rope is not None and not self.rope_output:
            raise ValueError("WalshLinear: rope is for layers that fuse_rope marked")
        check_rope_rows(x, rope)
        x = self.quantize_input(x)
        if self.impl == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        x = autocast_input(x)
        w, alpha, beta = self._operands(x.dtype)
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if self._kernel_fns:  # one op: [N, in] -> [N, out]
            out = self._kernel_fns["walsh_linear"](x2, w, alpha, beta,
                                                   one_kernel=self.impl == "fused", rope=rope)
        else:  # transform, A GEMMs, transform, in torch ops
            y = torch.bmm(walsh_in_naive(x2, alpha), w.transpose(1, 2))  # [A, N, n_out]
            out = walsh_out_naive(y, beta)  # [N, out]
        return self._finish(out, x.shape)

    def _operands(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w [A, n_out, n_in], alpha [A, n_in], beta [A, n_out]) in dtype dt, w quantized."""
        k = self._kernel_fns
        quantize = k["quantize"] if k else ternary_ste
        if self.ternary:
            w = quantize(self.weight, self.per_component_scale, dt)  # [A, n_out, n_in]
        else:
            w = self.weight.to(dt)
        return w, self.alpha.to(dt), self.beta.to(dt)

    def _finish(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[N, out] -> [..., out] (the input's leading dims), plus the bias."""
        out = out.view(*shape[:-1], self.out_features)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def path(self) -> str:
        """The config's path, and on ``triton`` where its block GEMMs run (Triton or cuBLAS by
        the rows' width: ``walsh.kernels.block_matmul``)."""
        return (f"WalshLinear: walsh_impl={self.impl}" + (" (grouped)" if self.in_group else "")
                + (" (silu(gate) * up inside)" if self.swiglu_input else "")
                + (" (the MLP as one op)" if self.in_mlp else "")
                + (" (RoPE inside)" if self.rope_output else "") + self._gemm_path())

    def _gemm_path(self) -> str:
        if self.impl != "triton":
            return ""
        from walsh.kernels.block_matmul import gemm_paths  # needs triton, as the path does
        from walsh.kernels.walsh_transform import row_width

        lanes_in, lanes_out = (row_width(f // self.blocks)
                               for f in (self.in_features, self.out_features))
        return f" ({gemm_paths(lanes_in, lanes_out)})"

    def flops_per_token(self) -> int:
        if self.impl == "dense":
            return 2 * self.in_features * self.out_features
        log_a = int(math.log2(self.blocks))
        scales = self.in_features + self.out_features  # alpha and beta multiplies
        transforms = (self.in_features + self.out_features) * log_a
        return 2 * self.in_features * self.out_features // self.blocks + transforms + scales

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"


def _on_kernels(m) -> bool:
    """A Walsh layer on the ``triton`` path without activation quantization (which would give
    it an input of its own): what a parent may run inside a kernel op of its own."""
    return isinstance(m, WalshLinear) and m.impl == "triton" and not m.act_bits


def groupable(layers) -> bool:
    """Whether ``shared_input`` runs these layers as one op: 2 or 3 layers ``_on_kernels``
    with one weight shape."""
    first = layers[0]
    return 2 <= len(layers) <= 3 and all(
        _on_kernels(m) and m.weight.shape == first.weight.shape and m.ternary == first.ternary
        and m.per_component_scale == first.per_component_scale for m in layers)


def group_layers(layers) -> None:
    """At build time, by the module that feeds these layers one input: where ``groupable``,
    mark them a group (``in_group``: ``shared_input`` runs them as one op, their ``path`` says
    so, and the roofline costs their shared passes once; under ZeRO-3 their parent runs inside
    a leaf module, ``pipeline.parallelize``)."""
    ok = groupable(layers)
    for m in layers:
        if isinstance(m, WalshLinear):
            m.in_group = len(layers) if ok else 0


def shared_input(layers, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """[m(x) for m in layers]; for layers that ``group_layers`` marked as this group, as one op
    (``walsh.kernels.walsh_group``) that reads x once and writes one input gradient. It reads
    the layers' parameters from the caller's forward, not theirs: under ZeRO-3 the caller must
    run inside a leaf module (each transformer block, ``pipeline.parallelize``), whose hook
    gathers its whole subtree's parameters.
    ``rope``: (cos, sin), passed to the layers that ``fuse_rope`` marked (the leading ones)."""
    marked = [bool(getattr(m, "rope_output", False)) for m in layers]
    if rope is not None and marked != sorted(marked, reverse=True):
        raise ValueError("shared_input: the layers that rotate their output by RoPE (fuse_rope) "
                         f"must lead (the group op rotates its first outputs), got {marked}")
    if any(getattr(m, "in_group", 0) != len(layers) for m in layers):
        return [m(x, rope=rope) if r else m(x) for m, r in zip(layers, marked)]
    check_rope_rows(x, rope)
    x = autocast_input(x)
    ops = [m._operands(x.dtype) for m in layers]  # [(w, alpha, beta)] per layer
    n_rope = sum(marked) if rope is not None else 0
    outs = layers[0]._kernel_fns["walsh_group"](x.reshape(-1, x.shape[-1]),
                                                 *(list(t) for t in zip(*ops)),
                                                 rope=rope if n_rope else None, n_rope=n_rope)
    return [m._finish(o, x.shape) for m, o in zip(layers, outs)]


def fuse_swiglu(down) -> None:
    """At build time, by the SwiGLU that feeds ``down`` silu(gate) * up: where ``down`` is
    ``_on_kernels``, mark it (``swiglu_input``: ``swiglu_down`` runs it on gate and up as one
    op, its ``path`` says so, and the roofline costs it so; under ZeRO-3 its parent runs inside
    a leaf module, ``pipeline.parallelize``)."""
    if isinstance(down, WalshLinear):
        down.swiglu_input = _on_kernels(down)


def swiglu_down(down, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up); for a layer that ``fuse_swiglu`` marked, as one op
    (``walsh.kernels.walsh_swiglu``) that computes the product in the layer's own passes and
    never stores it. It reads the layer's parameters from the caller's forward: under ZeRO-3
    the caller must run inside a leaf module (each transformer block,
    ``pipeline.parallelize``)."""
    if not getattr(down, "swiglu_input", False):
        return down(F.silu(gate) * up)
    gate, up = autocast_input(gate), autocast_input(up)
    w, alpha, beta = down._operands(gate.dtype)
    out = down._kernel_fns["swiglu_linear"](gate.reshape(-1, gate.shape[-1]),
                                            up.reshape(-1, up.shape[-1]), w, alpha, beta)
    return down._finish(out, gate.shape)


def fuse_mlp(gate, up, down) -> bool:
    """At build time, by the SwiGLU of these layers, after ``group_layers`` (gate, up) and
    ``fuse_swiglu`` (down): where gate and up are marked a group of two and down computes the
    product inside, none with a bias (a bias on gate or up would sit inside the chained pass),
    down's blocks those of gate's output, on hidden rows of at most
    ``walsh_launch.MLP_MAX_LANES`` (176, the widest measured: the 1.3B's 172 lanes padded, run
    as one op since session 29's chunked backward), mark all three (``in_mlp``:
    ``mlp_one_op`` runs them as one op, ``walsh.kernels.walsh_mlp``; their ``path`` says so,
    and the roofline costs the chained passes). Returns whether it marked them."""
    ok = (getattr(gate, "in_group", 0) == 2 and getattr(up, "in_group", 0) == 2
          and getattr(down, "swiglu_input", False)
          and all(m.bias is None for m in (gate, up, down))
          and down.blocks == gate.blocks and down.n_in == gate.n_out)
    if ok:  # and hidden rows the chained pass runs faster than the passes apart
        from walsh.kernels.walsh_launch import MLP_MAX_LANES, row_width

        ok = row_width(gate.n_out) <= MLP_MAX_LANES
    for m in (gate, up, down):
        if isinstance(m, WalshLinear):
            m.in_mlp = ok
    return ok


def mlp_one_op(gate, up, down, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for layers that ``fuse_mlp`` marked, as one op. It reads the
    layers' parameters from the caller's forward: under ZeRO-3 the caller must run inside a
    leaf module (each transformer block, ``pipeline.parallelize``)."""
    x = autocast_input(x)
    ops = [m._operands(x.dtype) for m in (gate, up, down)]  # [(w, alpha, beta)] per layer
    out = down._kernel_fns["walsh_mlp"](x.reshape(-1, x.shape[-1]),
                                        *(list(t) for t in zip(*ops)))
    return down._finish(out, x.shape)


def check_rope_rows(x: torch.Tensor, rope) -> None:
    """RoPE's tables [T, ..] fit x [B, T, in]: the kernel takes row i's position as i % T, so a
    table of another length would rotate by wrong positions without an error."""
    if rope is not None and (x.ndim != 3 or x.shape[1] != rope[0].shape[0]):
        raise ValueError(f"RoPE inside needs x as [B, T, in] with T = the tables' "
                         f"{rope[0].shape[0]} rows, got x {tuple(x.shape)}")


def fuse_rope(layers, head_dim: int) -> bool:
    """At build time, by attention for its q and k: where every one is a Walsh layer on the
    ``triton`` path without activation quantization or bias (a bias added after the rotation
    would be a different function), whose blocks hold whole pairs of lanes (out_features / A
    even) in heads of ``head_dim``, mark them (``rope_output``: they rotate their output by
    RoPE inside their walsh_out pass, and rotate back inside the backward's walsh_in; their
    ``path`` says so). Returns whether it marked them; otherwise the caller rotates."""
    ok = all(_on_kernels(m) and m.bias is None and m.n_out % 2 == 0
             and m.out_features % head_dim == 0 for m in layers)
    for m in layers:
        if isinstance(m, WalshLinear):
            m.rope_output = ok
    return ok


def run_by_parent(module) -> bool:
    """Whether ``module``'s parent runs it inside an op of its own (``group_layers``,
    ``fuse_swiglu``), reading its parameters from the parent's forward."""
    return bool(getattr(module, "in_group", 0) or getattr(module, "swiglu_input", False))
