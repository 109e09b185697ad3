"""Helpers shared by test modules (tests/ is on pytest's ``pythonpath``)."""

from __future__ import annotations

import math

import torch

# the kernel tests' device and bounds: every kernel's forward and gradients against its naive
# reference on odd sizes, fp32 to 1e-5 and 16-bit to 1e-2 relative (a deep chain: or 1.5x the
# reference's own 16-bit error, ``assert_matches_naive``), with fresh random inputs
# each run (the ``seed`` fixture, tests/conftest.py, named in every failure message) and
# outputs written into NaN-poisoned buffers. On CPU the kernels run under TRITON_INTERPRET=1
# at small shapes; the tests marked ``gpu`` repeat them at the models' shapes on CUDA
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


class PoisonedTorch:
    """``torch`` as a kernel module sees it (``monkeypatch.setattr(module, "torch",
    PoisonedTorch())``), every ``empty`` / ``empty_like`` NaN-filled: an output element or
    partial sum the kernels leave unwritten shows in the result."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kw):
        return torch.empty(*args, **kw).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kw):
        return torch.empty_like(*args, **kw).fill_(float("nan"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the relative error every float comparison in the suite uses."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def assert_rounded_once(got: torch.Tensor, want: torch.Tensor, seed) -> None:
    """16-bit results are the exact (fp32 or fp64) result rounded once, to nearest: no further
    from it than its own rounding (a truncating cast, the Triton interpreter's, is ~2x
    further). fp32 results pass unchecked."""
    if got.dtype != torch.float32:
        assert rel_err(got, want) <= 1.05 * rel_err(want.to(got.dtype), want), seed


def assert_layers_agree(ref, fast, x, shape, seed, tol=1e-5):
    """fast(x) equals ref(x) (fp32, ``tol``) in its output, the input's gradient and every
    parameter's gradient; returns fast's output."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    assert out_f.shape == out_r.shape == shape
    assert rel_err(out_f, out_r) < tol, seed
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) < tol, seed
    for name, p in ref.named_parameters():
        assert rel_err(dict(fast.named_parameters())[name].grad, p.grad) < tol, (name, seed)
    return out_f


def run_with_grads(fn, leaves, grad):
    """(fn(*leaves), the gradients of every leaf against ``grad``, taken on the fp32 output)."""
    out = fn(*leaves)
    return out, torch.autograd.grad(out.float(), leaves, grad)


def assert_matches_naive(fn, naive, leaves, grad, dtype, seed) -> None:
    """fn's output and every gradient against ``naive`` run in fp64 on the same leaves: within
    TOL[dtype] relative, or for 16-bit within 1.5 times the error of ``naive`` itself run in
    that dtype where that is larger (FlashAttention's tests hold a kernel to twice PyTorch's
    own low-precision error). For a deep chain: the Walsh MLP op (three layers, rounded to
    bf16 between transform and GEMM) at A = 4, 70 rows, was off by more than 1e-2 in 7 of 100
    draws (at most 1.17e-2; dbeta of the down layer sums 70 rows that cancel), and in each
    result by at most 1.02 times PyTorch's bf16 error where above 1e-2 (session 34,
    docs/benchmarks.md). Every sign, term or leaf gone wrong is an O(1) error and fails."""
    refs = [t.detach().double().requires_grad_() for t in leaves]
    out, got = run_with_grads(fn, leaves, grad)
    want_out, want = run_with_grads(naive, refs, grad.double())
    if dtype == torch.float32:
        bounds = [TOL[dtype]] * (1 + len(got))
    else:
        lows = [t.detach().clone().requires_grad_() for t in leaves]
        low_out, low = run_with_grads(naive, lows, grad)
        bounds = [max(TOL[dtype], 1.5 * rel_err(a, b))
                  for a, b in zip((low_out, *low), (want_out, *want))]
        assert all(math.isfinite(b) for b in bounds), (bounds, seed)  # no vacuous bound
    assert out.dtype == dtype and rel_err(out, want_out) < bounds[0], (bounds[0], seed)
    for k, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == r.shape, (k, seed)
        assert rel_err(g, r) < bounds[k + 1], (k, bounds[k + 1], seed)


