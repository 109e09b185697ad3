"""Compiled blocks (pipeline.parallelize.compile_blocks) give the eager model's gradients,
also under CUDA graphs with gradient accumulation, where the backward graph's output pool is
replayed over between micro steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config_load import load
from pipeline.parallelize import compile_blocks, parallelize
from walsh.layers.hadamard import run_by_parent
from walsh.models import WalshLM
from walsh.models.presets import get_preset


def _accumulated_grads(model: WalshLM, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Two optimizer steps' worth of micro steps, gradients summed over each step's micro
    steps; returns the second step's gradients (the first also warms up and records graphs)."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        for b in batches:
            model(b[:, :-1], b[:, 1:]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_blocks_accumulate_the_eager_gradients(mode):
    torch.manual_seed(0)
    # float weights (not ternary): a compiled absmean may round the scale differently and flip
    # a code, which is not what this test is about
    cfg = get_preset("tiny", vocab_size=512, ternary=False)
    eager = WalshLM(cfg).cuda()
    compiled = WalshLM(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, mode)
    # fresh batches per micro step: a stale pool would show as the wrong sum
    batches = [torch.randint(0, cfg.vocab_size, (2, 33), device="cuda") for _ in range(3)]
    want = _accumulated_grads(eager, batches)
    got = _accumulated_grads(compiled, batches)
    for (name, _), g, w in zip(eager.named_parameters(), got, want):
        err = ((g - w).norm() / w.norm().clamp(min=1e-12)).item()
        assert err < 1e-4, (name, mode, err)  # fp32: compiled kernels reorder sums only


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("group,fuse", [(True, True), (True, False), (False, True),
                                        (False, False)])
def test_zero3_leaf_modules_are_the_blocks(stage, group, fuse):
    """At ZeRO-3 each transformer block is a DeepSpeed leaf module (gathered and released
    whole, its compiled forward free of ZeRO-3's hooks), and nothing else; every module that
    runs its children's Walsh layers inside an op of its own (attention with q, k, v grouped,
    the MLP with gate, up grouped and silu(gate) * up in the down projection) lies inside one,
    so that the leaf's gather covers the parameters it reads. No leaves at other stages."""
    pytest.importorskip("triton")
    cfg = load(Path(__file__).parents[2] / "configs/train/cpu-smoke.yaml", [
        f"train.zero_stage={stage}", "train.compile=false", "model.preset=tiny",
        "model.overrides.algebra=walsh", "model.overrides.algebra_dim=4",
        "model.overrides.walsh_impl=triton", f"model.overrides.walsh_group={group}",
        f"model.overrides.walsh_swiglu={fuse}"])
    model = parallelize(WalshLM(cfg.walsh_config()), cfg, torch.device("cpu"))
    leaves = {n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)}
    blocks = {f"blocks.{i}" for i in range(len(model.blocks))}
    assert leaves == (blocks if stage == 3 else set())
    parents = {n for n, m in model.named_modules() if any(map(run_by_parent, m.children()))}
    # attention runs q, k, v by its op when grouped; the MLP runs gate, up when grouped, and
    # down when the product is inside
    assert len(parents) == len(blocks) * (group + (group or fuse))
    assert all(n.rsplit(".", 1)[0] in blocks for n in parents), parents
