"""``walsh train CONFIG --dry-run``: what a run would do, computed without starting anything.

A pure function of the config and the world size: the model is built on torch's ``meta`` device
(no memory, no init), so even the 350M presets describe in well under a second and nothing here
touches a GPU, Ray or DeepSpeed.

Memory per GPU (``memory_estimate``), in bytes, P = parameters, N = world size:

* model states, mixed precision (bf16): params 2P + grads 2P + fp32 master, Adam m and v 12P;
  fp32: 4P + 4P + 8P. ZeRO-1 divides the optimizer term by N, ZeRO-2 also the grads, ZeRO-3 also
  the params. Muon keeps one buffer instead of two for its matrices, so the Adam figure is an
  upper bound there.
* activations, ROUGH: ~34 * B * T * C bytes per layer in bf16 (Korthikanti et al. 2022, "Reducing
  Activation Recomputation", without the T^2 attention term since SDPA/flash attention does not
  store scores; the SwiGLU MLP at 8/3 C is close to their 4C GELU MLP), twice that in fp32. With
  activation checkpointing: the layer inputs (B * T * C per layer) plus one layer recomputed.
* working weights: every structured layer materializes its effective (quantized) dense matrix
  ``out x in`` in the compute dtype and autograd keeps it for backward (Walsh ``blocks`` and
  ``triton`` layers keep only their A x n_out x n_in blocks), plus the embedding table cast
  for the tied head.
* loss: one chunk of ``loss_chunk_tokens`` logits and their gradient, counted as fp32 (chunk *
  W * 4 * 2, W the vocabulary V padded to ``VOCAB_ALIGN``: the torch path's bound), plus the
  head's gradients that ``walsh.loss`` forms in the forward and keeps for the backward, dW
  [W, C] fp32 and dh [B*T, C], and one more [W, C] fp32 block for the largest transient
  beside them (a chunk's g^T h with its cast in the forward, dW scaled by the loss's
  gradient in the backward).
* Walsh ``triton`` layers (three kernels) also save for the backward u [A, B*T, n_in'] with
  n_in' the lanes rounded up to 8 (16-byte rows, ``row_width`` in
  ``walsh.kernels.walsh_transform``) and their own output [B*T, out] (for dbeta). The output
  of the value, gate and up projections is the very tensor attention and SwiGLU keep for
  their own backward, so it adds nothing there (without a bias); the query, key, attention
  output and down projections' outputs are kept only for dbeta: about B * T * (in + out)
  activations per layer beyond the rough term, less the shared outputs (shared while SDPA keeps
  v as passed, as its flash, cuDNN and memory-efficient kernels do). With RoPE inside
  (``walsh_rope``) the query and key outputs are the rotated tensors SDPA keeps: shared too
  (their per-lane tables, 2 x T x C once per step, fp16 for bf16 activations, are not
  counted: 8 MiB at 1.3B, 16 in fp32).
  With SwiGLU's product inside the down projection (``walsh_swiglu``) the product
  silu(gate) * up is never stored, and the rough term counts it: B * T * hidden comes off.
  walsh-h-1b3 at 16 x 1024 tokens measured 40.38 GiB peak with both inside (session 19; 40.74
  in session 18, when RoPE's tables were built per layer, 0.375 GiB of them), 43.36-43.37 with
  RoPE apart, 47.40-47.93 with both apart (sessions 17-19, docs/benchmarks.md; 58.5 in
  sessions 8-13, when walsh_out wrote z = S H y beside out and the backward kept z); the
  estimate says 40.74, 43.74 and 47.77 GiB. The MLP as one op (``walsh_mlp``) saves what the
  group op and the down op saved (x, u, gate, up, u_d, out): the same count. When
  checkpointing recomputes a layer, only that layer's are counted.

Not counted: the CUDA context and allocator slack, DeepSpeed's communication buckets, the
loader. Treat the total as +-30% and keep ~10% of the device free.
"""

from __future__ import annotations

import torch

from pipeline.config import RunConfig, resolve_batch, resolved_precision, total_steps
from walsh.layers.base import StructuredLinear
from walsh.loss import padded_vocab
from walsh.models import WalshLM
from walsh.models.config import WalshConfig

GIB = 1024**3


