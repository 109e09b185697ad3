"""Cayley-Dickson tables, the layer sign matrix, Hadamard matrices and the fast WHT
(MODEL_SPEC sections 2-3)."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import rel_err

from walsh.algebra import (
    cayley_dickson_table,
    cd_conjugate,
    cd_multiply,
    fwht,
    hadamard_matrix,
    layer_sign_matrix,
)

CD_DIMS = (1, 2, 4, 8, 16)

# MODEL_SPEC section 2, A = 8 (rows = output component i, columns = input component j).
SPEC_TABLE_8 = """
+-------
+++-+--+
+-++++--
++-++-+-
+---++++
++-+-+-+
+++--++-
+-++--++
"""






def basis(dim: int, i: int, dtype=torch.float64) -> torch.Tensor:
    e = torch.zeros(dim, dtype=dtype)
    e[i] = 1.0
    return e


def conj_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[..., :1], -x[..., 1:]), dim=-1)


def cd_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent reference: the doubling rule (a,b)(c,d) = (ac - conj(d) b, d a + b conj(c))."""
    dim = x.shape[-1]
    if dim == 1:
        return x * y
    n = dim // 2
    a, b = x[..., :n], x[..., n:]
    c, d = y[..., :n], y[..., n:]
    return torch.cat(
        (cd_ref(a, c) - cd_ref(conj_ref(d), b), cd_ref(d, a) + cd_ref(b, conj_ref(c))), dim=-1
    )


# -- Cayley-Dickson table ---------------------------------------------------------------------


@pytest.mark.parametrize("dim", CD_DIMS)
def test_table_index_is_xor(dim):
    """index[i, j] == i ^ j and the sign table holds only +-1."""
    index, sign = cayley_dickson_table(dim)
    assert index.shape == sign.shape == (dim, dim)
    for i in range(dim):
        for j in range(dim):
            assert int(index[i, j]) == i ^ j
    assert bool(((sign == 1) | (sign == -1)).all())


@pytest.mark.parametrize("dim", CD_DIMS)
def test_table_unit_and_imaginary_squares(dim):
    """e_0 is the unit (sign[0, j] = sign[j, 0] = +1) and e_i^2 = -1 for i > 0."""
    _, sign = cayley_dickson_table(dim)
    assert torch.equal(sign[0, :], torch.ones(dim))
    assert torch.equal(sign[:, 0], torch.ones(dim))
    diag = torch.diagonal(sign)
    assert diag[0] == 1
    assert torch.equal(diag[1:], -torch.ones(dim - 1))


@pytest.mark.parametrize("dim", CD_DIMS)
def test_cd_multiply_matches_doubling_rule(dim, gen):
    """cd_multiply equals an independent recursive implementation of the doubling formula."""
    x = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    assert rel_err(cd_multiply(x, y), cd_ref(x, y)) < 1e-12
    # and on basis elements exactly (the sign table itself)
    _, sign = cayley_dickson_table(dim)
    for i in range(dim):
        for j in range(dim):
            prod = cd_ref(basis(dim, i), basis(dim, j))
            assert torch.equal(prod, float(sign[i, j]) * basis(dim, i ^ j))


@pytest.mark.parametrize("dim", CD_DIMS)
def test_conjugate_gives_norm(dim, gen):
    """x * conj(x) = |x|^2 e_0 in every Cayley-Dickson algebra."""
    x = torch.randn(5, dim, generator=gen, dtype=torch.float64)
    prod = cd_multiply(x, cd_conjugate(x))
    expected = torch.zeros_like(x)
    expected[:, 0] = (x * x).sum(-1)
    assert rel_err(prod, expected) < 1e-12


