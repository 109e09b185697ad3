"""``walsh bench train``: time forward + backward + AdamW step on random tokens.

For each preset (and each compile setting asked for) this builds the model with fp32 master
weights, runs ``--warmup`` untimed steps, then ``--steps`` timed steps under bf16 autocast (fp32
on CPU unless ``--dtype bf16``), and prints tokens/s, ms/step, peak memory (CUDA only, and "-"
under CUDA graphs, whose pool the allocator's peak leaves out; null in ``--json``) and the
model's own FLOPs per token, the MFU against the device's bf16 dense peak, each row's speed as a
multiple of the dense bf16 preset of the same shape when the run has one (``x dense``; the
kernel issue's goals are stated that way), and the step's roofline time from each kernel's FLOPs
and bytes over the measured ceilings (``roof ms``, ``pipeline.roofline``: a lower bound that
leaves out the elementwise passes) with the measured step over it (``x roof``), and ``spread``:
the slowest timed step over the median one (each step timed by CUDA events, no sync between
steps; a spread over 1.25 is reported with the steps' times, as warm-up work leaking into the
timed steps looks like that). Random tokens are fine: the cost of these layers does not depend
on the data.

``--profile DIR`` profiles two more steps of each row (``pipeline.profiling.write_profile``: the
kernels by time, each top kernel's launches by duration, and, where the run has ceilings, the
step's roofline by kernel from ``pipeline.roofline.breakdown_table``, to set the two side by
side as docs/benchmarks.md's session-20 entry does by hand). Judge a kernel change by this, in
the model, and not only by ``walsh bench layer``: session 14's layer bench timed a change at -22
us per 172-lane layer that moved the 1.3B step by 0.2 ms. Session 14 profiled the default
compile mode; how the profiler sees CUDA graphs' replays (``--compile-mode reduce-overhead``)
was not checked.

A preset may carry its own overrides: ``walsh-h-125m:walsh_impl=triton`` (several as
``name:k=v,k=v``), on top of the ``--set`` ones that apply to every preset; values are YAML,
as in configs.

``--transform-mix dot|butterflies`` runs every row with the Walsh passes mixing their blocks
one way at every width (``walsh.kernels.walsh_launch.transform_mix``; the default, ``rule``,
is the launch table's), to time that choice in the model at widths the rule was not measured
on; the header and each JSON row name it.

A benchmark, never a test: record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
import yaml

from data_prep.manifest import atomic_write_bytes
from pipeline.bench_layer import add_mix_argument, measure_ceilings, mix_context
from pipeline.config import CUDA_GRAPH_MODES, GRAD_COPIES, GRAD_COPY_DEFAULT
from pipeline.metrics import device_peak_tflops
from pipeline.parallelize import COMPILE_UNITS, compile_model
from pipeline.profiling import make_profiler, write_profile
from pipeline.roofline import breakdown_table, step_roofline_ms
from walsh.models import WalshLM, get_preset, presets


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings -> dict, values parsed as YAML, as in configs (true, 8, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key] = yaml.safe_load(raw) if raw else raw
    return out


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:k=v,k=v`` -> (preset name, its own overrides)."""
    name, _, rest = spec.partition(":")
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r} in {spec!r}; "
                         f"known: {', '.join(sorted(presets))}")
    return name, parse_overrides(rest.split(",")) if rest else {}


def add_ratios(rows: list[dict]) -> None:
    """``x_dense``: tok/s over that of the run's dense bf16 row of the same shape and compile
    setting (None when the run has no such row)."""
    for r in rows:
        base = [b for b in rows if b["dense_bf16"] and b["shape"] == r["shape"]
                and b["compile"] == r["compile"]]
        r["x_dense"] = r["tok_s"] / base[0]["tok_s"] if base else None


