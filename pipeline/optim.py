"""Optimizers, parameter groups and learning-rate / weight-decay schedules.

Parameter groups follow ``WalshLM.decay_mask()``: weight decay on the latent weights of the
structured layers only (never norms, alpha/beta gains, biases, head mixers; embeddings only when
``optim.decay_embeddings``).

Schedules are plain functions step -> multiplier of the base lr, applied by ``apply_schedule``
to every param group each step (so they work the same under every ZeRO stage, whose optimizers
proxy ``param_groups``):
- ``cosine``: linear warmup, cosine to ``min_lr_ratio``.
- ``wsd``: warmup, stable at 1.0, linear decay to ``min_lr_ratio`` over the last ``decay_fraction``.
- ``two_stage`` (BitNet b1.58): warmup, linear 1.0 -> ``stage1_end_ratio`` until the boundary,
  then ``stage2_start_ratio`` -> ``min_lr_ratio``; the drop at the boundary is the explicit
  difference of two config values (the seed's accidental 5-51x cliff was not), and weight decay
  becomes ``stage2_weight_decay`` in stage 2.
- ``constant``: warmup, then 1.0.

Muon (``optim.name: muon``): torch.optim.Muon for the hidden matrices, AdamW for the rest. The
structured layers keep each algebra component as one slice of a [A, n_out, n_in] parameter, so
Muon runs on 2-D proxy parameters that are views of those slices (each component orthogonalized
as its own matrix); their gradients are views of the real gradient, so the update lands in the
real parameter. This needs unflattened parameters: ZeRO stage 0 (checked at config time).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import RunConfig


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """Two AdamW groups: ``decay`` (latent weights [+ embeddings]) and ``no_decay``."""
    mask = model.decay_mask()
    emb = {f"embed.{n}" for n, _ in model.embed.named_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wants = mask[name] or (cfg.optim.decay_embeddings and name in emb)
        (decay if wants else no_decay).append(p)
    o = cfg.optim
    return [
        {"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class ComponentMuon(torch.optim.Optimizer):
    """torch.optim.Muon on each [n_out, n_in] component of 3-D hidden weights, AdamW elsewhere."""

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        o = cfg.optim
        mask = model.decay_mask()
        self._pairs: list[tuple[nn.Parameter, int, nn.Parameter]] = []
        proxies, rest_decay, rest_plain = [], [], []
        for name, p in model.named_parameters():
            if mask[name] and p.ndim == 3:  # latent weights [A, n_out, n_in]
                for k in range(p.shape[0]):
                    proxy = nn.Parameter(p.data[k])  # shares storage with the slice
                    self._pairs.append((p, k, proxy))
                    proxies.append(proxy)
            elif mask[name]:
                rest_decay.append(p)
            else:
                rest_plain.append(p)
        self.muon = torch.optim.Muon(
            proxies, lr=o.muon_lr, weight_decay=o.weight_decay, momentum=o.muon_momentum
        )
        self.adamw = torch.optim.AdamW(
            [{"params": rest_decay, "weight_decay": o.weight_decay},
             {"params": rest_plain, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps,
        )
        for g in self.muon.param_groups:
            g["name"] = "muon"
        self.adamw.param_groups[0]["name"], self.adamw.param_groups[1]["name"] = "decay", "no_decay"
        # torch.optim.Optimizer bookkeeping, without registering params twice
        self.defaults = {}
        self.state = self.adamw.state
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        for p, k, proxy in self._pairs:
            proxy.grad = None if p.grad is None else p.grad[k]
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device):
    o = cfg.optim
    if o.name == "muon":
        return ComponentMuon(model, cfg)
    groups = param_groups(model, cfg)
    cuda = device.type == "cuda"
    if o.impl in ("fused", "deepspeed") and not cuda:
        raise ValueError(f"optim.impl={o.impl!r} needs a CUDA device; use 'auto' or 'foreach' "
                         f"on {device.type}")
    if o.impl == "deepspeed":
        from deepspeed.ops.adam import FusedAdam  # JIT-built op; GPU only

        return FusedAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adam_w_mode=True)
    fused = o.impl == "fused" or (o.impl == "auto" and cuda)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_multiplier(cfg: RunConfig, step: int, total: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``."""
    s = cfg.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    span = max(1, total - s.warmup_steps)
    frac = min(1.0, (step - s.warmup_steps) / span)  # progress after warmup, 0..1
    lo = s.min_lr_ratio
    if s.kind == "constant":
        return 1.0
    if s.kind == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    if s.kind == "wsd":
        start = 1.0 - s.decay_fraction
        return 1.0 if frac < start else 1.0 - (1 - lo) * (frac - start) / s.decay_fraction
    if s.kind == "two_stage":
        if frac < s.stage_boundary:
            return 1.0 - (1.0 - s.stage1_end_ratio) * frac / s.stage_boundary
        f2 = (frac - s.stage_boundary) / (1.0 - s.stage_boundary)
        return s.stage2_start_ratio - (s.stage2_start_ratio - lo) * f2
    raise ValueError(f"schedule.kind: unknown {s.kind!r}")


def weight_decay_at(cfg: RunConfig, step: int, total: int) -> float:
    s = cfg.schedule
    if s.kind == "two_stage":
        span = max(1, total - s.warmup_steps)
        if step >= s.warmup_steps and (step - s.warmup_steps) / span >= s.stage_boundary:
            return s.stage2_weight_decay
    return cfg.optim.weight_decay


def apply_schedule(optimizer, cfg: RunConfig, step: int, total: int) -> float:
    """Set lr and weight decay of every param group for ``step``; returns the AdamW lr."""
    mult = lr_multiplier(cfg, step, total)
    wd = weight_decay_at(cfg, step, total)
    for g in optimizer.param_groups:
        name = g.get("name", "decay")
        g["lr"] = (cfg.optim.muon_lr if name == "muon" else cfg.optim.lr) * mult
        g["weight_decay"] = wd if name in ("decay", "muon") else 0.0
    return cfg.optim.lr * mult
