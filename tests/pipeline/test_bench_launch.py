"""``walsh bench launch``'s sweep on CPU (Triton's interpreter, tiny shapes): the table's launch
first, the grid's launches as given and checked against it, for the MLP's chained pass and the
transform kernel's passes, under each block mix; times come from a stand-in clock (the command
itself needs CUDA and is not a test)."""

from __future__ import annotations

import argparse

import pytest
from _helpers import DEV

from pipeline import bench_launch as bl
from walsh.kernels.walsh_launch import mlp_chain_params


def _args(**kw) -> argparse.Namespace:
    base = dict(kind="chain", group=1, mixes=["rule"], tokens=5, blocks=4, lanes=86,
                chunks=[0, 64, 32], slab_tokens=[1, 2], warps=[4], stages=[0],
                loop_tokens=[1, 4], device=DEV)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("fwd", [True, False])
def test_sweep_runs_the_table_then_every_launch(fwd):
    calls = []
    rows, roof = bl.sweep(fwd, _args(), 1000.0, _clock(calls))
    assert rows[0][1:] == ("rule", mlp_chain_params(fwd, 88), 0.0)
    # chunks 0 (the whole row padded: 128), 64, 32 x slabs of 1, 2 tokens x programs of 1, 4
    # tokens, less the program smaller than its slab: 9 launches, fastest (the last timed) first
    grid = [(lb, bt, 4, 0, t) for lb in (128, 64, 32) for bt in (1, 2) for t in (1, 4)
            if t >= bt]
    assert [r[2] for r in rows[1:]] == grid[::-1]
    assert len(calls) == 10 and all(r[3] <= bl.MATCH for r in rows)
    width_bytes = 4 * 5 * 88 * 2  # one [A, N, W] bf16 tensor
    assert roof == pytest.approx((3 * width_bytes + 2 * 5 * 4 * 86 * 2) / 1e12 * 1e3)


def test_grid_skips_slabs_past_the_limit_and_programs_below_their_slab():
    args = _args(blocks=32, chunks=[0, 256], slab_tokens=[1, 2, 4], loop_tokens=[1, 2])
    got = list(bl.launch_grid(args, 32, 176))
    # 32 blocks x 2 tokens x 256 lanes = 16384 fp32 elements is the limit (4-token slabs pass
    # it); a program of 1 token cannot hold a slab of 2; chunk 0 is the row padded to 256, the
    # same launches as chunk 256's, each timed once
    assert got == [(256, 1, 4, 0, 1), (256, 1, 4, 0, 2), (256, 2, 4, 0, 2)]
    assert list(bl.launch_grid(_args(chunks=[512]), 32, 176)) == []  # wider than the row


def test_a_launch_with_other_results_is_an_error(monkeypatch):
    """Every launch's outputs must equal the table's: one that differs stops the sweep."""
    from walsh.kernels import walsh_mlp as wm

    real = wm.mlp_chain_bwd_raw

    def off_by_one_launch(*a, launch=None, **kw):
        out = real(*a, launch=launch, **kw)
        if launch is not None and launch[0] == 32:  # a broken launch: one lane's dy_g off
            out[0][0, 0, 0] += 1.0
        return out

    monkeypatch.setattr(wm, "mlp_chain_bwd_raw", off_by_one_launch)
    with pytest.raises(RuntimeError,
                       match=r"launch \(32, 1, 4, 0, 1\) \(rule\) gives other results"):
        bl.sweep(False, _args(), 1000.0, lambda fn: (fn(), 1.0)[1])


def _clock(calls):
    """A stand-in for the CUDA-graph timer: the first call "takes" 0.5 ms, each later one less
    than the one before (so the sweep's rows come back in reverse order of timing)."""
    def clock(fn):
        fn()
        calls.append(1)
        return 0.5 if len(calls) == 1 else 0.001 * (100 - len(calls))
    return clock


# (pass, group, tensors of N x A*L elements it moves): walsh_in reads x and writes P u;
# walsh_out reads y and writes out; walsh_in + dbeta reads dout and out and writes dy; dx +
# dalpha reads P du and x and writes dx (block-major rows counted without their padding)
@pytest.mark.parametrize("kind,group,tensors", [
    ("walsh_in", 1, 2), ("walsh_in", 2, 3), ("walsh_out", 1, 2), ("walsh_in_gain", 1, 3),
    ("walsh_out_gain", 1, 3), ("walsh_out_gain", 3, 5)])
