"""walsh.kernels.block_matmul (the Walsh layers' per-block GEMMs, and du with dW in one pass
over dy) against torch.bmm: odd sizes, fp32 (1e-5) and bf16 (1e-2) relative bounds, bf16
results rounded once to nearest, exact sums of small integers, every output and partial sum
written (the module's allocations poisoned with NaN), the dispatch rule, the int64 offsets
and the errors. On CPU under TRITON_INTERPRET=1 (tests/conftest.py); the ``gpu`` test repeats
the comparison at the 125M, 350M and 1.3B models' shapes.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DEV, TOL, PoisonedTorch, assert_rounded_once, rel_err

pytest.importorskip("triton")
from walsh.kernels import block_matmul as bm  # noqa: E402
from walsh.kernels import column_sum as cs  # noqa: E402

# (G blocks, N tokens, K lanes in, M lanes out): tokens below, at and past one BT tile, rows
# below the tensor cores' 16, the models' 24 and 64, odd widths
SHAPES = [(3, 37, 24, 24), (2, bm.MM_BT + 1, 5, 64), (4, bm.MM_BT - 1, 64, 7), (1, 1, 16, 16),
          (5, 2 * bm.MM_BT + 3, 24, 40)]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(bm, "torch", PoisonedTorch())


def _operands(g, n, k, m, dtype, scale=1.0):
    """a [G, N, K], the weight's transposed view b [G, K, M] (the forward's), d [G, N, M]."""
    a = (torch.randn(g, n, k, device=DEV) * scale).to(dtype)
    w = (torch.randn(g, m, k, device=DEV) * scale).to(dtype)
    d = (torch.randn(g, n, m, device=DEV) * scale).to(dtype)
    return a, w.transpose(1, 2), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,n,k,m", SHAPES)
def test_block_mm_matches_bmm(g, n, k, m, dtype, poisoned, seed):
    a, b, d = _operands(g, n, k, m, dtype)
    want = torch.bmm(a.double(), b.double())
    got = bm.block_mm_raw(a, b)                    # b a transposed view: the forward's y
    assert got.shape == (g, n, m) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype], seed
    bc = b.contiguous()                            # a contiguous b: the backward's du = dy W
    assert rel_err(bm.block_mm_raw(a, bc), want) < TOL[dtype], seed
    assert_rounded_once(got, want, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,n,k,m", SHAPES)
def test_block_mm_tn_matches_bmm(g, n, k, m, dtype, poisoned, seed):
    a, _, d = _operands(g, n, k, m, dtype)
    want = torch.bmm(d.double().transpose(1, 2), a.double())
    got = bm.block_mm_tn_raw(d, a)
    assert got.shape == (g, m, k) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype], seed
    assert_rounded_once(got, want, seed)


def test_block_mm_tn_splits_of_several_tiles(monkeypatch, poisoned, seed):
    """Few splits: each program loops over several BT tiles, the last one partly past N."""
    monkeypatch.setattr(bm, "TN_SPLIT", 2)
    a, _, d = _operands(3, 5 * bm.TN_BT + 9, 24, 24, torch.float32)
    want = torch.bmm(d.double().transpose(1, 2), a.double())
    assert rel_err(bm.block_mm_tn_raw(d, a), want) < TOL[torch.float32], seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_of_small_integers_are_exact(dtype, monkeypatch, poisoned, seed):
    """Small integers multiply and add exactly in fp32 in any order: a token, lane or block
    left out or counted twice changes the result. y's sums (|y| <= 24 * 9 = 216) are exact in
    bf16 too; dW's exact fp32 sums are rounded to bf16 alike on both sides."""
    monkeypatch.setattr(bm, "TN_SPLIT", 3)
    g, n, k, m = 3, 2 * bm.MM_BT + 5, 24, 8
    a, w, d = (torch.randint(-3, 4, s, device=DEV).to(dtype)
               for s in ((g, n, k), (g, m, k), (g, n, m)))
    assert torch.equal(bm.block_mm_raw(a, w.transpose(1, 2)),
                       torch.bmm(a.float(), w.float().transpose(1, 2)).to(dtype)), seed
    tn = bm.block_mm_tn_raw(d[:, :, :4] // 2, a[:, :, :5] // 3)      # odd widths: 4, 5
    assert torch.equal(tn, torch.bmm(d[:, :, :4].float().transpose(1, 2) // 2,
                                     a[:, :, :5].float() // 3).to(dtype)), seed


# (G, N, K lanes of u and du, M lanes of d): SHAPES, and rows up to the dual rule's 96 lanes
DUAL_SHAPES = SHAPES + [(2, 70, 24, 96), (3, 2 * bm.DUAL_BT + 1, 88, 32)]


def _dual_operands(g, n, k, m, dtype, scale=1.0):
    """d [G, N, M], the padded weight w [G, M, K], u [G, N, K]."""
    d, w, u = ((torch.randn(*s, device=DEV) * scale).to(dtype)
               for s in ((g, n, m), (g, m, k), (g, n, k)))
    return d, w, u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,n,k,m", DUAL_SHAPES)
def test_block_mm_dual_matches_bmm(g, n, k, m, dtype, poisoned, seed):
    """du = d @ w and dW = d^T u from one pass over d, against both torch.bmm's."""
    d, w, u = _dual_operands(g, n, k, m, dtype)
    want_du, want_dw = bm.block_mm_dual_naive(d.double(), w.double(), u.double())
    du, dw = bm.block_mm_dual_raw(d, w, u)
    assert du.shape == (g, n, k) and dw.shape == (g, m, k) and du.dtype == dw.dtype == dtype
    assert rel_err(du, want_du) < TOL[dtype], seed
    assert rel_err(dw, want_dw) < TOL[dtype], seed
    assert_rounded_once(du, want_du, seed)
    assert_rounded_once(dw, want_dw, seed)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # the weight through other strides
    assert torch.equal(bm.block_mm_dual_raw(d, wt, u)[0], du), seed
    wide = torch.full((g, m + 3, k), float("nan"), device=DEV, dtype=dtype)
    wide[:, :m] = w                                    # a block stride of (M + 3) K, not M K
    assert torch.equal(bm.block_mm_dual_raw(d, wide[:, :m], u)[0], du), seed


def test_block_mm_dual_splits_of_several_tiles(monkeypatch, poisoned, seed):
    """Few splits: each program loops over several tiles (narrow and wide rows' tile sizes),
    the last one partly past N."""
    monkeypatch.setattr(bm, "DUAL_SPLIT", 2)
    for k, m in ((24, 24), (24, 64), (88, 24)):  # 128-, 64- and 64-token tiles
        d, w, u = _dual_operands(3, 5 * bm.DUAL_NARROW_BT + 9, k, m, torch.float32)
        want_du, want_dw = bm.block_mm_dual_naive(d.double(), w.double(), u.double())
        du, dw = bm.block_mm_dual_raw(d, w, u)
        assert rel_err(du, want_du) < TOL[torch.float32], seed
        assert rel_err(dw, want_dw) < TOL[torch.float32], seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mm_dual_sums_of_small_integers_are_exact(dtype, monkeypatch, poisoned, seed):
    """As ``test_sums_of_small_integers_are_exact``, for both of the dual's results: a token,
    lane or block left out or counted twice, in either product, changes it. Odd widths."""
    monkeypatch.setattr(bm, "DUAL_SPLIT", 3)
    g, n, k, m = 3, 2 * bm.DUAL_NARROW_BT + 5, 5, 7
    d, w, u = (torch.randint(-3, 4, s, device=DEV).to(dtype)
               for s in ((g, n, m), (g, m, k), (g, n, k)))
    du, dw = bm.block_mm_dual_raw(d, w, u)
    assert torch.equal(du, torch.bmm(d.float(), w.float()).to(dtype)), seed
    assert torch.equal(dw, torch.bmm(d.float().transpose(1, 2), u.float()).to(dtype)), seed


def test_dispatch_rule_picks_the_kernel_by_row_width(seed):
    """Triton up to MM_MAX_LANES (TN_MAX_LANES for d^T u), torch.bmm past: bit-equal to the
    path the rule names."""
    a, b, d = _operands(2, 50, bm.TN_MAX_LANES, bm.MM_MAX_LANES, torch.float32)
    assert torch.equal(bm.block_mm(a, b), bm.block_mm_raw(a, b)), seed
    assert torch.equal(bm.block_mm_tn(d[:, :, :bm.TN_MAX_LANES], a),
                       bm.block_mm_tn_raw(d[:, :, :bm.TN_MAX_LANES], a)), seed
    wide = bm.MM_MAX_LANES + 8
    a2, b2, d2 = _operands(2, 50, 8, wide, torch.float32)
    assert torch.equal(bm.block_mm(a2, b2), torch.bmm(a2, b2)), seed
    assert torch.equal(bm.block_mm_tn(d, a), torch.bmm(d.transpose(1, 2), a)), seed  # 64 > 32
    # du and dW: one pass up to DUAL_MAX_LANES, the two GEMMs' own rules past it
    lim = bm.DUAL_MAX_LANES
    d3, w3, u3 = _dual_operands(2, 50, 24, lim, torch.float32)
    for got, want in zip(bm.block_mm_dual(d3, w3, u3), bm.block_mm_dual_raw(d3, w3, u3)):
        assert torch.equal(got, want), seed
    d4, w4, u4 = _dual_operands(2, 50, 24, lim + 8, torch.float32)
    du, dw = bm.block_mm_dual(d4, w4, u4)
    assert torch.equal(du, torch.bmm(d4, w4)), seed            # 104 > MM_MAX_LANES: cuBLAS
    assert torch.equal(dw, torch.bmm(d4.transpose(1, 2), u4)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lanes", [24, bm.DUAL_MAX_LANES + 8])  # the one pass; the two GEMMs
def test_block_mm_dual_unsummed_table_gives_the_same_dw(lanes, dtype, seed):
    """``summed=False`` (a backward op sums its tables in one launch): du the same tensor's
    values, and the table's column sum through ``dw_from_sum`` bit-equal to the summed dW on
    either path (past the one pass, dW itself as a one-row fp32 table)."""
    d, w, u = _dual_operands(3, 3 * bm.DUAL_BT + 5, 24, lanes, dtype)
    du, dw = bm.block_mm_dual(d, w, u)
    du2, table = bm.block_mm_dual(d, w, u, summed=False)
    assert table.dtype == torch.float32 and table.shape[1] == dw.numel(), seed
    assert (table.shape[0] == 1) == (lanes > bm.DUAL_MAX_LANES), seed  # splits: more than one
    assert torch.equal(du2, du), seed
    total = cs.column_sums([table])[0]
    assert torch.equal(bm.dw_from_sum(total, tuple(dw.shape), dtype), dw), seed


def test_int64_offsets_bit_equal(monkeypatch, seed):
    """Tensors of WIDE_NUMEL elements or more take int64 offsets; forced on small ones, the
    results are bit-equal to the int32 path's."""
    a, b, d = _operands(3, 70, 24, 40, torch.float32)
    narrow = bm.block_mm_raw(a, b), bm.block_mm_tn_raw(d, a)
    w = b.transpose(1, 2)  # [G, M, K]: the dual's weight
    dual = bm.block_mm_dual_raw(d, w, a)
    monkeypatch.setattr(bm, "WIDE_NUMEL", 1)
    assert torch.equal(bm.block_mm_raw(a, b), narrow[0]), seed
    assert torch.equal(bm.block_mm_tn_raw(d, a), narrow[1]), seed
    for got, want in zip(bm.block_mm_dual_raw(d, w, a), dual):
        assert torch.equal(got, want), seed


def test_no_tokens():
    a, b, d = _operands(2, 0, 24, 8, torch.float32)
    assert bm.block_mm_raw(a, b).shape == (2, 0, 8)
    assert torch.equal(bm.block_mm_tn_raw(d, a), torch.zeros(2, 8, 24, device=DEV))
    du, dw = bm.block_mm_dual_raw(d, b.transpose(1, 2), a)
    assert du.shape == (2, 0, 24) and torch.equal(dw, torch.zeros(2, 8, 24, device=DEV))


def test_block_mm_tn_is_deterministic(seed):
    a, _, d = _operands(4, 3 * bm.TN_BT + 1, 24, 24, torch.bfloat16, scale=30.0)
    assert torch.equal(bm.block_mm_tn_raw(d, a), bm.block_mm_tn_raw(d, a)), seed
    w = torch.randn(4, 24, 24, device=DEV).to(torch.bfloat16)
    assert torch.equal(bm.block_mm_dual_raw(d, w, a)[1], bm.block_mm_dual_raw(d, w, a)[1]), seed


def test_errors_name_the_shapes():
    a, b, d = _operands(2, 5, 24, 8, torch.float32)
    with pytest.raises(ValueError, match=r"b \(2, 8, 24\).*a \(2, 5, 24\)"):
        bm.block_mm_raw(a, b.transpose(1, 2))
    with pytest.raises(ValueError, match="torch.bfloat16"):
        bm.block_mm_raw(a, b.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"u \(2, 4, 24\).*d \(2, 5, 8\)"):
        bm.block_mm_tn_raw(d, a[:, :4])
    wide = bm.MAX_LANES + 1  # past what the kernels hold
    with pytest.raises(ValueError, match=f"block_mm: rows of 24 and {wide} lanes"):
        bm.block_mm_raw(a, torch.zeros(2, 24, wide, device=DEV))
    with pytest.raises(ValueError, match=f"block_mm_tn: rows of {wide} and 24 lanes"):
        bm.block_mm_tn_raw(torch.zeros(2, 5, wide, device=DEV), a)
    w = b.transpose(1, 2)  # [2, 8, 24]
    with pytest.raises(ValueError, match=r"block_mm_dual: d \(2, 5, 8\).*u \(2, 4, 24\)"):
        bm.block_mm_dual_raw(d, w, a[:, :4])
    with pytest.raises(ValueError, match=r"w \(2, 24, 8\)"):
        bm.block_mm_dual_raw(d, b, a)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        bm.block_mm_dual_raw(d, w, a.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"u \(2, 5, 16\) and w \(2, 8, 24\) differ in K"):
        bm.block_mm_dual_raw(d, w, a[:, :, :16])
    wide = bm.DUAL_MAX_LANES + 1
    with pytest.raises(ValueError, match=f"block_mm_dual: rows of {wide} and 24 lanes"):
        bm.block_mm_dual_raw(torch.zeros(2, 5, wide, device=DEV),
                             torch.zeros(2, wide, 24, device=DEV), a)


@pytest.mark.gpu
@pytest.mark.parametrize("g,k,m", [(96, 24, 24), (32, 24, 24), (64, 24, 64), (32, 64, 24),
                                   (96, 64, 64), (32, 32, 88)])
def test_block_gemms_at_model_shapes(g, k, m, seed):
    """The 125M's groups and layers, the 350M's FFN and the 1.3B's q, k, v group at 16 x 1024
    tokens, bf16,
    through the dispatch (the paths the models take) against fp32 torch.bmm."""
    n = 16 * 1024
    a, b, d = _operands(g, n, k, m, torch.bfloat16)
    assert rel_err(bm.block_mm(a, b), torch.bmm(a.float(), b.float())) < 1e-2, seed
    want = torch.bmm(d.float().transpose(1, 2), a.float())
    assert rel_err(bm.block_mm_tn(d, a), want) < 1e-2, seed
    w = b.transpose(1, 2)  # [G, M, K]
    du, dw = bm.block_mm_dual(d, w, a)
    assert rel_err(du, torch.bmm(d.float(), w.float())) < 1e-2, seed
    assert rel_err(dw, want) < 1e-2, seed


def test_gemm_paths_name_the_rule_and_the_layer_logs_them(monkeypatch):
    """What ``WalshLinear.path()`` (and so the trainer's log) says runs each layer's GEMMs:
    the rule at its edges, on the rows as stored (lanes rounded up to 8)."""
    from walsh.layers import WalshLinear

    lim, dual = bm.MM_MAX_LANES, bm.DUAL_MAX_LANES
    assert bm.gemm_paths(lim, lim) == "block GEMMs y: Triton; du + dW: Triton, one pass"
    assert bm.gemm_paths(8, dual) == "block GEMMs y: cuBLAS; du + dW: Triton, one pass"
    assert bm.gemm_paths(dual + 8, 24) == "block GEMMs y: cuBLAS; du: cuBLAS; dW: cuBLAS"
    monkeypatch.setattr(bm, "DUAL_MAX_LANES", 0)  # the two GEMMs' own rules, at their edges
    tn = bm.TN_MAX_LANES
    assert bm.gemm_paths(tn, tn) == "block GEMMs y: Triton; du: Triton; dW: Triton"
    assert bm.gemm_paths(tn, tn + 8) == "block GEMMs y: Triton; du: Triton; dW: cuBLAS"
    monkeypatch.undo()
    with torch.device("meta"):  # the 125M's gate and up: 24 -> 64 lanes; 1.3B FFN: 64 -> 172
        gate = WalshLinear(768, 2048, blocks=32, impl="triton")
        ffn = WalshLinear(2048, 5504, blocks=32, impl="triton")
        plain = WalshLinear(768, 768, blocks=32, impl="blocks")
    assert gate.path() == ("WalshLinear: walsh_impl=triton (block GEMMs y: Triton; du + dW: "
                           "Triton, one pass)")
    assert ffn.path().endswith("(block GEMMs y: cuBLAS; du: cuBLAS; dW: cuBLAS)")  # 176 > 96
    assert plain.path() == "WalshLinear: walsh_impl=blocks"
