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
