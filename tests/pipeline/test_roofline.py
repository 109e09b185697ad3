"""The roofline model (pipeline.roofline): its FLOPs agree with the model's own count, its bytes
with hand counts, and each kernel takes the slower of its two limits."""

from __future__ import annotations

import pytest
import torch

from pipeline.roofline import (
    Kernel,
    linear_kernels,
    model_kernels,
    step_breakdown,
    step_roofline_ms,
)
from walsh.layers import make_linear
from walsh.models import WalshLM, get_preset

N = 1000


def test_kernel_time_is_the_slower_limit():
    # 1 TFLOP at 1000 TFLOP/s is 1 ms; 1 GB at 1000 GB/s is 1 ms
    assert Kernel("c", 2e12, 0, 1e9).ms(1000, 1000) == pytest.approx(2.0)
    assert Kernel("m", 1e12, 0, 3e9).ms(1000, 1000) == pytest.approx(3.0)
    assert Kernel("i", 0, 2e12, 0).ms(1000, 1000) == pytest.approx(1.0)  # INT8 at twice the rate


def test_dense_ternary_layer_by_hand():
    layer = make_linear("dense", 1, 64, 48, ternary=True)
    p, f = 64 * 48, 2 * N * 64 * 48
    ks = {k.name: k for k in linear_kernels(layer, N)}
    assert set(ks) == {"ternary quantize", "GEMM fwd", "GEMM dx", "GEMM dw"}
    assert ks["ternary quantize"].bytes == 10 * p
    assert ks["GEMM fwd"].flops == ks["GEMM dx"].flops == ks["GEMM dw"].flops == f
    assert ks["GEMM fwd"].bytes == 2 * (N * 64 + p + N * 48)
    assert ks["GEMM dw"].bytes == 2 * (N * 48 + N * 64) + 4 * p


def test_int8_layers_move_their_gemms_to_int8():
    plain = linear_kernels(make_linear("dense", 1, 64, 48, ternary=True, act_bits=8,
                                       int8_matmul=True), N)
    dx = linear_kernels(make_linear("dense", 1, 64, 48, ternary=True, act_bits=8,
                                    int8_matmul=True, int8_dx=True), N)
    f = 2 * N * 64 * 48
    assert sum(k.int8_ops for k in plain) == f and sum(k.int8_ops for k in dx) == 2 * f
    assert sum(k.flops + k.int8_ops for k in plain) == sum(k.flops + k.int8_ops for k in dx)


@pytest.mark.parametrize("overrides", [
    dict(algebra="dense", ternary=False),
    dict(algebra="cayley_dickson", algebra_dim=8, ternary=True),
    dict(algebra="walsh", algebra_dim=32, walsh_impl="dense", ternary=True),
    dict(algebra="walsh", algebra_dim=32, walsh_impl="triton", ternary=True),
])
def test_gemm_flops_are_three_times_the_layers_own_count(overrides):
    """Forward, dx and dw: each GEMM-like kernel of a step does one forward's multiply-adds
    (the Walsh transforms' H dots and gain passes are the only extra FLOPs)."""
    with torch.device("meta"):
        model = WalshLM(get_preset("walsh-h-125m", head_mix=False, n_layer=2, **overrides))
    for layer in model.structured_layers():
        ks = linear_kernels(layer, N)
        gemm = sum(k.flops + k.int8_ops for k in ks
                   if k.name.startswith(("GEMM", "int8 GEMM", "bmm")))
        a = layer.blocks if overrides.get("walsh_impl") == "triton" else 1
        assert gemm == 3 * 2 * N * layer.in_features * layer.out_features / a


