"""Parameter groups, schedules (no accidental cliff), Muon on algebra components, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config_load import from_dict
from pipeline.optim import (
    ComponentMuon,
    apply_schedule,
    build_optimizer,
    lr_multiplier,
    param_groups,
    weight_decay_at,
)
from walsh.models import WalshLM


def cfg_with(**sections):
    raw = {"data": {"path": "unused"}, "train": {"steps": 100}}
    for key, val in sections.items():
        raw[key] = val
    return from_dict(raw)


def small_model(**over) -> WalshLM:
    base = dict(vocab_size=64, block_size=16, n_embd=32, n_head=4, n_layer=1, head_mix=True,
                head_mix_dim=4)
    return WalshLM(cfg_with(model={"preset": "tiny", "overrides": {**base, **over}})
                   .walsh_config())


def test_param_groups_decay_only_latent_weights():
    model = small_model()
    cfg = cfg_with()
    decay, no_decay = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(n for n, m in model.decay_mask().items() if m)
    assert all(n.rsplit(".", 2)[-2] in "q k v o gate up down".split() for n in decayed)
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in kept and "norm.weight" in kept
    assert any("mixer" in n for n in kept)
    # embeddings decay only on request
    decay2, _ = param_groups(model, cfg_with(optim={"decay_embeddings": True}))
    assert any(p is model.embed.weight for p in decay2["params"])


def test_cosine_and_warmup_values():
    cfg = cfg_with(schedule={"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_multiplier(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10, 100) == pytest.approx(1.0)
    half = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))  # halfway through the cosine
    assert lr_multiplier(cfg, 55, 100) == pytest.approx(half)
    assert lr_multiplier(cfg, 100, 100) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays():
    cfg = cfg_with(schedule={"kind": "wsd", "warmup_steps": 0, "decay_fraction": 0.2,
                             "min_lr_ratio": 0.0})
    assert [lr_multiplier(cfg, s, 100) for s in (0, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_multiplier(cfg, 90, 100) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 100, 100) == pytest.approx(0.0)


def test_two_stage_boundary_is_exactly_the_configured_drop():
    s = {"kind": "two_stage", "warmup_steps": 0, "stage_boundary": 0.5, "stage1_end_ratio": 0.6,
         "stage2_start_ratio": 0.3, "min_lr_ratio": 0.1, "stage2_weight_decay": 0.0}
    cfg = cfg_with(schedule=s, optim={"weight_decay": 0.1})
    mults = [lr_multiplier(cfg, step, 1000) for step in range(1000)]
    jumps = [a / b for a, b in zip(mults, mults[1:], strict=False) if b > 0]
    # the only step-to-step ratio above 1.01 is the boundary, and it equals 0.6 / 0.3
    big = [j for j in jumps if j > 1.01]
    assert len(big) == 1 and big[0] == pytest.approx(0.6 / 0.3, rel=1e-2)
    assert mults[0] == pytest.approx(1.0) and mults[-1] == pytest.approx(0.1, abs=1e-3)
    assert weight_decay_at(cfg, 499, 1000) == 0.1 and weight_decay_at(cfg, 500, 1000) == 0.0


def test_apply_schedule_sets_every_group():
    model = small_model()
    cfg = cfg_with(optim={"lr": 1e-3, "weight_decay": 0.1},
                   schedule={"kind": "constant", "warmup_steps": 0})
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert apply_schedule(opt, cfg, 5, 100) == pytest.approx(1e-3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.1), (1e-3, 0.0)]


def test_muon_updates_each_algebra_component_as_a_matrix():
    model = small_model(algebra="cayley_dickson", algebra_dim=4, head_mix=False)
    cfg = cfg_with(optim={"name": "muon", "muon_lr": 0.02, "weight_decay": 0.0},
                   train={"steps": 10, "zero_stage": 0})
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, ComponentMuon)
    w = model.blocks[0].attn.q.weight  # [A=4, 8, 8]
    before = w.detach().clone()
    idx = torch.randint(0, 64, (2, 9))
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    delta = w.detach() - before
    # Muon's update of each component is (close to) orthogonal up to scale: its singular values
    # are roughly equal, unlike a raw gradient step's
    for k in range(4):
        s = torch.linalg.svdvals(delta[k])
        assert s.min() > 0.3 * s.max(), s
    # the embedding (not a hidden matrix) moved through AdamW
    assert opt.adamw.state[model.embed.weight]["step"] == 1


def test_adamw_impl_auto_is_foreach_on_cpu_and_fused_needs_cuda():
    model, cpu = small_model(), torch.device("cpu")
    opt = build_optimizer(model, cfg_with(), cpu)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    for impl in ("fused", "deepspeed"):
        with pytest.raises(ValueError, match=f"optim.impl='{impl}' needs a CUDA device"):
            build_optimizer(model, cfg_with(optim={"impl": impl}), cpu)