def meta_model(wc: WalshConfig) -> WalshLM:
    """The model on the meta device: shapes and parameter counts without memory or init."""
    with torch.device("meta"):
        return WalshLM(wc)


# the layers whose output the next op keeps for its own backward (SDPA keeps v, SwiGLU gate and
# up): the Walsh op's saved output is that same tensor, unless a bias comes between them
SHARED_OUTPUTS = ("attn.v", "mlp.gate", "mlp.up")


def _walsh_saved_width(model: WalshLM, checkpointing: bool) -> int:
    """Sum of the widths the Walsh ``triton`` layers save beyond the rough term (of one block
    when checkpointing): u block-major, each block's lanes rounded up to the row width; the
    output (``walsh_linear``'s autograd) token-major, the output features, where no consumer
    keeps it anyway (``SHARED_OUTPUTS``)."""
    wc = model.config
    if wc.algebra != "walsh" or wc.walsh_impl != "triton":
        return 0
    from walsh.kernels.walsh_transform import row_width  # the triton path has triton

    width = 0
    for name, layer in model.named_modules():
        if isinstance(layer, StructuredLinear):
            width += layer.blocks * row_width(layer.n_in)
            # q and k with RoPE inside (walsh.layers.hadamard.fuse_rope) output what SDPA keeps
            shared = name.endswith(SHARED_OUTPUTS) or getattr(layer, "rope_output", False)
            if not shared or layer.bias is not None:
                width += layer.out_features
            if getattr(layer, "swiglu_input", False):
                # silu(gate) * up formed inside down's passes (walsh.layers.hadamard.fuse_swiglu)
                # is never stored: the rough term's MLP part counts it, so it comes off here
                width -= layer.in_features
    return width // wc.n_layer if checkpointing else width


def _working_weight_numel(model: WalshLM) -> int:
    wc = model.config
    n = wc.vocab_size * wc.n_embd  # embedding table cast for the tied head
    for layer in model.structured_layers():
        blocks_only = wc.algebra == "walsh" and wc.walsh_impl != "dense"
        n += layer.weight.numel() if blocks_only else layer.in_features * layer.out_features
    return n


def memory_estimate(
    cfg: RunConfig, world_size: int, device: str = "cuda", zero_stage: int | None = None,
    model: WalshLM | None = None,
) -> dict[str, int]:
    """Bytes per GPU by component (see the module docstring for the formulas) and ``total``."""
    stage = cfg.train.zero_stage if zero_stage is None else zero_stage
    model = model if model is not None else meta_model(cfg.walsh_config())
    wc = model.config
    n_params = model.num_params()["total"]
    bf16 = resolved_precision(cfg, torch.device(device).type) == "bf16"
    p_bytes, g_bytes, o_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    act = 2 if bf16 else 4
    n = world_size
    b, t, c = cfg.train.micro_batch, cfg.data.seq_len, wc.n_embd
    per_layer = 17 * act * b * t * c  # 34 * B * T * C bytes in bf16
    if cfg.train.activation_checkpointing:
        activations = wc.n_layer * act * b * t * c + per_layer
    else:
        activations = wc.n_layer * per_layer
    out = {
        "params": n_params * p_bytes // (n if stage >= 3 else 1),
        "grads": n_params * g_bytes // (n if stage >= 2 else 1),
        "optimizer": n_params * o_bytes // (n if stage >= 1 else 1),
        "activations": activations,
        "working_weights": act * _working_weight_numel(model),
        "loss_chunk": (min(wc.loss_chunk_tokens, b * t) * padded_vocab(wc.vocab_size) * 4 * 2
                       + 2 * padded_vocab(wc.vocab_size) * c * 4 + act * b * t * c),
        "walsh_saved": act * b * t * _walsh_saved_width(model, cfg.train.activation_checkpointing),
    }
    out["total"] = sum(out.values())
    return out


def _n(x: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x:,} ({x / div:.2f}{unit})"
    return f"{x:,}"


