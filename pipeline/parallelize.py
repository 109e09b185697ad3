"""Everything that changes how the single-device model runs, applied in one place.

The model library knows nothing of ranks or compilers; the trainer calls ``parallelize`` once,
before ``deepspeed.initialize`` (which adds data parallelism and ZeRO sharding):

- activation checkpointing (``train.activation_checkpointing``): each block's forward is
  recomputed in backward (non-reentrant ``torch.utils.checkpoint``);
- ``torch.compile`` (``train.compile``, in ``train.compile_mode``): each transformer block
  compiled on its own, so one graph serves all identical blocks and compile time does not grow
  with depth, plus the loss (``model.loss``) compiled separately: eager, the chunked
  cross-entropy costs about half of a 125M step (docs/benchmarks.md). At ZeRO-3 the loss stays
  eager (it reads the tied embedding, which ZeRO-3 keeps partitioned outside its forward).
  Under CUDA graphs (modes "reduce-overhead", "max-autotune") every parameter's gradient is
  copied out of the graph's memory pool as it arrives (``_own_grads``);
- ZeRO-3 leaf modules: a module that runs its children's layers as one op
  (``walsh.layers.hadamard.shared_input``: attention's q, k, v and the MLP's gate, up;
  ``swiglu_down``: the MLP's down projection on silu(gate) * up; ``run_by_parent`` says which
  children) reads their parameters in its own forward, where ZeRO-3
  would have them partitioned (gathered in each child's forward hook, which the group does not
  call). Flagged as a leaf, its own hook gathers the whole subtree's parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import RunConfig
from walsh.layers.hadamard import run_by_parent

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay graphs


def _checkpointed(forward):
    """The block's own forward, recomputed in backward. Replacing the bound method (not
    wrapping the module) keeps parameter names, so checkpoints load into a plain WalshLM."""

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def parallelize(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Move to ``device`` and apply activation checkpointing and compilation per config."""
    model = model.to(device)
    if cfg.train.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_module

        for m in model.modules():
            if any(run_by_parent(c) for c in m.children()):
                set_z3_leaf_module(m, True)
    if cfg.train.activation_checkpointing:
        for block in model.blocks:
            block.forward = _checkpointed(block.forward)
    if cfg.train.compile:
        # ZeRO-3: the loss reads the tied embedding outside the embedding's forward, where
        # DeepSpeed has it partitioned (gathered only through its access hooks): traced, it is
        # an empty tensor, so the loss stays eager there
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        compile_blocks(model, mode, loss=cfg.train.zero_stage != 3)
    return model


def compile_blocks(model: nn.Module, mode: str | None = None, loss: bool = True) -> None:
    """Compile each transformer block in place, plus ``model.loss`` on its own unless
    ``loss`` is false (the trainer's and ``walsh bench train``'s one way to compile, so the
    benchmark measures what trains); ``mode``: torch.compile's (the bench tries
    "reduce-overhead", CUDA graphs)."""
    for block in model.blocks:
        block.compile(mode=mode)
    if loss:
        model.loss = torch.compile(model.loss, mode=mode)
    if mode in CUDA_GRAPH_MODES:
        _own_grads(model)


def _own_grads(model: nn.Module) -> None:
    """Give each parameter a gradient of its own, not one in a CUDA graph's output pool.

    Without this, autograd keeps the backward graph's output tensor as ``param.grad`` (no copy
    when .grad is None); the next micro step's forward starts a new graph generation and
    replays over that memory. Gradient accumulation then either raises ("accessing tensor
    output of CUDAGraphs that has been overwritten by a subsequent run", our trainer on an H200)
    or, in older torch, silently sums the wrong values (pytorch issues 169545, 96693). Only the
    first gradient of a step is copied (later ones are added into .grad at once); at 125M that
    is one read and write of the fp32 gradients, about 0.25 ms. Registered once per model."""
    if getattr(model, "_walsh_own_grads", False):
        return
    model._walsh_own_grads = True
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g, p=p: g.clone() if p.grad is None else g)