def assert_ops_agree(fn, ref, leaves, grad, bound, seed) -> None:
    """fn and ref (the same function of ``leaves``) give the same output and every gradient
    within ``bound`` relative: a fused op against the ops it replaces."""
    out, got = run_with_grads(fn, leaves, grad)
    ref_out, want = run_with_grads(ref, leaves, grad)
    assert rel_err(out, ref_out) < bound, seed
    for k, (g, r) in enumerate(zip(got, want)):
        assert rel_err(g, r) < bound, (k, seed)


def assert_models_agree(model, twin, seed) -> None:
    """``twin`` (another config of the same function) loaded with ``model``'s weights gives
    the same loss (1e-6) and every parameter's gradient (1e-5) on one random batch (fp32)."""
    twin.load_state_dict(model.state_dict())
    dev = next(model.parameters()).device
    idx = torch.randint(0, 256, (2, 19), device=dev)
    tgt = torch.randint(0, 256, (2, 19), device=dev)
    losses = [m(idx, tgt) for m in (model, twin)]
    for loss in losses:
        loss.backward()
    assert rel_err(losses[0], losses[1]) < 1e-6, seed
    ref = dict(twin.named_parameters())
    for name, prm in model.named_parameters():
        assert rel_err(prm.grad, ref[name].grad) < 1e-5, (name, seed)


def assert_bf16_runs_agree(runs, x, grads, seed, tol=1e-2, device="cuda") -> None:
    """Each run (fn, modules): fn(x) under bf16 autocast, a tensor or a list of them, and its
    backward against ``grads`` (one per output). Its outputs, x's gradient and every module
    parameter's gradient equal the first run's (shapes, and ``tol`` relative): the full-shape
    GPU tests' eager and compiled kernels against a reference path."""
    results = []
    for fn, mods in runs:
        xs = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            outs = fn(xs)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        sum((o.float() * g).sum() for o, g in zip(outs, grads)).backward()
        results.append([*outs, xs.grad] + [p.grad.clone() for m in mods for p in m.parameters()])
        for m in mods:
            m.zero_grad(set_to_none=True)
    for got in results[1:]:
        for k, (a, b) in enumerate(zip(got, results[0])):
            assert a.shape == b.shape and rel_err(a, b) < tol, (k, seed)


def small_config(vocab_size: int = 256, block_size: int = 32, n_embd: int = 128, **kw):
    """A 2-layer, 8-head WalshConfig over a 256-token vocabulary (the tiny preset's shape);
    ``kw`` sets any other field (algebra, ternary, head mixing, ...)."""
    from walsh.models import WalshConfig

    return WalshConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2,
                       n_head=kw.pop("n_head", 8), n_embd=n_embd, **kw)


# -- training runs on a tiny pattern dataset (pipeline tests) ---------------------------------
# The same data and run config as tests/pipeline/test_train.py, shared here so that the Ray
# launcher and tracking tests train exactly what the torchrun tests train.
PATTERN_VOCAB, PATTERN_CHUNK = 256, 512


def stage_pattern(root, seed: int = 0):
    """train: 4 shards x 6 chunks, val: 1 shard x 2 chunks, of a noisy 37-token cycle."""
    from pathlib import Path

    import numpy as np

    from data_prep.manifest import Manifest, TokenizerInfo
    from data_prep.shards import write_shard

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab, chunk = PATTERN_VOCAB, PATTERN_CHUNK
    rng = np.random.default_rng(seed)
    cycle = rng.integers(0, vocab - 1, 37)
    shards, chunk_no = [], {"train": 0, "val": 0}
    for split, n_shards, per in (("train", 4, 6), ("val", 1, 2)):
        for i in range(n_shards):
            chunks = []
            for _ in range(per):
                pos = rng.integers(0, 37)
                tok = np.resize(np.roll(cycle, -pos), chunk).astype(np.uint16)
                noise = rng.random(chunk) < 0.05
                tok[noise] = rng.integers(0, vocab - 1, noise.sum())
                chunks.append(tok)
            shards.append(write_shard(root, split, i, chunk_no[split], chunks))
            chunk_no[split] += per
    Manifest(
        tokenizer=TokenizerInfo("test-bytes", "0" * 64, vocab, vocab - 1), dtype="uint16",
        chunk_tokens=chunk, source={"kind": "test"}, filters={}, split_rule={"kind": "test"},
        totals={}, shards=shards,
    ).save(root)
    return root