def bench_one(
    spec: str, overrides: dict, seq_len: int, batch: int, steps: int, warmup: int,
    compiled: bool, device: torch.device, dtype: torch.dtype | None,
    compile_scope: str = "model", compile_mode: str | None = None,
    ceilings: tuple[float, float] | None = None, profile_dir: Path | None = None,
    grad_copy: str = GRAD_COPY_DEFAULT,
) -> dict:
    """One row; ``ceilings``: (bf16 TFLOP/s, GB/s) for the roofline column, or None;
    ``profile_dir``: profile ``PROFILE_STEPS`` more steps after the timed ones, written there;
    ``compile_scope``: ``compile_model``'s scope; ``grad_copy``: its copy under CUDA graphs."""
    name, own = parse_spec(spec)
    cfg = get_preset(name, **{**overrides, **own})
    if cfg.block_size < seq_len:
        cfg = cfg.replace(block_size=seq_len)
    torch.manual_seed(0)
    model = WalshLM(cfg).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    if compiled:  # exactly what the trainer does (pipeline.parallelize)
        compile_model(model, compile_mode, grad_copy, compile_scope)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
        for _ in range(4)
    ]

    def step(i: int) -> None:
        tok = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = _StepClock(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
        clock.mark()
    sync()
    dt = (time.perf_counter() - t0) / steps
    step_ms = clock.step_ms()
    tokens = batch * seq_len
    flops = model.flops_per_token(seq_len)
    # under CUDA graphs the activations live in the graph's private pool, which
    # max_memory_allocated leaves out (it read 1.99 GiB for every 125M preset): not a figure
    graphs = compiled and compile_mode in CUDA_GRAPH_MODES
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" and not graphs
            else None)
    roof = step_roofline_ms(model, batch, seq_len, *ceilings) if ceilings else None
    if profile_dir is not None:
        with make_profiler(device.type == "cuda") as prof:
            t1 = time.perf_counter()
            for i in range(PROFILE_STEPS):
                step(i)
            sync()
            wall = time.perf_counter() - t1
        head = write_profile(prof, wall, PROFILE_STEPS, profile_dir, device.type == "cuda",
                             breakdown_table(model, batch, seq_len, *ceilings) if ceilings
                             else "")
        print(f"# {spec} profile: {head} -> {profile_dir}", flush=True)
    return {
        "preset": spec, "overrides": {**overrides, **own}, "shape": (cfg.n_layer, cfg.n_embd),
        "dense_bf16": cfg.algebra == "dense" and not cfg.ternary, "compile": compiled,
        "compile_scope": compile_scope if compiled else None, "compile_mode": compile_mode,
        "grad_copy": grad_copy if graphs else None,
        "seq_len": seq_len,
        "batch": batch, "tok_s": tokens / dt, "ms_step": 1e3 * dt, "peak_gib": peak,
        "tflops": flops * tokens / dt / 1e12, "flops_per_token": flops, "warmup_s": warm_s,
        "roof_ms": roof, "x_roof": 1e3 * dt / roof if roof else None,
        "step_ms": step_ms, "spread": max(step_ms) / statistics.median(step_ms),
    }


class _StepClock:
    """Each timed step's duration, without a host sync between steps (a sync would stop the
    host from queueing the next step while the GPU runs this one, and change what is timed):
    CUDA events on the GPU's timeline, the wall clock on CPU. Why: session 10 met two runs
    whose timed steps were far slower than the same code's next run on the same host; the
    per-step times show whether warm-up work (compilation) leaked into the timed steps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [self._now()]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def step_ms(self) -> list[float]:
        """ms per step, in order (call after a sync)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in pairs]
        return [1e3 * (b - a) for a, b in pairs]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", default=["dense-125m", "walsh-o-125m", "walsh-h-125m"],
                   help="model presets, each optionally with its own overrides: "
                        f"NAME[:k=v,k=v] (known: {', '.join(sorted(presets))})")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile-scope", choices=COMPILE_UNITS, default="model",
                   help="compile the whole model's forward (default: train.compile_scope's at "
                        "ZeRO-0) or each transformer block and the loss apart (ZeRO 1-3's)")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--grad-copy", choices=GRAD_COPIES, default=GRAD_COPY_DEFAULT,
                   help="under CUDA graphs, copy each parameter's first gradient out of the "
                        "graphs' pool all of a backward pass's at its end (pass, the "
                        "default) or each as it arrives (param): train.grad_copy's choice "
                        "(pipeline.parallelize._own_grads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides applied to every preset, e.g. walsh_impl=dense")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's bf16 dense peak for MFU (default: known GPUs' table)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the roofline column (default: measured on CUDA; "
                        "on CPU the column is left out unless this and --peak-tflops are set)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help=f"after each row's timed steps, profile {PROFILE_STEPS} more and write "
                        "DIR/<preset>-<compile>/summary.txt (kernel time by name, launches by "
                        "duration) and trace.json")
    add_mix_argument(p)