def test_transform_pass_sweep_runs_the_table_then_every_launch(kind, group, tensors):
    from walsh.kernels.walsh_launch import _launch_params

    calls = []
    args = _args(kind=kind, group=group, lanes=6, chunks=[0, 4], slab_tokens=[1, 2],
                 loop_tokens=[1, 4])
    rows, roof = bl.sweep(None, args, 1000.0, _clock(calls))
    gain = kind.endswith("_gain")
    table = _launch_params(kind in ("walsh_in", "walsh_in_gain"), group, 8, gain, False)
    table = table if gain else bl.no_loop(table)  # one slab a program, no stages
    assert rows[0][1:] == ("rule", table, 0.0)
    # chunks 0 (the row of 6 lanes padded to 8) and 4 x slabs of 1, 2 tokens; the gain passes
    # also x programs of 1, 4 tokens (not below their slab), the others one slab a program
    grid = [(lb, bt, 4, 0, t) for lb in (8, 4) for bt in (1, 2)
            for t in ((1, 4) if gain else (bt,)) if t >= bt]
    assert table not in grid  # (else it would be left out of the grid's rows)
    assert [r[2] for r in rows[1:]] == grid[::-1] and len(calls) == 1 + len(grid)
    assert all(r[1] == "rule" and r[3] <= bl.MATCH for r in rows)
    assert roof == pytest.approx(tensors * 5 * 4 * 6 * 2 / 1e12 * 1e3)  # bf16, 1000 GB/s


def test_the_tables_launch_is_not_timed_again_in_the_grid():
    """walsh_in's table launch at 8 lanes (a 128-lane tile: 16 tokens a slab) written with its
    table's 64 tokens a program still matches the grid's one-slab launch, timed once."""
    calls = []
    args = _args(kind="walsh_in", lanes=6, chunks=[0, 16], slab_tokens=[16], loop_tokens=[64])
    rows, _ = bl.sweep(None, args, 1000.0, _clock(calls))
    assert [r[2] for r in rows] == [(8, 16, 4, 0, 16)] and len(calls) == 1  # chunk 16: > row


def test_sweep_under_each_block_mix():
    """Each mix's grid is checked against that mix's own table launch; the dot's differs from
    the rule's butterflies at 6 lanes (it rounds alpha * x to bf16; a pass whose transform
    reads bf16 data as it is, as dx + dalpha's, sums 16 bf16 terms exactly either way),
    butterflies' equals it bit for bit (the same kernel)."""
    args = _args(kind="walsh_in_gain", blocks=16, lanes=6, chunks=[0], slab_tokens=[1],
                 loop_tokens=[4], mixes=["dot", "butterflies"])
    rows, _ = bl.sweep(None, args, 1000.0, _clock([]))
    got = {(r[1], r[2]): r[3] for r in rows[1:]}
    assert rows[0][1] == "rule" and len(rows) == 5  # the rule's table, then 2 x (table, grid)
    table = rows[0][2]
    assert 0 < got[("dot", table)] <= bl.MIX_MATCH
    assert got[("butterflies", table)] == 0.0
    assert got[("dot", (8, 1, 4, 0, 4))] <= bl.MATCH  # against the dot's table launch


def test_a_launch_that_is_not_a_power_of_two_is_refused():
    import torch

    from walsh.kernels.walsh_transform import walsh_in_raw

    x = torch.randn(3, 4 * 6, device=DEV)
    with pytest.raises(ValueError, match="powers of two, got 6 and 1"):
        walsh_in_raw(x, None, 4, launch=(6, 1, 4, 0, 1))


def test_times_within_the_flushed_timings_noise_rank_last():
    """A flushed timing of a few microseconds can come out <= 0 (the flush's mean taken off):
    such a launch is not the fastest."""
    times = iter([0.5, -0.001, 0.002, 0.003])
    args = _args(kind="walsh_out", lanes=6, chunks=[0, 4, 2], slab_tokens=[1])
    rows, _ = bl.sweep(None, args, 1000.0, lambda fn: (fn(), next(times))[1])
    assert [r[0] for r in rows] == [0.5, 0.002, 0.003, -0.001]


def test_a_grid_launch_the_launcher_refuses_stops_the_sweep():
    """A chunk that is not a power of two is a wrong argument, not a launch out of resources:
    the launcher's error reaches the user instead of a skipped row."""
    args = _args(kind="walsh_out", lanes=6, chunks=[6], slab_tokens=[1])
    with pytest.raises(ValueError, match=r"launch \(6, 1, 4, 0, 1\): lanes per chunk"):
        bl.sweep(None, args, 1000.0, _clock([]))
