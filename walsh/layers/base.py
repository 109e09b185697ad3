"""The common base of every linear layer in the library, and the dense ``TernaryLinear``.

A layer keeps fp32 latent weights (ZeRO-friendly ordinary parameters). Per forward it derives
the effective weight (ternary absmean codes times scale, straight-through, or the latent weight
itself when ``ternary=False``) and runs its algebra's product. Every layer exposes
``dense_weight()`` -> [out, in], the exact effective matrix, so that
``layer(x) == x @ layer.dense_weight().T (+ bias)``; tests hold every fast path to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walsh.quant import (
    TERNARY_RMS_RETENTION,
    act_quant_ste,
    ternary_quantize,
    ternary_ste,
    ternary_ste_and_codes,
)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute ``x`` in: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Cast ``x`` to the autocast dtype when autocast is on, so element-wise work runs narrow."""
    return x.to(compute_dtype(x))


class StructuredLinear(nn.Module):
    """Base: latent ``weight`` [A, n_out, n_in] (A = 1 for dense), optional ternary and bias.

    Args:
        in_features, out_features: the layer's dense shape; both divisible by ``blocks``.
        blocks: A, the number of algebra components (1 for dense).
        ternary: quantize the latent weight to {-1, 0, +1} * gamma each forward.
        per_component_scale: one absmean gamma per algebra component instead of per tensor.
        act_bits: None, or 8 for per-token 8-bit activation quantization (straight-through).
        bias: add a full-precision bias (off in the LM, LLaMA style).
        init_scale: extra factor on the init std (1 / sqrt(2 n_layer) for residual outputs).
        int8_matmul: run the product on INT8 tensor cores (``walsh.kernels.int8_linear``): the
            same function as ternary weights with ``act_bits=8`` computed in int32, so it needs
            both and one scale per tensor; layers with a materialized dense weight only.
        int8_dx: with ``int8_matmul``, the input gradient's GEMM in INT8 as well (the
            incoming gradient quantized per token: an approximation, see the kernel's docs).
    """

    weight_decay_names: tuple[str, ...] = ("weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: int = 1,
        ternary: bool = True,
        per_component_scale: bool = False,
        act_bits: int | None = None,
        bias: bool = False,
        init_scale: float = 1.0,
        int8_matmul: bool = False,
        int8_dx: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if val % blocks:
                raise ValueError(f"{name}={val} is not divisible by the algebra dim {blocks}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits}")
        if int8_matmul and not (ternary and act_bits == 8 and not per_component_scale):
            raise ValueError("int8_matmul needs ternary=True, act_bits=8 and "
                             f"per_component_scale=False, got {ternary}, {act_bits}, "
                             f"{per_component_scale}")
        if int8_dx and not int8_matmul:
            raise ValueError("int8_dx needs int8_matmul=True")
        self.int8_matmul, self.int8_dx = int8_matmul, int8_dx
        if int8_matmul:  # fail at build time if triton is absent
            try:
                from walsh.kernels.int8_linear import int8_linear
            except ImportError as e:
                raise ImportError(f"int8_matmul needs the triton package: {e}") from e
            self._int8_linear = int8_linear
        self.in_features, self.out_features, self.blocks = in_features, out_features, blocks
        self.n_in, self.n_out = in_features // blocks, out_features // blocks
        self.ternary, self.per_component_scale = ternary, per_component_scale
        self.act_bits, self.init_scale = act_bits, init_scale
        self.weight = nn.Parameter(torch.empty(blocks, self.n_out, self.n_in))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    # -- init -------------------------------------------------------------------------------
    def fan_in(self) -> int:
        """Effective fan-in of one output (in for dense and Cayley-Dickson, n_in for Walsh)."""
        return self.in_features

    def reset_parameters(self) -> None:
        std = self.init_scale / math.sqrt(self.fan_in())
        if self.ternary:
            std /= TERNARY_RMS_RETENTION  # rounding removes variance; keep the gain ~1
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    # -- weights ----------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        """[A, n_out, n_in]: gamma * Q (straight-through) if ternary, else the latent weight."""
        if self.ternary:
            return ternary_ste(self.weight, self.per_component_scale)
        return self.weight

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ternary codes int8 [A, n_out, n_in] and the absmean scale (for export and tests)."""
        return ternary_quantize(self.weight, self.per_component_scale)

    def materialize(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Component weights [A, n_out, n_in] (any dtype) -> the dense [out, in] matrix."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        return self.materialize(self.effective_weight())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return act_quant_ste(x, self.act_bits) if self.act_bits else x

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        """x_q @ dense_weight().T (+ bias): by F.linear, or in int32 on the INT8 tensor cores
        (``int8_matmul``)."""
        if not self.int8_matmul:
            return F.linear(self.quantize_input(x), self.dense_weight(), self.bias)
        x = autocast_input(x)
        # one quantization gives both the effective weight (autograd's path to the latent
        # weight) and the int8 codes, each materialized to [out, in]; gamma rounded as w's
        # entries are, so the INT8 product and w's backward agree
        w_eff, codes, gamma = ternary_ste_and_codes(self.weight)  # [A, n_out, n_in] x2, scalar
        w = self.materialize(w_eff).to(x.dtype)  # entries +-gamma or 0
        out = self._int8_linear(x.reshape(-1, self.in_features), w, self.int8_dx,
                                self.materialize(codes), gamma.to(x.dtype))  # [N, out]
        out = out.view(*x.shape[:-1], self.out_features)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    # -- accounting -------------------------------------------------------------------------
    def path(self) -> str:
        """How this layer computes its product, for logs: e.g. ``"TernaryLinear: INT8 GEMM,
        INT8 dx"`` (the trainer and the dry run print each path with its layer count)."""
        if self.int8_matmul:
            how = "INT8 GEMM" + (", INT8 dx" if self.int8_dx else "")
        else:
            how = "one GEMM" if self.blocks == 1 else "materialized, one GEMM"
        return f"{type(self).__name__}: {how}"

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of the computation this layer really runs (2 per MAC)."""
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, A={self.blocks}, "
            f"ternary={self.ternary}, act_bits={self.act_bits}, bias={self.bias is not None}"
            + (", int8_matmul=True" if self.int8_matmul else "")
            + (", int8_dx=True" if self.int8_dx else "")
        )


class TernaryLinear(StructuredLinear):
    """Dense BitLinear (A = 1). With ``ternary=False`` it is a plain ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, **kw) -> None:
        kw.pop("blocks", None)
        super().__init__(in_features, out_features, blocks=1, **kw)

    def materialize(self, w: torch.Tensor) -> torch.Tensor:
        return w[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.dense_forward(x)
