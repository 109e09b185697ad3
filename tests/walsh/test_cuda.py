"""The model library on a CUDA device: bf16 autocast and torch.compile agree with fp32 eager.

Marked ``gpu``: skipped where CUDA is absent (CI); run on a GPU machine with
``python -m pytest -m gpu tests/walsh/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.parallelize import compile_model
from walsh.generate import generate
from walsh.models import WalshLM, get_preset

pytestmark = pytest.mark.gpu

CASES = {
    "dense": dict(algebra="dense", ternary=False, head_mix=False),
    "bitnet": dict(algebra="dense", ternary=True, head_mix=False),
    "octonion-mix": dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True),
    "walsh-blocks": dict(algebra="walsh", algebra_dim=32, walsh_impl="blocks", ternary=True,
                         head_mix=False),
    "walsh-dense": dict(algebra="walsh", algebra_dim=32, walsh_impl="dense", ternary=True,
                        head_mix=False),
}


def build(overrides: dict) -> WalshLM:
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=1000, block_size=128, n_embd=256, **overrides)
    return WalshLM(cfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_loss_and_grads_match_fp32(name):
    model = build(CASES[name]).cuda()
    idx = torch.randint(0, 1000, (4, 129), device="cuda")
    ref = model(idx[:, :-1], idx[:, 1:])
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert rel(loss, ref) < 1e-2
    # the input-side weights see bf16 rounding of every activation: a looser bound
    assert rel(model.embed.weight.grad, g_ref["embed.weight"]) < 5e-2


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_model_matches_eager(name, scope):
    model = build(CASES[name]).cuda()
    idx = torch.randint(0, 1000, (2, 65), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx[:, :-1], idx[:, 1:])
        compile_model(model, scope=scope)  # what the trainer and `walsh bench train` compile
        compiled = model(idx[:, :-1], idx[:, 1:])
    assert rel(compiled, eager) < 1e-2


def test_kv_cache_generation_on_cuda_matches_recompute():
    model = build(CASES["octonion-mix"]).cuda().eval()
    prompt = torch.randint(0, 1000, (3, 9), device="cuda")
    out = generate(model, prompt, max_new_tokens=6)
    for k in range(9, out.shape[1]):
        with torch.no_grad():
            nxt = model(out[:, :k])[:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, k])