def pattern_run_config(data, run_dir, **train) -> dict:
    """The tiny model (vocab 256, n_embd 64, 2 layers, seq_len 32), 2 workers, ZeRO-2, fp32,
    12 steps; ``train`` overrides keys of the ``train`` section."""
    return {
        "name": "test",
        "model": {"preset": "tiny", "overrides": {
            "vocab_size": PATTERN_VOCAB, "block_size": 64, "n_embd": 64, "n_head": 8,
            "n_layer": 2}},
        "data": {"path": str(data), "seq_len": 32},
        "optim": {"lr": 2e-2, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"steps": 12, "micro_batch": 4, "global_batch": 16, "zero_stage": 2,
                  "log_interval": 2, "eval_interval": 6, "eval_batches": 2,
                  "ckpt_interval": 4, "keep_last": 2, "run_dir": str(run_dir),
                  "precision": "fp32", "seed": 3, **train},
        "tracking": {"enabled": False},
        "cluster": {"workers": 2, "gpus_per_worker": 0},
    }


def write_yaml(path, obj):
    from pathlib import Path

    import yaml

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(obj))
    return Path(path)


def read_metrics(run_dir) -> list[dict]:
    """Rank 0's ``<run_dir>/metrics.jsonl``, one dict per line."""
    import json
    from pathlib import Path

    return [json.loads(line)
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_trace(run_dir) -> dict[int, dict[int, str]]:
    """rank -> micro index -> sha1 from ``--trace-data`` files (a later line for the same index
    overrides an earlier one; a line cut short by a SIGKILL is dropped)."""
    from pathlib import Path

    out = {}
    for f in sorted((Path(run_dir) / "data_trace").glob("rank*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        out[int(f.stem[4:])] = {int(r[0]): r[1] for r in rows if len(r) == 2 and len(r[1]) == 40}
    return out


# -- subprocesses: `walsh` commands, servers, and cleaning up after them ----------------------
def walsh_env(**extra: str) -> dict[str, str]:
    """A copy of this environment for a `walsh` subprocess: one intra-op thread per process,
    unbuffered output, no cluster or tracking server inherited from the caller's shell."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def start_walsh(args, log, env=None, cwd=None):
    """``python -m pipeline.cli ARGS`` in a session of its own (see ``kill_session``), stdout
    and stderr into the file ``log``."""
    import subprocess
    import sys

    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT, env=env or walsh_env(),
                                cwd=cwd, start_new_session=True)


def finish_walsh(proc, log, timeout: float) -> str:
    """Wait for ``proc`` (from ``start_walsh``); on a timeout kill its session. Asserts exit 0;
    returns the log."""
    import subprocess
    from pathlib import Path

    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        raise AssertionError(
            f"timed out after {timeout} s:\n{Path(log).read_text()[-6000:]}") from None
    out = Path(log).read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def session_procs(sid: int) -> list:
    """The live processes of session ``sid``: a process started with ``start_new_session=True``
    (sid = its pid) and everything it spawned that did not start a session of its own, even
    after they were re-parented (Ray's raylet, workers, dashboard; `ray start`'s daemons)."""
    import os

    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (only what the test itself started)."""
    import psutil

    procs = session_procs(sid)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=15)


def wait_for_checkpoint(run_dir, tag: str, proc, timeout: float = 240) -> None:
    """Poll until RUN_DIR/checkpoints/latest names ``tag``, ``proc`` ends, or ``timeout`` s."""
    import time
    from pathlib import Path

    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() == tag:
            return
        time.sleep(0.05)
