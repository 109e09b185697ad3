"""Everything that changes how the single-device model runs, applied in one place.

The model library knows nothing of ranks or compilers; the trainer calls ``parallelize`` once,
before ``deepspeed.initialize`` (which adds data parallelism and ZeRO sharding):

- activation checkpointing (``train.activation_checkpointing``): each block's forward is
  recomputed in backward (non-reentrant ``torch.utils.checkpoint``);
- ``torch.compile`` (``train.compile``, in ``train.compile_mode``): each transformer block's
  forward compiled on its own, so one graph serves all identical blocks and compile time does
  not grow with depth, plus the loss's head (``model.head_loss``) compiled separately: eager,
  the chunked cross-entropy costs about half of a 125M step (docs/benchmarks.md). The block's
  forward is compiled, not its call: module hooks (ZeRO-3's gather and release) run eagerly
  around the graph, never traced into it. Under CUDA graphs (modes "reduce-overhead",
  "max-autotune") every parameter's gradient is copied out of the graph's memory pool as it
  arrives (``_own_grads``);
- ZeRO-3: each transformer block is a DeepSpeed leaf module, the unit that is gathered and
  released whole (FSDP's usual wrapping), so that its parameters are gathered before its
  compiled forward and none of ZeRO-3's per-module hooks run inside it. The modules that run
  their children's layers as one op (``walsh.layers.hadamard.shared_input``: attention's q, k,
  v and the MLP's gate, up; ``swiglu_down``: the down projection on silu(gate) * up) read
  their children's parameters in their own forward, which a leaf's gather covers. The tied
  head's table is read eagerly (``WalshLM.loss``), through ZeRO-3's parameter access hook
  that gathers it, and passed to the compiled ``head_loss``. Memory: a block is gathered
  whole, and DeepSpeed 0.19 reduces a leaf's gradients in one hook after the block's backward
  (not per parameter), so a block's full gradients live until then; it prefetches parameters
  in trace order up to ``stage3_prefetch_bucket_size`` elements ahead (``train.zero_options``;
  default 5e7, about one dense 1.3B block). CUDA-graph compile modes are refused at ZeRO-3
  (``pipeline.config``: graphs replay fixed addresses, and ZeRO-3 gathers anew).
  Before session 19 each submodule was its own unit, whose hooks the compiled blocks traced
  (graph breaks), and the loss stayed eager (traced, it read the partitioned table as an
  empty tensor): walsh-h-125m at ZeRO-3 on one H200 went from 64-81k to 89-122k tokens/s,
  peak 11.0 -> 11.6 GiB (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import CUDA_GRAPH_MODES, RunConfig


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

        for block in model.blocks:
            set_z3_leaf_module(block, True)
    if cfg.train.activation_checkpointing:
        for block in model.blocks:
            block.forward = _checkpointed(block.forward)
    if cfg.train.compile:
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        compile_blocks(model, mode)
    return model


def compile_blocks(model: nn.Module, mode: str | None = None) -> None:
    """Compile each transformer block's forward in place (hooks stay outside the graph), plus
    ``model.head_loss`` on its own (the trainer's and ``walsh bench train``'s one way to
    compile, so the benchmark measures what trains); ``mode``: torch.compile's (the bench tries
    "reduce-overhead", CUDA graphs)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, mode=mode)
    model.head_loss = torch.compile(model.head_loss, mode=mode)
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