def _schedule_line(cfg: RunConfig, steps: int) -> str:
    s = cfg.schedule
    head = f"{s.kind}, warmup {s.warmup_steps} steps, peak lr {cfg.optim.lr:g}"
    if s.kind == "cosine":
        return f"{head}, cosine to x{s.min_lr_ratio:g} at step {steps}"
    if s.kind == "wsd":
        start = steps - round(s.decay_fraction * steps)
        return f"{head}, stable until step {start}, decay to x{s.min_lr_ratio:g} at step {steps}"
    if s.kind == "two_stage":
        boundary = round(s.stage_boundary * steps)
        return (
            f"{head}; stage 1: x1 -> x{s.stage1_end_ratio:g} at step {boundary}; stage 2: "
            f"x{s.stage2_start_ratio:g} -> x{s.min_lr_ratio:g} at step {steps}, weight decay "
            f"{cfg.optim.weight_decay:g} -> {s.stage2_weight_decay:g}"
        )
    return head


def describe(cfg: RunConfig, world_size: int, device: str = "cuda") -> str:
    """The dry-run report: resolved config, parameters, FLOPs, batch, steps and memory per GPU.
    Raises ``ConfigError`` for what only the world size reveals (batch divisibility)."""
    micro, accum, glob = resolve_batch(cfg, world_size)
    steps = total_steps(cfg, world_size)
    wc = cfg.walsh_config()
    model = meta_model(wc)
    params = model.num_params()
    t = cfg.data.seq_len
    fpt = model.flops_per_token(t)
    tokens_per_step = glob * t
    tokens = steps * tokens_per_step
    prec = resolved_precision(cfg, torch.device(device).type)

    lines = ["# resolved config", cfg.to_yaml().rstrip(), ""]
    lines.append(
        f"# model {cfg.model.preset}: {wc.algebra} (A={wc.algebra_dim}"
        f"{', ' + wc.walsh_impl if wc.algebra == 'walsh' else ''}), "
        f"{'ternary' if wc.ternary else 'full precision'}, {wc.n_layer} layers x {wc.n_embd}, "
        f"{wc.n_head} heads, mlp {wc.mlp_hidden}, vocab {wc.vocab_size}, block {wc.block_size}"
        f"{', head mixing ' + str(wc.head_mix_dim) if wc.head_mix else ''}"
    )
    lines.append(f"# linear layers: {model.linear_paths()}")
    lines.append("# parameters")
    for key in ("total", "embedding", "non_embedding", "ternary", "float"):
        lines.append(f"  {key:<16}{_n(params[key])}")
    lines.append(f"  {'packed export':<16}{params['storage_bits'] / 8 / 2**20:,.1f} MiB")
    lines += [
        "# compute",
        f"  FLOPs/token      {_n(fpt)} (training: forward + backward, at seq_len {t})",
        f"  batch            micro {micro} x world {world_size} x accum {accum} = global {glob} "
        "sequences",
        f"  tokens/step      {_n(tokens_per_step)}",
        f"  steps            {steps:,}"
        + (f" (token budget {cfg.train.token_budget:,})" if cfg.train.steps is None else ""),
        f"  tokens           {_n(tokens)} ({tokens / params['total']:.1f} per parameter)",
        f"  training FLOPs   {fpt * tokens:.3e}",
        f"  schedule         {_schedule_line(cfg, steps)}",
    ]
    if cfg.schedule.warmup_steps >= steps:
        lines.append(
            f"  WARNING: schedule.warmup_steps ({cfg.schedule.warmup_steps}) >= total steps "
            f"({steps}): the peak lr is never reached"
        )

    per = "GPU" if str(device).startswith("cuda") else "process"
    lines.append(
        f"# memory per {per} (estimate, {prec}, world {world_size}, micro batch {micro}"
        f"{', activation checkpointing' if cfg.train.activation_checkpointing else ''}; "
        "rough activations, see pipeline/dry_run.py)"
    )
    mem = {z: memory_estimate(cfg, world_size, device, z, model) for z in range(4)}
    chosen = mem[cfg.train.zero_stage]
    for key, val in chosen.items():
        lines.append(f"  {key:<16}{val / GIB:8.2f} GiB")
    lines.append(
        "  by ZeRO stage    "
        + "  ".join(
            f"{'*' if z == cfg.train.zero_stage else ''}{z}: {m['total'] / GIB:.2f} GiB"
            for z, m in mem.items()
        )
    )
    return "\n".join(lines) + "\n"
