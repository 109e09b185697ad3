"""The NaN/inf guard on real DeepSpeed engines (a world of one on gloo), in each of its modes.

A run whose middle step has a NaN micro loss must end bit-identical (weights and optimizer
state) to a run that never saw that step, count one skipped step, and a streak of
``max_bad`` bad steps must stop the run.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_prep.local_ray import free_port

pytestmark = pytest.mark.multiprocess

PROBE = r"""
import os, sys, torch, deepspeed
from pipeline.guard import StepGuard
mode_arg, stage = sys.argv[1], int(sys.argv[2])
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[3])
deepspeed.init_distributed(dist_backend="gloo")

def run(data, bad_steps, max_bad=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                            fused=mode_arg == "fused", foreach=mode_arg == "foreach" or None)
    clip = 1.0 if stage > 0 else 0.0
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2, "gradient_clipping": clip,
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1})
    if stage == 0:
        engine.enable_backward_allreduce = False
    guard = StepGuard(engine, stage, 1, max_bad, torch.device("cpu"))
    step, losses = 0, []
    for i, x in enumerate(data):
        poison = float("nan") if (i // 2 in bad_steps and i % 2 == 1) else 1.0
        loss = engine(x).pow(2).mean() * poison
        engine.backward(loss)
        losses.append(loss.detach())
        boundary = engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and stage == 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            guard.before_step(losses, norm)
        engine.step()
        if boundary:
            guard.after_step()
            losses, step = [], step + 1
            if guard.due(step):
                guard.check(step)
    return model, opt, guard.mode, guard.check(step), guard

gen = torch.Generator().manual_seed(1)
data = [torch.randn(4, 8, generator=gen) for _ in range(12)]  # 6 steps of 2 micro batches
model_a, opt_a, mode, skipped, guard = run(data[:8], {1})
print("MODE", mode, "SKIPPED", skipped)
# the counters survive a checkpoint: a restored guard continues the saved streak
state = guard.state_dict()
print("STATE", state)
again = StepGuard(guard.engine, stage, 1, 3, torch.device("cpu"))
again.load_state_dict({**state, "streak": 2, "longest": 2})
again._count(torch.tensor(True))
try:
    again.check(9)
except FloatingPointError as e:
    print("RESTORED", again.state_dict(), e)
# the reference never saw step 1's batches: the same other batches, one step fewer
ref = run(data[:2] + data[4:8], set())
for (pa, pb) in zip(model_a.parameters(), ref[0].parameters()):
    assert torch.equal(pa, pb), (pa, pb)
sa = [v for s in opt_a.state.values() for k, v in sorted(s.items()) if k != "step"]
sb = [v for s in ref[1].state.values() for k, v in sorted(s.items()) if k != "step"]
assert len(sa) == len(sb) and all(torch.equal(a, b) for a, b in zip(sa, sb))
print("EQUAL")
try:
    run(data, {1, 2, 3, 4}, max_bad=3)
except FloatingPointError as e:
    print("STOPPED", e)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("optimizer,stage,mode,stop", [
    # the device mode reads its counters every max_bad steps: steps 1-4 bad, seen at step 6
    ("fused", 0, "device", "4 non-finite steps in a row (train.max_bad_steps=3); stopping at "
                           "step 6"),
    ("foreach", 0, "host", "3 non-finite steps in a row (train.max_bad_steps=3); stopping at "
                           "step 4"),
    ("foreach", 1, "deepspeed", "3 non-finite steps in a row (train.max_bad_steps=3); "
                                "stopping at step 4"),
    ("foreach", 2, "deepspeed", "3 non-finite steps in a row (train.max_bad_steps=3); "
                                "stopping at step 4"),
    ("foreach", 3, "deepspeed", "3 non-finite steps in a row (train.max_bad_steps=3); "
                                "stopping at step 4"),
])
def test_a_skipped_step_changes_nothing(optimizer, stage, mode, stop, tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBE, optimizer, str(stage), str(free_port())],
                         capture_output=True, text=True, timeout=220, check=False,
                         cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"MODE {mode} SKIPPED 1" in out
    assert "STATE {'skipped': 1, 'streak': 0, 'longest': 1}" in out
    assert ("RESTORED {'skipped': 2, 'streak': 3, 'longest': 3} 3 non-finite steps in a row "
            "(train.max_bad_steps=3); stopping at step 9") in out
    assert "EQUAL" in out
    assert f"STOPPED {stop}\n" in out