HEADER = (f"{'preset':<34}{'compile':>8}{'tok/s':>11}{'x dense':>8}{'ms/step':>9}"
          f"{'TFLOP/s':>9}{'MFU':>6}{'peak GiB':>9}{'warmup s':>9}{'roof ms':>8}{'x roof':>7}"
          f"{'spread':>7}")
# a timed step this many times the median is reported (``spread``: slowest over median)
SPREAD_WARN = 1.25
PROFILE_STEPS = 2  # steps a --profile window spans (after the timed ones: compiled, warm)


def profile_dir_name(spec: str, compiled: bool) -> str:
    """``walsh-h-1b3:walsh_impl=triton`` compiled -> ``walsh-h-1b3_walsh_impl-triton-compiled``."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", spec.replace("=", "-"))
    return f"{slug}-{'compiled' if compiled else 'eager'}"


def _line(r: dict) -> str:
    ratio = f"{r['x_dense']:.2f}" if r.get("x_dense") else "-"
    mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
    roof = f"{r['roof_ms']:.1f}" if r.get("roof_ms") else "-"
    x_roof = f"{r['x_roof']:.2f}" if r.get("x_roof") else "-"
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
    return (f"{r['preset']:<34}{str(r['compile']):>8}{r['tok_s']:>11,.0f}{ratio:>8}"
            f"{r['ms_step']:>9.1f}{r['tflops']:>9.1f}{mfu:>6}{peak:>9}"
            f"{r['warmup_s']:>9.1f}{roof:>8}{x_roof:>7}{r['spread']:>7.2f}")


def main(args: argparse.Namespace) -> list[dict]:
    with mix_context(args.transform_mix):
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = parse_overrides(args.set)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# device={dev_name} torch={torch.__version__} dtype={dtype_name} "
          f"T={args.seq_len} B={args.batch} steps={args.steps} overrides={overrides} "
          f"compile_scope={args.compile_scope} compile_mode={args.compile_mode} "
          f"grad_copy={args.grad_copy} transform_mix={args.transform_mix}")
    peak = device_peak_tflops(device, args.peak_tflops)
    ceilings = None  # (bf16 TFLOP/s, GB/s) for the roofline column
    if device.type == "cuda":
        bw, tflops = measure_ceilings()
        ceilings = (tflops, args.bandwidth_gbs or bw)
        print(f"# roofline ceilings: {ceilings[0]:,.0f} TFLOP/s bf16 (int8 twice), "
              f"{ceilings[1]:,.0f} GB/s")
    elif args.peak_tflops and args.bandwidth_gbs:
        ceilings = (args.peak_tflops, args.bandwidth_gbs)
    for spec in args.presets:
        parse_spec(spec)  # a typo fails before the first model is built
    rows = []
    for spec in args.presets:
        for comp in modes:
            r = bench_one(spec, overrides, args.seq_len, args.batch, args.steps, args.warmup,
                          comp, device, dtype, args.compile_scope, args.compile_mode, ceilings,
                          Path(args.profile) / profile_dir_name(spec, comp) if args.profile
                          else None, args.grad_copy)
            r["mfu"] = r["tflops"] / peak if peak else None
            r["transform_mix"] = args.transform_mix
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the finished model is garbage now
            print(_line(r), flush=True)
            if r["spread"] > SPREAD_WARN:
                print(f"# {spec}: the slowest timed step took {r['spread']:.2f}x the median "
                      f"({', '.join(f'{t:.1f}' for t in r['step_ms'])} ms): warm-up work may "
                      "have leaked into the timed steps; raise --warmup", flush=True)
    add_ratios(rows)
    print(HEADER)
    for r in rows:
        print(_line(r))
    if args.json:
        # strict JSON (no NaN, which jq and most readers refuse): what was not measured is None
        doc = {"device": dev_name, "torch": torch.__version__, "rows": rows}
        atomic_write_bytes(Path(args.json), json.dumps(doc, indent=1, allow_nan=False).encode())
    return rows
