"""The ``walsh`` console script: help, preset info, the smoke run and the benchmarks on CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from pipeline.bench_train import parse_overrides
from pipeline.cli import main
from pipeline.roofline import breakdown_table, step_roofline_ms
from walsh.models import WalshLM, get_preset


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for sub in ("model", "bench"):
        assert sub in res.stdout


def test_model_info_prints_hand_checked_counts(capsys):
    main(["model", "info", "dense-125m"])
    out = capsys.readouterr().out
    # V*C + L*(4C^2 + 3*C*F + 2C) + C with V=50257, C=768, L=12, F=2048
    assert f"{50257 * 768 + 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 768:,}" in out
    assert "flops/token (train, T=1024)" in out


def test_model_info_roofline_prints_the_steps_kernels(capsys):
    main(["model", "info", "dense-125m", "--seq-len", "256", "--roofline", "4",
          "--peak-tflops", "500", "--bandwidth-gbs", "2000"])
    out = capsys.readouterr().out
    with torch.device("meta"):
        total = step_roofline_ms(WalshLM(get_preset("dense-125m")), 4, 256, 500, 2000)
    assert (f"roofline of a training step, 4 x 256 tokens, at 500 TFLOP/s and 2000 GB/s: "
            f"{total:.2f} ms") in out
    lines = out.splitlines()
    rows = [line.split() for line in lines[1 + next(i for i, x in enumerate(lines)
                                                   if x.startswith("roofline of")):]]
    # dense-125m: 7 layers x 12 blocks of GEMM fwd / dx / dw, 12 attention pairs, the LM head
    assert {" ".join(r[4:]): int(r[3].rstrip("x")) for r in rows} == {
        "GEMM fwd": 84, "GEMM dx": 84, "GEMM dw": 84, "attention fwd": 12, "attention bwd": 12,
        "LM head fwd": 1, "LM head bwd": 1, "SwiGLU fwd": 12, "SwiGLU bwd": 12, "RoPE fwd": 12,
        "RoPE bwd": 12}
    res = run_cli("model", "info", "tiny", "--roofline", "0")
    assert res.returncode != 0 and "--roofline: batch must be >= 1, got 0" in res.stderr


def test_model_info_unknown_preset_names_it():
    res = run_cli("model", "info", "dense-9000m")
    assert res.returncode != 0
    assert "dense-9000m" in res.stderr


def test_model_info_bad_override_names_field():
    res = run_cli("model", "info", "walsh-o-125m", "--set", "n_head=12")
    assert res.returncode != 0
    assert "n_head" in res.stderr


def test_parse_overrides_types():
    assert parse_overrides(["n_layer=3", "ternary=false", "act_bits=null", "algebra=walsh"]) == {
        "n_layer": 3, "ternary": False, "act_bits": None, "algebra": "walsh",
    }
    with pytest.raises(SystemExit, match="key=value"):
        parse_overrides(["n_layer"])


# a mix other than the rule imports the Walsh kernels (triton: Linux only)
MIX = "butterflies" if importlib.util.find_spec("triton") else "rule"


def _no_nan(name):
    raise ValueError(f"{name} in JSON")


def test_bench_train_cpu_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    main([
        "bench", "train", "--presets", "tiny", "--seq-len", "32", "--batch", "2", "--steps", "3",
        "--warmup", "1", "--compile", "off", "--device", "cpu", "--set", "vocab_size=256",
        "--json", str(out),
    ])
    rows = json.loads(out.read_text(), parse_constant=_no_nan)["rows"]  # strict JSON
    assert [(r["preset"], r["compile"], r["batch"], r["seq_len"]) for r in rows] == [
        ("tiny", False, 2, 32)
    ]
    assert rows[0]["peak_gib"] is None  # not measured on CPU: null, not NaN
    assert rows[0]["tok_s"] > 0 and rows[0]["flops_per_token"] > 0
    assert rows[0]["x_dense"] is None  # no dense bf16 row of its shape in the run
    assert rows[0]["transform_mix"] == "rule"  # the launch table's (--transform-mix)
    assert rows[0]["roof_ms"] is None  # CPU, no ceilings given: no roofline column
    # each timed step's time: as many as steps, adding up to the timed total
    step_ms = rows[0]["step_ms"]
    assert len(step_ms) == 3 and min(step_ms) > 0
    assert sum(step_ms) == pytest.approx(3 * rows[0]["ms_step"], rel=0.05)
    assert rows[0]["spread"] == pytest.approx(max(step_ms) / sorted(step_ms)[1])  # / median


def test_bench_train_profile_writes_each_rows_summary(tmp_path):
    main(["bench", "train", "--presets", "tiny:n_layer=1", "--seq-len", "16", "--batch", "2",
          "--steps", "1", "--warmup", "1", "--compile", "off", "--device", "cpu", "--set",
          "vocab_size=128", "--profile", str(tmp_path / "prof")])
    out = tmp_path / "prof" / "tiny_n_layer-1-eager"
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("steps 2: wall "), summary[:200]  # PROFILE_STEPS, not --steps
    assert "aten::" in summary and "launches of the top 12 CPU ops" in summary
    assert "roofline of a training step" not in summary  # CPU, no ceilings given
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    # with ceilings, the step's roofline by kernel follows the measured kernel times
    main(["bench", "train", "--presets", "tiny:n_layer=1", "--seq-len", "16", "--batch", "2",
          "--steps", "1", "--warmup", "1", "--compile", "off", "--device", "cpu", "--set",
          "vocab_size=128", "--profile", str(tmp_path / "prof2"), "--peak-tflops", "100",
          "--bandwidth-gbs", "1000"])
    summary = (tmp_path / "prof2" / "tiny_n_layer-1-eager" / "summary.txt").read_text()
    with torch.device("meta"):
        model = WalshLM(get_preset("tiny", n_layer=1, vocab_size=128))
    assert summary.endswith("\n" + breakdown_table(model, 2, 16, 100, 1000))


def test_bench_train_roofline_column_from_given_ceilings(tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "train", "--presets", "tiny", "--seq-len", "32", "--batch", "2", "--steps",
          "1", "--warmup", "1", "--compile", "off", "--device", "cpu", "--set", "vocab_size=256",
          "--peak-tflops", "100", "--bandwidth-gbs", "1000", "--json", str(out),
          "--transform-mix", MIX])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["transform_mix"] == MIX
    if MIX != "rule":  # the mix held for the run only
        from walsh.kernels import walsh_launch

        assert not walsh_launch.use_dot(32, 24) and walsh_launch.use_dot(32, 64)
    assert row["roof_ms"] > 0 and row["x_roof"] == pytest.approx(row["ms_step"] / row["roof_ms"])


def test_bench_train_per_preset_overrides_and_ratio_to_dense(tmp_path):
    out = tmp_path / "bench.json"
    small = "n_layer=1,n_embd=32,n_head=2"
    main(["bench", "train", "--presets", f"dense-125m:{small}", f"bitnet-125m:{small},bias=true",
          "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
          "--compile", "off", "--device", "cpu", "--set", "vocab_size=128", "--json", str(out)])
    dense, bitnet, tiny = json.loads(out.read_text())["rows"]
    assert bitnet["overrides"] == {"vocab_size": 128, "n_layer": 1, "n_embd": 32, "n_head": 2,
                                   "bias": True}
    assert dense["x_dense"] == 1.0
    assert bitnet["x_dense"] == bitnet["tok_s"] / dense["tok_s"]
    assert tiny["x_dense"] is None  # another shape (2 x 128)
    with pytest.raises(SystemExit, match="unknown preset 'nope'"):
        main(["bench", "train", "--presets", "nope:n_layer=1", "--device", "cpu"])


def test_bench_loss_cpu_agrees_with_full_ce(capsys):
    main(["bench", "loss", "--tokens", "64", "--dim", "16", "--vocab", "100", "--chunks", "24",
          "--dtype", "fp32", "--device", "cpu", "--repeats", "1", "--impls", "torch", "triton"])
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    rows = {ln[0]: ln for ln in lines if ln and ln[0] in ("full", "torch", "triton")}
    assert set(rows) == {"full", "torch", "triton"}
    for impl in ("torch", "triton"):  # the kernel under the interpreter on CPU
        assert float(rows[impl][-1]) < 1e-5  # |dloss| against full CE


def test_smoke_learns_the_pattern(capsys):
    main(["model", "smoke", "--steps", "60"])
    out = capsys.readouterr().out
    assert "matches the pattern on 100%" in out


def test_train_overrides_may_follow_options(capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "configs/train/cpu-smoke.yaml"
    assert main(["train", str(cfg), "--dry-run", "train.steps=7", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "lr: 0.5" in out
    res = run_cli("train", str(cfg), "--dry-run", "--bogus")
    assert res.returncode == 2 and "--bogus" in res.stderr
