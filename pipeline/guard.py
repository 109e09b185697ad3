"""The NaN/inf guard: an optimizer step whose loss or gradients are not finite is skipped.

A skipped step leaves the parameters *and* the optimizer state exactly as they were (a run
that skips a step ends bit-identical to one that never saw that step's batches; the test
checks this), is counted, and the run stops once ``train.max_bad_steps`` steps in a row were
skipped. The step counter, the schedule and the loader still advance: the batches of a skipped
step are consumed, as in Megatron and OLMo-core.

Why per optimizer step and on the device: the first guard read each micro batch's loss on the
host before launching its backward. That drains the GPU queue every micro step (1.3 ms of idle
GPU per step on an H100, a quarter of the trainer's overhead over the bare benchmark). Now the
flag stays a device tensor, and the way it takes effect depends on who owns the step:

- ``device`` (ZeRO 0 with an optimizer that honours ``found_inf``, torch's fused AdamW, the
  default on CUDA): the flag is handed to the fused kernel, which skips the update and undoes
  its step count. The host never waits; it reads the counters every ``max_bad_steps`` steps
  and at log steps, so a run of bad steps is stopped at most ``max_bad_steps - 1`` steps late.
- ``host`` (ZeRO 0 with any other optimizer: foreach AdamW, Muon, DeepSpeed's FusedAdam): one
  host read per optimizer step (not per micro step); a bad step's gradients are dropped
  (``grad = None``), which torch optimizers skip entirely.
- ``deepspeed`` (ZeRO 1-3): DeepSpeed owns the partitioned gradients and already skips a step
  whose global gradient norm is not finite (fp32 master weights, ``compute_grad_norm``); the
  guard counts ``engine.was_step_applied()``.

At ZeRO 0 the flag covers the step's micro losses and, when clipping is on, the total gradient
norm; it is all-reduced (max) so every rank skips together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepGuard:
    """Decides, counts and (per mode) enforces skipped steps; see the module doc."""

    def __init__(self, engine, zero_stage: int, world: int, max_bad: int,
                 device: torch.device, verbose: bool = True) -> None:
        self.engine, self.world, self.max_bad, self.verbose = engine, world, max_bad, verbose
        if zero_stage > 0:
            self.mode = "deepspeed"
        elif getattr(engine.optimizer, "_step_supports_amp_scaling", False):
            self.mode = "device"
        else:
            self.mode = "host"
        # device counters: skipped steps, the current streak, the longest streak (int64 [])
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.streak = torch.zeros_like(self.skipped)
        self.longest = torch.zeros_like(self.skipped)
        self.reported = 0  # skipped steps already printed

    def before_step(self, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> None:
        """At an accumulation boundary, after backward (and clipping), before ``engine.step()``.
        ``losses``: this step's micro losses (each a [] tensor); ``grad_norm``: the total
        pre-clip norm when the trainer clipped, else None."""
        if self.mode == "deepspeed":
            return
        bad = ~torch.isfinite(torch.stack(losses)).all()
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        if self.world > 1:  # every rank must skip together: max over ranks, on the device
            flag = bad.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag[0] > 0
        if self.mode == "device":
            self.engine.optimizer.found_inf = bad.float()  # read by the fused kernel
        elif bad.item():  # host mode: optimizers skip parameters without a gradient
            for p in self.engine.module.parameters():
                p.grad = None
        self._count(bad)

    def after_step(self) -> None:
        """After ``engine.step()`` at a boundary (counts DeepSpeed's own skips)."""
        if self.mode == "deepspeed":
            bad = not self.engine.was_step_applied()
            self._count(torch.tensor(bad, device=self.skipped.device))

    def _count(self, bad: torch.Tensor) -> None:
        b = bad.to(torch.int64)
        self.skipped += b
        self.streak.add_(1).mul_(b)  # streak = (streak + 1) if bad else 0
        torch.maximum(self.longest, self.streak, out=self.longest)

    def state_dict(self) -> dict[str, int]:
        """The counters as plain ints, for the checkpoint (one host read, at save time), so a
        resumed run keeps counting skipped steps and streaks where the saved one stopped."""
        skipped, streak, longest = (int(v) for v in
                                    torch.stack([self.skipped, self.streak, self.longest]).tolist())
        return {"skipped": skipped, "streak": streak, "longest": longest}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in ("skipped", "streak", "longest"):
            getattr(self, name).fill_(int(state[name]))
        self.reported = int(state["skipped"])  # already printed by the saved run

    def due(self, step: int) -> bool:
        """Whether ``check`` should run at ``step``: every step when the host already waited,
        else every ``max_bad`` steps (the trainer adds its log steps)."""
        return self.mode != "device" or step % self.max_bad == 0

    def check(self, step: int) -> int:
        """Read the counters (one host sync); print new skips; raise FloatingPointError once
        ``max_bad`` steps in a row were skipped. Returns the number of skipped steps."""
        skipped, longest = (int(v) for v in torch.stack([self.skipped, self.longest]).tolist())
        if skipped > self.reported and self.verbose:
            print(f"[walsh] non-finite loss or gradients: {skipped - self.reported} step(s) "
                  f"skipped by step {step} ({skipped} in all)", flush=True)
        self.reported = skipped
        if longest >= self.max_bad:
            raise FloatingPointError(
                f"{longest} non-finite steps in a row (train.max_bad_steps={self.max_bad}); "
                f"stopping at step {step}")
        return skipped
