"""``train.profile_steps = [start, stop]``: a torch.profiler window over optimizer steps.

Rank 0 records CPU and CUDA activity from the end of step ``start`` to the end of step ``stop``
and writes, under ``RUN_DIR/profile/``:
- ``summary.txt``: wall ms per step, device-busy ms per step (the sum of kernel self time; the
  gap between the two is time the GPU waited for the host), and the ops table sorted by self
  device time, then (on a GPU) a second table sorted by self CPU time;
- ``trace.json``: the Chrome/Perfetto trace of the window.
Other ranks and steps outside the window pay nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
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
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=acts)
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
        self.out.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        busy_us = sum(getattr(e, key) for e in events if e.device_type.name != "CPU") \
            if self.cuda else float("nan")
        head = (f"steps {steps}: wall {1e3 * wall_s / steps:.2f} ms/step, device busy "
                f"{busy_us / 1e3 / steps:.2f} ms/step (kernel self time)\n")
        table = events.table(sort_by=key, row_limit=40, max_name_column_width=70)
        if self.cuda:  # where the host's time goes, for a step that waits on the host
            table += "\n" + events.table(sort_by="self_cpu_time_total", row_limit=30,
                                          max_name_column_width=70)
        (self.out / "summary.txt").write_text(head + table)
        prof.export_chrome_trace(str(self.out / "trace.json"))
        print(f"[walsh] profile: {head.strip()} -> {self.out}", flush=True)
