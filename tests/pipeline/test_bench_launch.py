"""``walsh bench launch``'s sweep on CPU (Triton's interpreter, tiny shapes): the table's launch
first, the grid's launches as given and checked against it; times come from a stand-in clock
(the command itself needs CUDA and is not a test)."""

from __future__ import annotations

import argparse

import pytest
from _helpers import DEV

from pipeline import bench_launch as bl
from walsh.kernels.walsh_launch import mlp_chain_params


def _args(**kw) -> argparse.Namespace:
    base = dict(tokens=5, blocks=4, lanes=86, chunks=[0, 64, 32], slab_tokens=[1, 2],
                warps=[4], stages=[0], loop_tokens=[1, 4], device=DEV)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("fwd", [True, False])
def test_sweep_runs_the_table_then_every_launch(fwd):
    calls = []

    def clock(fn):  # a stand-in for the CUDA-graph timer: later launches "take longer"
        fn()
        calls.append(1)
        return 0.001 * (10 - len(calls)) if len(calls) > 1 else 0.5

    rows, roof = bl.sweep(fwd, _args(), 1000.0, clock)
    assert rows[0][1] == mlp_chain_params(fwd, 88) and rows[0][2] == 0.0
    # chunks 0 (the whole row padded: 128), 64, 32 x slabs of 1, 2 tokens x programs of 1, 4
    # tokens, less the program smaller than its slab: 9 launches, fastest (the last timed) first
    grid = [(lb, bt, 4, 0, t) for lb in (128, 64, 32) for bt in (1, 2) for t in (1, 4)
            if t >= bt]
    assert [r[1] for r in rows[1:]] == grid[::-1]
    assert len(calls) == 10 and all(r[2] <= bl.MATCH for r in rows)
    width_bytes = 4 * 5 * 88 * 2  # one [A, N, W] bf16 tensor
    assert roof == pytest.approx((3 * width_bytes + 2 * 5 * 4 * 86 * 2) / 1e12 * 1e3)


def test_grid_skips_slabs_past_the_limit_and_programs_below_their_slab():
    args = _args(blocks=32, chunks=[0, 256], slab_tokens=[1, 2, 4], loop_tokens=[1, 2])
    got = list(bl.launch_grid(args, 32, 176))
    # 32 blocks x 2 tokens x 256 lanes = 16384 fp32 elements is the limit (4-token slabs pass
    # it); a program of 1 token cannot hold a slab of 2; chunk 0 is the row padded to 256
    assert got == [(256, 1, 4, 0, 1), (256, 1, 4, 0, 2), (256, 2, 4, 0, 2)] * 2


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
    with pytest.raises(RuntimeError, match=r"launch \(32, 1, 4, 0, 1\) gives other results"):
        bl.sweep(False, _args(), 1000.0, lambda fn: (fn(), 1.0)[1])
