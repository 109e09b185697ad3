"""Cayley-Dickson structured linear layer (complex, quaternion, octonion, sedenion blocks).

y_i = sum_j S[i, j] * W_{i^j} x_j  (MODEL_SPEC section 2), with S = ``layer_sign_matrix(A)``.
Parameters in*out/A; multiply-adds per token in*out, the same as dense. The fast path
materializes the [out, in] matrix once per forward (A^2 signed copies of A small blocks: cheap
next to the activations) and runs one GEMM; autograd's backward of the gather is the signed
sum of the dense gradient's blocks.
"""

from __future__ import annotations

import torch

from walsh.algebra import layer_sign_matrix
from walsh.layers.base import StructuredLinear


def cd_materialize(w: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Dense matrix of a Cayley-Dickson layer.

    w: [A, n_out, n_in] component weights, sign: [A, A] = S.  Returns [A*n_out, A*n_in] whose
    block (i, j) is S[i, j] * w[i ^ j].
    """
    a, n_out, n_in = w.shape
    idx = torch.arange(a, device=w.device)
    xor = idx[:, None] ^ idx[None, :]  # [A(i), A(j)]
    blocks = w[xor] * sign.to(w.dtype)[:, :, None, None]  # [A, A, n_out, n_in]
    return blocks.permute(0, 2, 1, 3).reshape(a * n_out, a * n_in)


class CayleyDicksonLinear(StructuredLinear):
    """``in -> out`` layer over the Cayley-Dickson algebra of dimension ``algebra_dim``."""

    def __init__(
        self, in_features: int, out_features: int, algebra_dim: int = 8, **kw
    ) -> None:
        sign = layer_sign_matrix(algebra_dim)  # validates algebra_dim
        super().__init__(in_features, out_features, blocks=algebra_dim, **kw)
        self.register_buffer("sign", sign, persistent=False)

    def materialize(self, w: torch.Tensor) -> torch.Tensor:
        return cd_materialize(w, self.sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.dense_forward(x)  # materialize, then one GEMM (bf16 or INT8)
