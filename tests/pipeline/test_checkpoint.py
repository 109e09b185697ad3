"""Checkpoint helpers that only a GPU exercises (the universal path itself runs on CPU in
test_train.py::test_resume_on_another_world_size)."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import _steps_to_param_device


@pytest.mark.gpu
def test_fused_adamw_steps_return_to_the_device_after_a_universal_load():
    """DeepSpeed's universal loader gives AdamW's step counters back as CPU tensors; fused
    AdamW then fails on its first step (seen on 2 H200s, resuming a 2-GPU run on 1)."""
    p = torch.nn.Parameter(torch.randn(33, 7, device="cuda"))
    opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.state[p]["step"] = opt.state[p]["step"].cpu()  # what the universal load leaves
    with pytest.raises(RuntimeError, match="state_steps"):
        opt.step()
    _steps_to_param_device(opt)
    assert opt.state[p]["step"].device == p.device
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())
