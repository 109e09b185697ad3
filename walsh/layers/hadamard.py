"""Walsh-Hadamard structured linear layer (the "Hadamard 32D" layer), A = 2^k blocks.

With X[g] the A input slices (n_in each), alpha [A, n_in], beta [A, n_out] (init 1, no decay):
    U = H (alpha * X)      across the block axis, a real O(A log A) butterfly (``fwht``)
    Y_g = W_g U_g          A independent [n_out, n_in] GEMMs (one batched ``bmm``)
    out = beta * (H Y)     flattened
Closed form (a dyadic convolution): out_h = beta_h * sum_k V_{h^k} (alpha_k * x_k) with
V_m = (1/A) sum_g (-1)^popcount(g & m) W_g.  Parameters in*out/A + A*(n_in + n_out).

Three implementations with the same result, chosen by ``impl`` (a config value, never an
environment switch):
- ``"blocks"`` (default): the structured path above, in*out/A multiply-adds per token plus
  (in + out) log2(A) additions, in plain PyTorch (the reference).
- ``"dense"``: materialize the closed form [out, in] once per forward and run one GEMM (dense
  FLOPs, but one cuBLAS call; measured in docs/benchmarks.md).
- ``"triton"``: the structured path in Triton (``walsh.kernels.walsh_linear``, one op
  per layer for forward and one for backward): each transform is one kernel fused with its gain
  and layout change, the A GEMMs one batched cuBLAS call, and the ternary weight is quantized
  by ``walsh.kernels.ternary``; needs ``triton`` and CUDA (or ``TRITON_INTERPRET=1`` on CPU).
- ``"fused"``: as ``"triton"``, with the whole forward (transform, A GEMMs, transform, gains)
  in one kernel per token tile, so that the activations cross HBM once each way and only x is
  saved for the backward. Measured slower than ``"triton"`` (Triton's batched dot; see
  docs/benchmarks.md); kept as the lower-memory path.

8-bit activations (``act_bits=8``) quantize alpha * x, the layer's input after its input gain,
in every implementation: the gain belongs to the input side as an RMSNorm weight does in
BitNet, where the activation is quantized after the norm's gain. (Quantizing x before alpha
would leave the GEMM operand alpha * x_q, which is not integer-valued.) So with ``act_bits``
    out = beta * (Vbig @ q8(alpha * x)),   Vbig block (h, k) = V_{h^k}
and ``layer(x) == act_quant_ste(alpha * x) @ (dense_weight() / alpha).T``.

INT8 (``int8_matmul``, with ``impl="dense"``): V's codes are integers. With W_g = gamma Q_g,
    V_m = (gamma / A) C_m,   C_m = sum_g (-1)^popcount(g & m) Q_g  in [-A, A]
so Vbig is an int8 matrix (for A <= 64) times one scale gamma / A, and the product
q8(alpha * x) @ Vbig^T runs in int32 on the INT8 tensor cores like a dense ternary layer's
(``walsh.kernels.int8_linear``), beta applied after. It is the same function as the
``act_bits=8`` path above (up to the fp32 order of scaling; bf16 rounds Vbig's entries where
the INT8 path applies gamma / A exactly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walsh.algebra import _is_power_of_two, fwht
from walsh.layers.base import StructuredLinear, autocast_input
from walsh.quant import act_quant_ste, ternary_ste, ternary_ste_and_codes

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


def xor_blocks(v: torch.Tensor) -> torch.Tensor:
    """v [A, n_out, n_in] -> [A*n_out, A*n_in] whose block (h, k) is v[h ^ k] (a dyadic
    convolution's matrix; autograd's backward of the gather sums each v[m]'s A copies)."""
    a, n_out, n_in = v.shape
    idx = torch.arange(a, device=v.device)
    blocks = v[idx[:, None] ^ idx[None, :]]  # [A(h), A(k), n_out, n_in]
    return blocks.permute(0, 2, 1, 3).reshape(a * n_out, a * n_in)


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
        if kw.get("int8_matmul") and (impl != "dense" or blocks > 64):
            # the product runs on the materialized integer matrix, whose codes are sums of A
            # ternary codes: int8 holds them up to A = 64
            raise ValueError("int8_matmul on a Walsh layer needs impl='dense' and blocks <= 64, "
                             f"got impl={impl!r}, blocks={blocks}")
        self.impl = impl
        self._kernel_fns = None  # the Triton functions, resolved here and not per forward
        if impl in _KERNEL_IMPLS:  # fail at build time, naming the config value, if no triton
            try:
                from walsh.kernels.ternary import ternary_ste as quantize
                from walsh.kernels.walsh_linear import walsh_linear
            except ImportError as e:
                raise ImportError(f"walsh_impl={impl!r} needs the triton package: {e}") from e
            self._kernel_fns = {"quantize": quantize, "walsh_linear": walsh_linear}
        super().__init__(in_features, out_features, blocks=blocks, **kw)
        self.alpha = nn.Parameter(torch.ones(blocks, self.n_in))
        self.beta = nn.Parameter(torch.ones(blocks, self.n_out))

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
        return self._dense_weight(self.alpha)

    def _dense_weight(self, alpha: torch.Tensor | None) -> torch.Tensor:
        """[out, in] = diag(beta) Vbig diag(alpha) (alpha None: left out)."""
        w = self.effective_weight()  # [A, n_out, n_in]
        v = fwht(w, dim=0, normalized=False) / self.blocks  # V_m = (1/A) sum_g H_mg W_g
        # the gains scale v's copies: [A, 1, A, 1] views of beta [A, n_out] and alpha [A, n_in]
        out = xor_blocks(v) * self.beta.reshape(-1, 1)
        return out * alpha.reshape(1, -1) if alpha is not None else out

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Vbig [out, in], its int8 codes C, gamma / A): Vbig = (gamma / A) C in value, the
        gains left out (module doc)."""
        w_eff, q, gamma = ternary_ste_and_codes(self.weight)  # [A, n_out, n_in] x2, scalar
        a = self.blocks
        v = fwht(w_eff, dim=0, normalized=False) / a  # V_m, autograd's path to the weight
        c = fwht(q.float(), dim=0, normalized=False)  # C_m: integers in [-A, A], exact in fp32
        return xor_blocks(v), xor_blocks(c.to(torch.int8)), (gamma / a).reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        x = autocast_input(x)
        dt = x.dtype
        alpha, beta = self.alpha.to(dt), self.beta.to(dt)
        if self.act_bits:  # the quantized activation is alpha * x (module doc)
            x = x * alpha.reshape(-1)
            if self.int8_matmul:  # quantized inside the INT8 op
                out = self.int8_forward(x) * beta.reshape(-1)
                return out + self.bias.to(out.dtype) if self.bias is not None else out
            x, alpha = act_quant_ste(x, self.act_bits), None
        if self.impl == "dense":
            w = self._dense_weight(self.alpha if alpha is not None else None)  # fp32 gains
            return F.linear(x, w.to(dt), self.bias)
        if alpha is None:  # already applied
            alpha = torch.ones_like(self.alpha, dtype=dt)
        k = self._kernel_fns
        quantize = k["quantize"] if k else ternary_ste
        if self.ternary:
            w = quantize(self.weight, self.per_component_scale, dt)  # [A, n_out, n_in]
        else:
            w = self.weight.to(dt)
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if k:  # one op: [N, in] -> [N, out]
            out = k["walsh_linear"](x2, w, alpha, beta, one_kernel=self.impl == "fused")
        else:  # transform, A GEMMs, transform, in torch ops
            y = torch.bmm(walsh_in_naive(x2, alpha), w.transpose(1, 2))  # [A, N, n_out]
            out = walsh_out_naive(y, beta)  # [N, out]
        out = out.view(*x.shape[:-1], self.out_features)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def flops_per_token(self) -> int:
        if self.impl == "dense":
            return 2 * self.in_features * self.out_features
        log_a = int(math.log2(self.blocks))
        scales = self.in_features + self.out_features  # alpha and beta multiplies
        transforms = (self.in_features + self.out_features) * log_a
        return 2 * self.in_features * self.out_features // self.blocks + transforms + scales

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"
