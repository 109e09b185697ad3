"""Cayley-Dickson multiplication tables and the Walsh-Hadamard transform.

Everything here is small, exact integer/sign bookkeeping plus one O(n log n) butterfly. The
tables are built once per (dim, device) and cached; they are tiny (dim <= 16).

Conventions (MODEL_SPEC sections 2-3):
- ``cayley_dickson_table(A)`` returns ``index, sign`` with e_i * e_j = sign[i, j] e_{index[i, j]}
  and index[i, j] = i ^ j.
- A structured layer computes y = x * w (the input multiplies from the left), so output
  component i receives x_j * W_{i^j} e_{i^j} with sign s(j, i^j). ``layer_sign_matrix(A)`` is
  that matrix S[i, j]; for A = 8 it is exactly the table printed in MODEL_SPEC section 2.
- ``hadamard_matrix(n)`` is the Sylvester matrix H[g, h] = (-1)^popcount(g & h) (/ sqrt(n)).
"""

from __future__ import annotations

import functools
import math

import torch

CD_DIMS = (1, 2, 4, 8, 16)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@functools.cache
def _cd_signs(dim: int) -> tuple[tuple[int, ...], ...]:
    """Multiplication signs s(i, j) of the Cayley-Dickson algebra of dimension ``dim``.

    Doubling rule (a, b)(c, d) = (ac - conj(d) b, d a + b conj(c)) with e_i = (e_i, 0) and
    e_{n+i} = (0, e_i) gives, for i, j < n and c(j) = +1 if j == 0 else -1 (conj e_j = c(j) e_j):
        (e_i, 0)(e_j, 0) = (e_i e_j, 0)            -> s(i, j)
        (e_i, 0)(0, e_j) = (0, e_j e_i)            -> s(j, i)
        (0, e_i)(e_j, 0) = (0, e_i conj(e_j))      -> c(j) s(i, j)
        (0, e_i)(0, e_j) = (-conj(e_j) e_i, 0)     -> -c(j) s(j, i)
    """
    if dim == 1:
        return ((1,),)
    n = dim // 2
    s = _cd_signs(n)
    out = [[0] * dim for _ in range(dim)]
    for i in range(n):
        for j in range(n):
            cj = 1 if j == 0 else -1
            out[i][j] = s[i][j]
            out[i][n + j] = s[j][i]
            out[n + i][j] = cj * s[i][j]
            out[n + i][n + j] = -cj * s[j][i]
    return tuple(tuple(r) for r in out)


def _check_cd_dim(dim: int) -> None:
    if dim not in CD_DIMS:
        raise ValueError(f"Cayley-Dickson algebra_dim must be one of {CD_DIMS}, got {dim}")


def cayley_dickson_table(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index[dim, dim] long, sign[dim, dim] float32)``: e_i e_j = sign[i,j] e_{index[i,j]}."""
    _check_cd_dim(dim)
    ar = torch.arange(dim)
    index = ar[:, None] ^ ar[None, :]
    sign = torch.tensor(_cd_signs(dim), dtype=torch.float32)
    return index, sign


def cd_multiply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Product of algebra elements ``x[..., A] * y[..., A]`` (a reference for tests)."""
    dim = x.shape[-1]
    index, sign = cayley_dickson_table(dim)
    sign = sign.to(x.dtype)
    out = torch.zeros(torch.broadcast_shapes(x.shape, y.shape), dtype=x.dtype, device=x.device)
    for i in range(dim):
        for j in range(dim):
            out[..., int(index[i, j])] += sign[i, j] * x[..., i] * y[..., j]
    return out


def cd_conjugate(x: torch.Tensor) -> torch.Tensor:
    """Conjugate of ``x[..., A]``: negate every imaginary component."""
    out = -x
    out[..., 0] = x[..., 0]
    return out


@functools.cache
def _layer_signs(dim: int) -> tuple[tuple[int, ...], ...]:
    s = _cd_signs(dim)
    return tuple(tuple(s[j][i ^ j] for j in range(dim)) for i in range(dim))


def layer_sign_matrix(dim: int) -> torch.Tensor:
    """S[i, j] for y = x * w: output block i gets S[i, j] * W_{i^j} x_j.  Shape [dim, dim]."""
    _check_cd_dim(dim)
    return torch.tensor(_layer_signs(dim), dtype=torch.float32)


def hadamard_matrix(n: int, normalized: bool = True) -> torch.Tensor:
    """Sylvester-ordered Hadamard matrix H[g, h] = (-1)^popcount(g & h), optionally / sqrt(n)."""
    if not _is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    ar = torch.arange(n)
    bits = ar[:, None] & ar[None, :]
    pop = torch.zeros_like(bits)
    for b in range(max(1, n.bit_length())):
        pop += (bits >> b) & 1
    h = (1 - 2 * (pop % 2)).to(torch.float32)
    return h / math.sqrt(n) if normalized else h


def fwht(x: torch.Tensor, dim: int = -1, normalized: bool = True) -> torch.Tensor:
    """Fast Walsh-Hadamard transform along ``dim`` (Sylvester order), O(n log n).

    Equals ``hadamard_matrix(n, normalized)`` applied along ``dim``. Works in place of views of
    shape [pre, n / 2h, 2, h, post] per butterfly stage, so a non-last ``dim`` (the block axis
    of a [N, A, n_in] activation) needs no transpose.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    if not _is_power_of_two(n):
        raise ValueError(f"fwht size along dim {dim} must be a power of two, got {n}")
    pre = math.prod(x.shape[:dim])
    post = math.prod(x.shape[dim + 1 :])
    out_shape = x.shape
    y = x.reshape(pre, n, post)
    h = 1
    while h < n:
        # [pre, n/(2h), 2, h, post]: pair element k with k + h inside each run of 2h.
        y = y.view(pre, n // (2 * h), 2, h, post)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(out_shape)
    if normalized:
        y = y * (1.0 / math.sqrt(n))
    return y