def test_one_kernel_walsh_path_recomputes_its_forward_for_dbeta():
    layer = make_linear("walsh", 32, 768, 3072, walsh_impl="fused", ternary=True)
    g = 2 * N * 768 * 3072 / 32
    h = 2 * 32 * N * (768 + 3072)  # both transforms as [A, A] dots
    ks = linear_kernels(layer, N)
    assert sum(k.flops for k in ks if k.name != "ternary quantize") == 4 * g + 4 * h
    # its activations cross memory once each way per pass: the forward moves x, out and w
    fwd = next(k for k in ks if k.name == "walsh fused fwd")
    assert fwd.bytes == 2 * (N * 768 + N * 3072 + 768 * 3072 // 32)


def test_three_kernel_walsh_path_by_hand():
    """walsh_out reads y and writes out (two passes over [N, out]; out itself is saved for
    dbeta); the backward's walsh_in reads dout and out, writes dy (three passes, one H dot);
    walsh_out + dalpha reads du and x, writes dx."""
    layer = make_linear("walsh", 32, 768, 3072, walsh_impl="triton", ternary=True)
    ks = {k.name: k for k in linear_kernels(layer, N)}
    ho, hi = 2 * 32 * N * 3072, 2 * 32 * N * 768
    assert ks["walsh_out"].bytes == 2 * 2 * N * 3072
    assert ks["walsh_in (dout) + dbeta"].bytes == 3 * 2 * N * 3072
    assert ks["walsh_out"].flops == ks["walsh_in (dout) + dbeta"].flops == ho
    assert ks["walsh_in"].bytes == 2 * 2 * N * 768 and ks["walsh_in"].flops == hi
    assert ks["walsh_out (du) + alpha + dalpha"].bytes == 3 * 2 * N * 768
    # rows of 96 lanes (3072 / 32): du and dW in one pass, dy [N, 3072] read once
    w = 768 * 3072 // 32
    assert ks["bmm dx + dw"].bytes == 2 * (N * 3072 + 2 * N * 768 + 2 * w)  # W read, dW written
    assert "bmm dx" not in ks and "bmm dw" not in ks
    # the 1.3B FFN's 172-lane rows (176 stored) and the blocks path: two GEMMs, dy read twice
    for wide in (make_linear("walsh", 32, 2048, 5504, walsh_impl="triton", ternary=True),
                 make_linear("walsh", 32, 768, 3072, walsh_impl="blocks", ternary=True)):
        two = {k.name: k for k in linear_kernels(wide, N)}
        assert "bmm dx + dw" not in two
        assert two["bmm dx"].bytes == two["bmm dw"].bytes == 2 * (
            N * (wide.in_features + wide.out_features) + wide.weight.numel())


def test_grouped_walsh_layers_share_their_input_passes():
    """q, k, v as a group (walsh.kernels.walsh_group): one read of x in walsh_in and one in the
    dx pass, one dx write, for the three; the layers alone (walsh_group false) each their own.
    Per attention of C = 768 at N tokens: 3 (P - 1) = 6 fewer [N, C] passes (x's reads in
    both passes, the dx writes; autograd's reads of the dx's lie in the uncounted norm
    backward)."""
    def attn_bytes(group):
        with torch.device("meta"):
            model = WalshLM(get_preset("walsh-h-125m", walsh_impl="triton", n_layer=1,
                                       walsh_group=group))
        attn = model.blocks[0].attn
        return {name: sum(k.bytes for k in linear_kernels(getattr(attn, name), N)
                          if k.name.startswith(("walsh_in", "walsh_out (du)")))
                for name in "qkvo"}
    grouped, alone = attn_bytes(True), attn_bytes(False)
    assert grouped["o"] == alone["o"]  # not in a group
    saved = sum(alone[m] - grouped[m] for m in "qkv")
    assert saved == pytest.approx(6 * 2 * N * 768)


def test_step_roofline_sums_the_models_kernels_and_counts_attention_and_head():
    with torch.device("meta"):
        model = WalshLM(get_preset("dense-125m", n_layer=2))
    ks = model_kernels(model, 4, 256)
    names = [k.name for k in ks]
    assert names.count("attention fwd") == 2 and "LM head bwd" in names
    # the head's three GEMMs (logits, dh, dW), all in the loss's forward (walsh.loss), over the
    # vocabulary padded to 64 columns (50,257 -> 50,304)
    head = {k.name: k for k in ks if k.name.startswith("LM head")}
    assert head["LM head fwd"].flops == 6 * 4 * 256 * 768 * 50304
    assert head["LM head bwd"].flops == 0
    total = step_roofline_ms(model, 4, 256, 500, 2000)
    assert total == pytest.approx(sum(k.ms(500, 2000) for k in ks))
    # the structured Walsh path does a 32nd of the GEMM work: at 2048 wide its roofline is lower
    with torch.device("meta"):
        dense = WalshLM(get_preset("dense-1b3"))
        walsh = WalshLM(get_preset("walsh-h-1b3", walsh_impl="triton"))
    assert step_roofline_ms(walsh, 16, 1024, 789, 4251) < \
        0.7 * step_roofline_ms(dense, 16, 1024, 789, 4251)


def test_step_breakdown_groups_the_kernels_by_name():
    """``walsh model info --roofline``'s rows: one per kernel name, slowest first, their counts
    the step's kernels and their times summing to the step's roofline."""
    with torch.device("meta"):
        model = WalshLM(get_preset("walsh-h-125m", walsh_impl="triton", n_layer=3))
    rows = step_breakdown(model, 4, 256, 500, 2000)
    ks = model_kernels(model, 4, 256)
    assert [r[0] for r in rows].count("bmm dx + dw") == 1
    assert sum(r[1] for r in rows) == len(ks)
    assert dict((r[0], r[1]) for r in rows)["bmm fwd"] == 7 * 3  # q k v o gate up down
    assert dict((r[0], r[1]) for r in rows)["attention fwd"] == 3
    assert sum(r[2] for r in rows) == pytest.approx(step_roofline_ms(model, 4, 256, 500, 2000),
                                                    rel=1e-12)
    head = [k for k in ks if k.name == "LM head bwd"][0].ms(500, 2000)
    assert dict((r[0], r[2]) for r in rows)["LM head bwd"] == pytest.approx(head, rel=1e-12)
    times = [r[2] for r in rows]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_bench_layer_rows_run_and_take_the_rooflines_counts():
    """``walsh bench layer``'s table at small odd shapes on CPU (TRITON_INTERPRET=1): every
    thunk runs, and each row carries the roofline's count of the kernel it times."""
    pytest.importorskip("triton")
    from pipeline.bench_layer import kernel_rows

    n, fin, fout, a = 40, 64, 96, 32
    rows = {name: (fn, k) for name, fn, k in kernel_rows(n, fin, fout, a, dev="cpu")}
    for name, (fn, _) in rows.items():
        assert fn() is not None, name
    assert rows["fused fwd"][1].bytes == 2 * (n * fin + n * fout + fin * fout // a)
    for name in ("block GEMM fwd", "block GEMM dx", "bmm dw (cuBLAS)"):
        assert rows[name][1].flops == 2 * n * fin * fout / a, name
    # du and dW in one pass (rows of 2 and 3 lanes): dy read once, u read, du written
    dual = rows["block GEMM dx + dw"][1]
    assert dual.flops == 2 * 2 * n * fin * fout / a
    assert dual.bytes == 2 * (n * fout + 2 * n * fin + 2 * fin * fout // a)
    assert rows["block GEMM dw"][1].bytes == 2 * (n * fout + n * fin + fin * fout // a)
    assert rows["ternary_ste"][1].flops == 3 * fin * fout // a  # the Walsh weight it quantizes
    gemm = rows["int8 GEMM dx"][1]
    assert gemm.flops == 0 and gemm.int8_ops == 2 * n * fin * fout
    assert gemm.bytes == n * fout + fin * fout + 2 * n * fin  # int8 dout and codes, bf16 dx


def test_swiglu_inside_the_down_projection_saves_five_passes():
    """The MLP with silu(gate) * up computed in the down projection's passes
    (walsh.kernels.walsh_swiglu): 6 passes over [N, H] (gate and up read in walsh_in; gate
    and up read, dgate and dup written in the dx pass) against 11 apart (SwiGLU's forward 3
    and backward 5, the down layer's read of h in walsh_in and its read of h and write of dh
    in the dx pass)."""
    def mlp_bytes(fuse):
        with torch.device("meta"):
            model = WalshLM(get_preset("walsh-h-125m", walsh_impl="triton", n_layer=1,
                                       walsh_swiglu=fuse, walsh_mlp=False))
        down = model.blocks[0].mlp.down
        assert down.swiglu_input == fuse
        ks = model_kernels(model, 4, N // 4)
        return sum(k.bytes for k in linear_kernels(down, N)) + sum(
            k.bytes for k in ks if k.name.startswith("SwiGLU")), ks
    (fused, ks_fused), (apart, _) = mlp_bytes(True), mlp_bytes(False)
    h = get_preset("walsh-h-125m").mlp_hidden
    assert not [k for k in ks_fused if k.name.startswith("SwiGLU")]
    assert apart - fused == pytest.approx(5 * 2 * N * h)


def test_the_mlp_as_one_op_saves_eight_passes():
    """The MLP as one op (walsh.kernels.walsh_mlp) against the group op and the down op with
    the product inside: forward 5 passes over [N, H] (y_g, y_u read; gate, up, u_d written)
    against 7 (gate and up read back by down's walsh_in), backward 5 (du_d, gate, up read;
    dy_g, dy_u written) against 11 (dgate and dup written, then read with gate and up by the
    group's two walsh_in + dbeta passes)."""
    def step_bytes(one_op):
        with torch.device("meta"):
            model = WalshLM(get_preset("walsh-h-125m", walsh_impl="triton", n_layer=1,
                                       walsh_mlp=one_op))
        assert model.blocks[0].mlp.one_op == one_op
        return sum(k.bytes for k in model_kernels(model, 4, N // 4))
    h = get_preset("walsh-h-125m").mlp_hidden
    assert step_bytes(False) - step_bytes(True) == pytest.approx(8 * 2 * N * h)


@pytest.mark.parametrize("preset,impl,inside", [("walsh-h-125m", "triton", True),
                                                ("walsh-h-125m", "dense", False),
                                                ("dense-125m", None, False)])
def test_rope_passes_count_where_they_run_apart(preset, impl, inside):
    """RoPE on q and k: 4 passes over [N, C] each way (q and k read and written) where it runs
    apart (the dense model, the dense Walsh path, walsh_rope=false), none where q's and k's
    walsh_out rotates them (walsh_rope on the triton path)."""
    def rope_bytes(**over):
        kw = {"walsh_impl": impl} if impl else {}
        with torch.device("meta"):
            model = WalshLM(get_preset(preset, n_layer=2, **kw, **over))
        return model, sum(k.bytes for k in model_kernels(model, 4, N // 4)
                          if k.name.startswith("RoPE"))
    model, got = rope_bytes()
    assert model.blocks[0].attn.rope_inside == inside
    c = model.config.n_embd
    assert got == (0 if inside else 2 * 2 * 4 * 2 * N * c)  # 2 layers x 2 ways x 4 x bf16
    if impl == "triton":
        assert rope_bytes(walsh_rope=False)[1] == 2 * 2 * 4 * 2 * N * c


@pytest.mark.gpu
@pytest.mark.parametrize("flush", [False, True])
def test_bench_layer_prints_every_row_cuda(flush, capsys):
    """``walsh bench layer`` end to end at a small shape, with and without ``--flush-l2`` (and
    with ``--transform-mix`` dot, then butterflies): the header says which, and every kernel
    row and both layer rows are printed, each kernel row with its five figures (or '-' and its
    roofline where a flushed time sits within the flush's spread; at 3 decimals a small
    kernel's time or roofline may print as 0.000)."""
    from pipeline.bench_layer import kernel_rows
    from pipeline.cli import main

    argv = ["bench", "layer", "--impls", "triton", "--tokens", "2048", "--in-features", "256",
            "--out-features", "512"]
    mix = "butterflies" if flush else "dot"  # each way at every width, once
    assert main(argv + ["--flush-l2"] * flush + ["--transform-mix", mix]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("kernel rows with L2 " + ("flushed" if flush else "warm"))
    assert f" transform_mix={mix};" in lines[0]
    names = [name for name, _, _ in kernel_rows(8, 256, 512, 32, dev="cpu")]
    rows = {line[:24].strip(): line[24:].split() for line in lines[2:2 + len(names)]}
    assert list(rows) == names
    for name, cells in rows.items():
        assert len(cells) in (2, 5) and float(cells[1]) >= 0, name  # '-' and roof ms, or all
        assert (cells[0] == "-") if len(cells) == 2 else (float(cells[0]) >= 0), name
    assert [line[:24].strip() for line in lines[-2:]] == ["dense nn.Linear bf16",
                                                           "walsh triton"]
