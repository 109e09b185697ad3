"""``train.profile_steps = [start, stop]``: a torch.profiler window over optimizer steps.

Rank 0 records CPU and CUDA activity from the end of step ``start`` to the end of step ``stop``
and writes, under ``RUN_DIR/profile/``:
- ``summary.txt``: wall ms per step, device-busy ms per step (the sum of kernel self time; the
  gap between the two is time the GPU waited for the host), and the ops table sorted by self
  device time, then (on a GPU) a second table sorted by self CPU time, then the top kernels'
  launches by duration (``launch_table``);
- ``trace.json``: the Chrome/Perfetto trace of the window.
Other ranks and steps outside the window pay nothing.
"""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self, run_dir: Path, rank: int, window: tuple[int, int] | None,
                 device: torch.device) -> None:
        self.window = window if rank == 0 else None
        self.out = Path(run_dir) / "profile"
        self.cuda = device.type == "cuda"
        self._prof: profile | None = None
        self._t0 = 0.0

    def after_step(self, step: int) -> None:
        """Call once after every optimizer step; ``step`` counts the steps done."""
        if self.window is None:
            return
        start, stop = self.window
        if step == start:
            self._prof = make_profiler(self.cuda)
            self._sync()
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == stop and self._prof is not None:
            self._sync()
            wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self._write(self._prof, wall, stop - start)
            self._prof = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _write(self, prof: profile, wall_s: float, steps: int) -> None:
        head = write_profile(prof, wall_s, steps, self.out, self.cuda)
        print(f"[walsh] profile: {head} -> {self.out}", flush=True)


def make_profiler(cuda: bool) -> profile:
    """A profiler of CPU activity, and of CUDA kernels when ``cuda``; enter it to record."""
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))


def write_profile(prof: profile, wall_s: float, steps: int, out: Path, cuda: bool,
                  roofline: str = "") -> str:
    """Write ``summary.txt`` and ``trace.json`` of a finished profile into ``out``; return the
    summary's first line. ``steps``: how many steps the profile spans (figures are per step);
    ``roofline``: text appended to the summary (``pipeline.roofline.breakdown_table``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy_us = sum(getattr(e, key) for e in events if e.device_type.name != "CPU") \
        if cuda else float("nan")
    head = (f"steps {steps}: wall {1e3 * wall_s / steps:.2f} ms/step, device busy "
            f"{busy_us / 1e3 / steps:.2f} ms/step (kernel self time)")
    table = events.table(sort_by=key, row_limit=40, max_name_column_width=70)
    if cuda:  # where the host's time goes, for a step that waits on the host
        table += "\n" + events.table(sort_by="self_cpu_time_total", row_limit=30,
                                      max_name_column_width=70)
    launches = launch_table(prof, steps, cuda)
    (out / "summary.txt").write_text(head + "\n" + table + "\n" + launches
                                     + ("\n" + roofline if roofline else ""))
    prof.export_chrome_trace(str(out / "trace.json"))
    return head


# bucket edges per decade, about 26% apart: a kernel launched at a few distinct shapes (one
# Triton kernel serves every Walsh layer's width and pass) shows as separate groups of launches
BUCKETS = (1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.3, 8.0)


def _bucket(us: float) -> float:
    """The lower edge of ``us``'s bucket (``BUCKETS`` times a power of ten)."""
    if us <= 0:
        return 0.0
    scale = 10.0 ** math.floor(math.log10(us))
    return scale * max(b for b in BUCKETS if b * scale <= us * (1 + 1e-9))


def launch_table(prof: profile, steps: int, cuda: bool, top: int = 12) -> str:
    """The ``top`` kernels by total time (on CPU: ops by self CPU time), each with its launches
    per step, ms per step and its launches' durations in buckets (``lower-edge us: launches per
    step``). Why: an average hides that one kernel name runs at several shapes; session 14's
    profile of walsh-h-1b3 told the 64- and 172-lane passes of ``_walsh_kernel`` apart so, and
    that a change the layer bench timed at -22 us per layer moved the model's step by 0.2 ms.
    Durations: a kernel's device time; a CPU op's self time."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            times[e.name].append(e.device_time)
        elif not cuda and e.device_type == DeviceType.CPU:
            times[e.name].append(e.self_cpu_time_total)
    ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]
    what = "kernels" if cuda else "CPU ops (self time)"
    lines = [f"launches of the top {len(ranked)} {what}, per step: "
             "ms, launches, durations as {bucket us: launches}"]
    for name, us in ranked:
        groups = collections.Counter(_bucket(t) for t in us)
        spread = " ".join(f"{edge:g}:{n / steps:g}" for edge, n in sorted(groups.items()))
        lines.append(f"{sum(us) / 1e3 / steps:9.3f} ms {len(us) / steps:8g}x  {name[:70]}")
        lines.append(f"{'':23}{spread}")
    return "\n".join(lines) + "\n"