def _triple_products(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_a e_b) e_c and e_a (e_b e_c) for every basis triple, each [dim, dim, dim, dim]."""
    e = torch.eye(dim, dtype=torch.float64)
    shape = (dim, dim, dim, dim)
    ea = e[:, None, None, :].expand(shape)
    eb = e[None, :, None, :].expand(shape)
    ec = e[None, None, :, :].expand(shape)
    left = cd_multiply(cd_multiply(ea, eb), ec)
    right = cd_multiply(ea, cd_multiply(eb, ec))
    return left, right


@pytest.mark.parametrize("dim", (1, 2, 4))
def test_associative_for_small_dims(dim):
    """(e_a e_b) e_c == e_a (e_b e_c) exactly for every basis triple when A <= 4."""
    left, right = _triple_products(dim)
    assert torch.equal(left, right)


@pytest.mark.parametrize("dim", (1, 2, 4))
def test_associative_random_elements(dim, gen):
    """Associativity on random elements for A <= 4 (fp64)."""
    x, y, z = (torch.randn(8, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    left = cd_multiply(cd_multiply(x, y), z)
    right = cd_multiply(x, cd_multiply(y, z))
    assert rel_err(left, right) < 1e-12


@pytest.mark.parametrize("dim", (8, 16))
def test_not_associative_for_octonions_and_up(dim):
    """There are basis triples with (e_a e_b) e_c != e_a (e_b e_c) for A >= 8; e.g. e1, e2, e4."""
    left, right = _triple_products(dim)
    bad = (left != right).any(dim=-1)
    assert bool(bad.any()), "expected a non-associative basis triple"
    # basis triples only ever associate or anti-associate
    assert torch.equal(left[bad], -right[bad])
    assert bool(bad[1, 2, 4])


@pytest.mark.parametrize("dim", (2, 4, 8))
def test_alternative_up_to_octonions(dim, gen):
    """x(xy) = (xx)y and (yx)x = y(xx) for random x, y (fp64), A <= 8."""
    x = torch.randn(16, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(16, dim, generator=gen, dtype=torch.float64)
    xx = cd_multiply(x, x)
    assert rel_err(cd_multiply(x, cd_multiply(x, y)), cd_multiply(xx, y)) < 1e-12
    assert rel_err(cd_multiply(cd_multiply(y, x), x), cd_multiply(y, xx)) < 1e-12


@pytest.mark.parametrize("dim", (1, 2, 4, 8))
def test_norm_multiplicative_up_to_octonions(dim, gen):
    """|xy| = |x||y| for random elements (fp64, rel 1e-12), A <= 8."""
    x = torch.randn(32, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(32, dim, generator=gen, dtype=torch.float64)
    lhs = cd_multiply(x, y).norm(dim=-1)
    rhs = x.norm(dim=-1) * y.norm(dim=-1)
    assert ((lhs - rhs).abs() / rhs).max().item() < 1e-12


def test_sedenions_not_alternative(gen):
    """A = 16: x(xy) != (xx)y for random elements (well beyond rounding)."""
    x = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    assert rel_err(cd_multiply(x, cd_multiply(x, y)), cd_multiply(cd_multiply(x, x), y)) > 1e-3


def test_sedenions_not_norm_multiplicative(gen):
    """A = 16: |xy| != |x||y| in general."""
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    lhs = cd_multiply(x, y).norm(dim=-1)
    rhs = x.norm(dim=-1) * y.norm(dim=-1)
    assert ((lhs - rhs).abs() / rhs).max().item() > 1e-3


def _pair_sums(dim: int) -> torch.Tensor:
    """All elements e_a + s e_b with a < b, s = +-1: shape [dim*(dim-1), dim] (fp64)."""
    rows = []
    for a, b in itertools.combinations(range(dim), 2):
        for s in (1.0, -1.0):
            v = torch.zeros(dim, dtype=torch.float64)
            v[a], v[b] = 1.0, s
            rows.append(v)
    return torch.stack(rows)


def _zero_products(dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    p = _pair_sums(dim)
    e = torch.eye(dim, dtype=torch.float64)
    table = cd_multiply(e[:, None, :].expand(dim, dim, dim), e[None, :, :].expand(dim, dim, dim))
    prod = torch.einsum("ni,mj,ijk->nmk", p, p, table)  # exact: small integers in fp64
    hits = (prod == 0).all(dim=-1).nonzero().tolist()
    return [(p[i], p[j]) for i, j in hits]


def test_sedenion_zero_divisors_exist():
    """Exhaustive search over (e_a +- e_b)(e_c +- e_d) finds nonzero x, y with xy = 0 (A = 16)."""
    hits = _zero_products(16)
    assert hits, "expected sedenion zero divisors"
    x, y = hits[0]
    assert x.abs().sum() > 0 and y.abs().sum() > 0
    assert torch.equal(cd_multiply(x, y), torch.zeros(16, dtype=torch.float64))
    assert torch.equal(cd_ref(x, y), torch.zeros(16, dtype=torch.float64))


def test_octonions_have_no_pair_zero_divisors():
    """The same search for A = 8 finds nothing (octonions are a division algebra)."""
    assert _zero_products(8) == []


# -- layer sign matrix ------------------------------------------------------------------------


def test_layer_sign_matrix_8_matches_spec_table():
    """layer_sign_matrix(8) equals the table printed in MODEL_SPEC section 2, exactly."""
    rows = SPEC_TABLE_8.split()
    expected = torch.tensor([[1.0 if c == "+" else -1.0 for c in r] for r in rows])
    assert expected.shape == (8, 8)
    assert torch.equal(layer_sign_matrix(8), expected)


@pytest.mark.parametrize("dim", CD_DIMS)
def test_layer_sign_matrix_is_right_multiplication(dim):
    """S[i, j] is the sign of e_j e_{i^j} (y = x * w: input on the left)."""
    _, sign = cayley_dickson_table(dim)
    s = layer_sign_matrix(dim)
    for i in range(dim):
        for j in range(dim):
            assert s[i, j] == sign[j, i ^ j]


@pytest.mark.parametrize("dim", (0, 3, 5, 6, 12, 32))
def test_invalid_cd_dims_raise(dim):
    """Only A in {1, 2, 4, 8, 16} is accepted by the table builders."""
    with pytest.raises(ValueError):
        cayley_dickson_table(dim)
    with pytest.raises(ValueError):
        layer_sign_matrix(dim)


# -- Hadamard matrix ----------------------------------------------------------------------------


def _popcount_sign(g: int, h: int) -> float:
    return -1.0 if bin(g & h).count("1") % 2 else 1.0


@pytest.mark.parametrize("n", (1, 2, 4, 8, 32))
def test_hadamard_entries_exact(n):
    """Unnormalized H[g, h] == (-1)^popcount(g & h) exactly; symmetric."""
    h = hadamard_matrix(n, normalized=False)
    expected = torch.tensor([[_popcount_sign(g, k) for k in range(n)] for g in range(n)])
    assert torch.equal(h, expected)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", (1, 2, 4, 8, 32))
def test_hadamard_normalized_involution(n):
    """Normalized H is symmetric, H @ H = I, and equals the unnormalized one / sqrt(n)."""
    h = hadamard_matrix(n)
    assert torch.equal(h, h.T)
    assert (h @ h - torch.eye(n)).abs().max().item() < 1e-6
    assert rel_err(h, hadamard_matrix(n, normalized=False) / n**0.5) < 1e-7


@pytest.mark.parametrize("n", (0, 3, 6, 12, 33))
def test_hadamard_non_power_of_two_raises(n):
    """A size that is not a power of two raises ValueError."""
    with pytest.raises(ValueError):
        hadamard_matrix(n)


# -- fast Walsh-Hadamard transform -------------------------------------------------------------

FWHT_SHAPES = {-1: (3, 5, 8), 0: (16, 3, 5), 1: (3, 4, 7)}


@pytest.mark.parametrize("dim", (-1, 0, 1))
@pytest.mark.parametrize("normalized", (True, False))
def test_fwht_matches_hadamard_matrix(dim, normalized, gen):
    """fwht(x, dim) equals hadamard_matrix applied along dim (odd other sizes)."""
    x = torch.randn(FWHT_SHAPES[dim], generator=gen)
    n = x.shape[dim]
    h = hadamard_matrix(n, normalized=normalized)
    ref = torch.movedim(torch.movedim(x, dim, -1) @ h.T, -1, dim)
    out = fwht(x, dim=dim, normalized=normalized)
    assert out.shape == x.shape
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("n", (1, 2, 4, 32))
def test_fwht_last_dim_sizes(n, gen):
    """fwht on [5, n] equals x @ H for n from 1 to 32."""
    x = torch.randn(5, n, generator=gen)
    assert rel_err(fwht(x), x @ hadamard_matrix(n)) < 1e-6


def test_fwht_non_contiguous_input(gen):
    """A transposed (non-contiguous) input gives the same result as its contiguous copy."""
    x = torch.randn(5, 8, 3, generator=gen).transpose(0, 1)  # [8, 5, 3], non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(fwht(x, dim=0), fwht(x.contiguous(), dim=0))
    ref = torch.einsum("gk,knc->gnc", hadamard_matrix(8), x)
    assert rel_err(fwht(x, dim=0), ref) < 1e-6


@pytest.mark.parametrize("dim", (-1, 0, 1))
def test_fwht_self_inverse(dim, gen):
    """The normalized transform is its own inverse."""
    x = torch.randn(FWHT_SHAPES[dim], generator=gen)
    assert rel_err(fwht(fwht(x, dim=dim), dim=dim), x) < 1e-6


def test_fwht_unnormalized_twice_scales_by_n(gen):
    """Unnormalized twice = n * identity."""
    x = torch.randn(3, 16, generator=gen)
    assert rel_err(fwht(fwht(x, normalized=False), normalized=False), 16 * x) < 1e-6


@pytest.mark.parametrize("dim,shape", [(-1, (3, 5, 6)), (0, (3, 4, 5)), (1, (2, 12, 3))])
def test_fwht_non_power_of_two_raises(dim, shape):
    """A non-power-of-two size along the transform dim raises ValueError."""
    with pytest.raises(ValueError):
        fwht(torch.zeros(shape), dim=dim)


def test_fwht_gradient_is_transform(gen):
    """Backward of the (symmetric, orthogonal) normalized transform is the transform itself."""
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    g = torch.randn(4, 8, generator=gen)
    (gx,) = torch.autograd.grad(fwht(x), x, g)
    assert rel_err(gx, fwht(g)) < 1e-6
