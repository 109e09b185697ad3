"""Batched generation with a static KV cache (MODEL_SPEC section 8).

All rows share one prompt length. Sampling per step: temperature == 0 -> greedy (argmax, no
division by zero); else logits / temperature, then top-k (None or 0 = off), then top-p (nucleus),
then a multinomial draw. A row that emitted ``eos_id`` keeps emitting ``eos_id``; generation stops
early once every row has.
"""

from __future__ import annotations

import torch

from walsh.models.lm import KVCache, WalshLM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: WalshLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """idx [B, T] prompt -> [B, T + n] with n <= max_new_tokens (fewer if all rows hit eos)."""
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be [B, T] with T >= 1, got shape {tuple(idx.shape)}")
    block = model.config.block_size
    total = idx.shape[1] + max_new_tokens
    if total > block:
        raise ValueError(
            f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's block_size={block}"
        )
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    cache = KVCache(model.config, idx.shape[0], total, param.device, param.dtype)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    out, pos, step_in = idx, 0, idx
    for _ in range(max_new_tokens):
        h = model.hidden(step_in, cache=cache, start_pos=pos)
        pos += step_in.shape[1]
        nxt = sample_next(model.logits(h[:, -1]), temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat((out, nxt[:, None]), dim=1)
        step_in = nxt[:, None]
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return out
