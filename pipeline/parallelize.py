"""Everything that changes how the single-device model runs, applied in one place.

The model library knows nothing of ranks or compilers; the trainer calls ``parallelize`` once,
before ``deepspeed.initialize`` (which adds data parallelism and ZeRO sharding):

- activation checkpointing (``train.activation_checkpointing``): each block's forward is
  recomputed in backward (non-reentrant ``torch.utils.checkpoint``);
- ``torch.compile`` (``train.compile``, in ``train.compile_mode``, over
  ``train.compile_scope``): the model's whole forward as one graph ("model", the default at
  ZeRO-0), or each transformer block's forward on its own, so that one graph serves all
  identical blocks and compile time does not grow with depth, plus the loss's head
  (``model.head_loss``) compiled separately ("blocks", the default at ZeRO 1-3; eager, the
  chunked cross-entropy costs about half of a 125M step, docs/benchmarks.md). The whole
  forward ran 2.7-3.1% faster at 125M on one H200 under CUDA graphs (inductor can fuse across
  the blocks' seams, and one graph replays each way instead of 13), for ~6x the compile time
  (session 33); its backward returns every gradient at its end, which would keep ZeRO 1-2's
  reductions from overlapping it (``train.compile_scope``'s comment). Either way a forward
  is compiled, not a module's call: the compiled module's own hooks (with blocks, ZeRO-3's
  gather and release) run eagerly around the graph; with the whole forward its submodules'
  hooks are traced (ZeRO 0-2 registers none there). Under CUDA graphs
  (modes "reduce-overhead", "max-autotune") each parameter's first gradient of a step is
  copied out of the graph's memory pool (``_own_grads``, by ``train.grad_copy``): all of a
  backward pass's at its end in one copy per dtype (``"pass"``, the default:
  ``_PassCopy``), or each as it arrives (``"param"``);
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

from collections import defaultdict

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors
from torch.utils.checkpoint import checkpoint

from pipeline.config import CUDA_GRAPH_MODES, GRAD_COPIES, GRAD_COPY_DEFAULT, RunConfig


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
        compile_model(model, mode, cfg.train.grad_copy, cfg.train.compile_unit)
    return model


COMPILE_UNITS = ("model", "blocks")


def compile_model(model: nn.Module, mode: str | None = None,
                  grad_copy: str = GRAD_COPY_DEFAULT, scope: str = "model") -> None:
    """Compile in place (the trainer's and ``walsh bench train``'s one way to compile, so the
    benchmark measures what trains): ``scope`` "model" the model's forward, "blocks" each
    transformer block's forward plus ``model.head_loss`` (the compiled modules' own hooks stay
    outside the graphs); ``mode``: torch.compile's (the bench tries "reduce-overhead", CUDA graphs);
    ``grad_copy``: how gradients leave the graphs' pool under CUDA graphs (``GRAD_COPIES``;
    ``_own_grads``)."""
    if grad_copy not in GRAD_COPIES:
        raise ValueError(f"grad_copy={grad_copy!r}: expected one of {GRAD_COPIES}")
    if scope not in COMPILE_UNITS:
        raise ValueError(f"scope={scope!r}: expected one of {COMPILE_UNITS}")
    if scope == "model":  # the bound method, replaced on the instance: names and hooks stay
        model.forward = torch.compile(model.forward, mode=mode)
    else:
        for block in model.blocks:
            block.forward = torch.compile(block.forward, mode=mode)
        model.head_loss = torch.compile(model.head_loss, mode=mode)
    if mode in CUDA_GRAPH_MODES:
        _own_grads(model, grad_copy)


def _own_grads(model: nn.Module, grad_copy: str) -> None:
    """Give each parameter a gradient of its own, not one in a CUDA graph's output pool.

    Without this, autograd keeps the backward graph's output tensor as ``param.grad`` (no copy
    when .grad is None); the next micro step's forward starts a new graph generation and
    replays over that memory. Gradient accumulation then either raises ("accessing tensor
    output of CUDAGraphs that has been overwritten by a subsequent run", our trainer on an H200)
    or, in older torch, silently sums the wrong values (pytorch issues 169545, 96693). Only the
    first gradient of a step is copied (later ones are added into .grad at once): one read and
    write of the fp32 gradients. ``"param"`` clones each in its own hook: at 125M 283 copies a
    step, 0.46 ms of kernels and about 23 us of host time each through ``aten::clone``
    (session 24's profile); ``"pass"`` (the default): ``_PassCopy``. Registered once per
    model."""
    if getattr(model, "_walsh_own_grads", None) is not None:
        if model._walsh_own_grads != grad_copy:
            raise ValueError(f"gradients already copied by {model._walsh_own_grads!r}, "
                             f"not {grad_copy!r}")
        return
    model._walsh_own_grads = grad_copy
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_copy == "param":
        for p in params:
            p.register_hook(lambda g, p=p: g.clone() if p.grad is None else g)
        return
    copier = _PassCopy()
    for p in params:
        p.register_hook(lambda g, p=p: copier.note(p, g))


class _PassCopy:
    """Each backward pass's first gradients, copied at the pass's end into one buffer per
    (dtype, device) with one ``torch.cat`` each.

    A parameter's hook runs before autograd stores its gradient; when ``.grad`` is None it only
    records the parameter and the gradient's address (no reference to the tensor, so autograd
    still takes it as ``.grad`` without a copy) and, first in the pass, queues a callback for
    the pass's end: before any later forward can replay over the pool. There each recorded
    ``.grad`` still at its address gets the buffer's view as its storage (``.grad.data = v``:
    the same tensor object, so a hook that kept it, as DeepSpeed's ZeRO-1/2 buckets do
    without ``contiguous_gradients``, reduces what the optimizer reads); gradients that sit
    elsewhere by then (another hook moved them, as ZeRO-2's contiguous buckets do, or autograd
    copied them to meet the parameter's strides) are already owned and left; non-contiguous
    ones are cloned one by one.

    Each pass's table belongs to its callback (``note`` starts a new one when autograd's graph
    task changes). The model is on one device (``parallelize``), so one engine thread runs all
    of a pass's hooks: ``note`` takes no lock. A pass that
    raises never runs its callback: the gradients it stored stay in the pool (``"param"`` had
    cloned them), and the caller zeroes them before the next step. ``torch.autograd.grad``
    returns the pool's tensors themselves (``"param"``: clones); no ``.grad`` is touched.

    The pool's gradients stay alive until the pass ends. CUDA graph trees record each node
    with the outputs that were dead before it, and replaying one whose recording saw them dead
    while they are alive records a new branch (``ExpectedDeadIndicesBeforeGraphMismatch``,
    ``num_rerecord``): with gradient accumulation a step's first micro step may record the rest
    of the backward path once more. Measured on one H200 (session 26, docs/benchmarks.md):
    the GPU accumulation and trainer tests pass with it; walsh-h-125m (Triton layers, CUDA
    graphs) ran at 437-439k tok/s against 430-433k with ``"param"`` in ``walsh bench train``
    (one micro step a step, a step's profiled wall 40.0 against 40.8 ms), and in the trainer
    with 2 micro steps a step at 436k against 434k, at the same peak memory (9.22 GiB), so
    it is the default."""

    def __init__(self) -> None:
        self.task = -1  # the graph task whose table ``entries`` is
        self.entries: dict[int, tuple[nn.Parameter, int]] = {}  # id(p) -> (p, grad's address)

    def note(self, p: nn.Parameter, g: torch.Tensor) -> None:
        if p.grad is not None:
            return  # a later micro step: autograd adds g into .grad, which is ours already
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task, self.entries = task, {}
            entries = self.entries
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _own_all(entries))
        self.entries[id(p)] = (p, g.data_ptr())


def _own_all(entries: dict[int, tuple[nn.Parameter, int]]) -> None:
    """``_PassCopy``'s callback: one pass's recorded gradients into buffers of their own."""
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for p, ptr in entries.values():
        g = p.grad
        if g is None or g.data_ptr() != ptr:
            continue  # not autograd's stolen tensor: owned by whoever put it there
        if g.is_contiguous():
            groups[(g.dtype, g.device)].append(p)
        else:
            g.data = g.clone()
    entries.clear()  # drop the parameters' references with the pass
    for ps in groups.values():
        grads = [p.grad for p in ps]
        # one concatenating copy (not _flatten_dense_tensors: of one tensor it returns a view)
        flat = torch.cat([g.view(-1) for g in grads])
        for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.data = v
