"""walsh.kernels.column_sum (the gain passes' last step) against its naive reference, on CPU
under TRITON_INTERPRET=1 (tests/conftest.py) and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV

pytest.importorskip("triton")
from walsh.kernels import column_sum as cs  # noqa: E402


# rows below, at and past one BLOCK_R step; columns below, at and past one (and two) BLOCK_C
# programs
@pytest.mark.parametrize("rows", [1, 3, cs.BLOCK_R - 1, cs.BLOCK_R, cs.BLOCK_R + 1, 300])
@pytest.mark.parametrize("cols", [1, cs.BLOCK_C - 1, cs.BLOCK_C, cs.BLOCK_C + 1, 2 * cs.BLOCK_C,
                                  770])
def test_column_sum_matches_naive(rows, cols, seed):
    part = torch.randn(rows, cols, device=DEV)
    got = cs.column_sum(part)
    assert got.shape == (cols,) and got.dtype == torch.float32
    # fp32 sums in another order: bounded against each column's sum of magnitudes (a column
    # of random signs can sum to near zero); a row left out would be off by ~1 / rows
    err = (got.double() - cs.column_sum_naive(part.double())).abs() / part.abs().double().sum(0)
    assert err.max().item() < 1e-5, seed


def test_column_sum_exact_on_integers(seed):
    """Small integers add exactly in fp32 in any order: every column equal, none left out or
    counted twice (a masked row or column would show)."""
    part = torch.randint(-50, 50, (cs.BLOCK_R * 2 + 5, cs.BLOCK_C * 3 + 7), device=DEV).float()
    assert torch.equal(cs.column_sum(part), cs.column_sum_naive(part)), seed


@pytest.mark.parametrize("view", ["transposed", "every other column"])
def test_column_sum_of_a_strided_view(view, seed):
    """The launcher makes its input contiguous: a view's strides are not the kernel's."""
    base = torch.randint(-50, 50, (70, 2 * cs.BLOCK_C + 3), device=DEV).float()
    part = base.t() if view == "transposed" else base[:, ::2]
    assert not part.is_contiguous()
    assert torch.equal(cs.column_sum(part), cs.column_sum_naive(part)), seed


def test_column_sum_int64_offsets_bit_equal(monkeypatch, seed):
    """Tables of WIDE_NUMEL elements or more take int64 row offsets; forced on a small table,
    the sums are bit-equal to the int32 path's."""
    part = torch.randn(cs.BLOCK_R + 9, cs.BLOCK_C * 2 + 1, device=DEV)
    narrow = cs.column_sum(part)
    monkeypatch.setattr(cs, "WIDE_NUMEL", 1)
    assert torch.equal(cs.column_sum(part), narrow), seed


def test_column_sums_int64_offsets_bit_equal(monkeypatch, seed):
    """Several tables in one launch on the int64 path (forced, as above): bit-equal to the
    int32 path's sums, table by table, and each within fp32 rounding of the fp64 sum (so a
    fault both paths shared would show too)."""
    parts = [torch.randn(cs.BLOCK_R + 3 * k, 5 + cs.BLOCK_C * k, device=DEV) for k in range(3)]
    narrow = cs.column_sums(parts)
    monkeypatch.setattr(cs, "WIDE_NUMEL", 1)
    for k, (g, want, p) in enumerate(zip(cs.column_sums(parts), narrow, parts, strict=True)):
        assert torch.equal(g, want), (k, seed)
        exact = p.double().sum(0)
        assert ((g.double() - exact).abs() <= 1e-6 * p.double().abs().sum(0)).all(), (k, seed)


def test_column_sum_is_deterministic(seed):
    part = torch.randn(257, 769, device=DEV) * 1e3
    assert torch.equal(cs.column_sum(part), cs.column_sum(part)), seed


def test_column_sum_of_no_rows_is_zeros():
    assert torch.equal(cs.column_sum(torch.empty(0, 5, device=DEV)), torch.zeros(5, device=DEV))


@pytest.mark.parametrize("bad", [torch.ones(4), torch.ones(2, 3, dtype=torch.float64),
                                 torch.ones(2, 3, 4)])
def test_column_sum_rejects_other_inputs(bad):
    with pytest.raises(ValueError, match="2-D fp32"):
        cs.column_sum(bad)


def test_column_sums_match_fp64_per_table(seed):
    """Tables of every kind in one call (rows past BLOCK_R, columns not a BLOCK_C multiple, a
    table without rows, one without columns, more tables than one launch takes): each sum
    within fp32 rounding of the fp64 sum, so no program sums another table's columns or skips
    one of its own rows (a row off moves a column by about 100, the bound is about 0.03).
    Not bit-equal to ``column_sum`` of the table alone on a GPU: the compiler picks each
    kernel's in-tile reduction tree (on an H200 the last bits differed); run to run each is
    deterministic (``test_column_sum_deterministic``)."""
    shapes = [(300, 770), (cs.BLOCK_R + 1, cs.BLOCK_C + 1), (1, 3), (0, 5), (7, 0), (8, 18432),
              (256, 96), (3, cs.BLOCK_C), (2, 1), (600, 33)]
    assert len(shapes) > cs.MAX_TABLES  # two launches
    parts = [torch.randn(r, c, device=DEV) * 100 for r, c in shapes]
    got = cs.column_sums(parts)
    again = cs.column_sums(parts)
    assert [tuple(g.shape) for g in got] == [(c,) for _, c in shapes]
    for k, (g, p) in enumerate(zip(got, parts)):
        assert g.dtype == torch.float32
        assert torch.equal(g, again[k]), (k, seed)
        exact = p.double().sum(0)
        bound = 1e-6 * p.double().abs().sum(0)
        assert ((g.double() - exact).abs() <= bound).all(), (k, seed)


@pytest.mark.parametrize("tables", [1, 2, cs.MAX_TABLES - 1, cs.MAX_TABLES])
def test_column_sums_exact_on_integers(tables, seed):
    """Every table's columns exact (small integers add exactly in any order) for each number
    of a launch's slots in use."""
    parts = [torch.randint(-50, 50, (5 + 97 * k, 3 + 11 * k), device=DEV).float()
             for k in range(tables)]
    for k, (g, p) in enumerate(zip(cs.column_sums(parts), parts)):
        assert torch.equal(g, cs.column_sum_naive(p)), (k, seed)


def test_column_sums_names_the_bad_table():
    good = torch.zeros(2, 3, device=DEV)
    with pytest.raises(ValueError, match=r"table 1 must be a 2-D fp32 tensor, got \(2, 3\) "
                                         r"torch.float16"):
        cs.column_sums([good, good.half()])
