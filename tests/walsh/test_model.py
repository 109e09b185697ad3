"""WalshLM: causality for every algebra, the fused loss against plain cross-entropy, gradients,
weight-decay mask, FLOP accounting, bf16 autocast and the block-size guard (MODEL_SPEC 4-7)."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err, small_config

from walsh.models import WalshConfig, WalshLM, get_preset

V, T_BLOCK = 256, 32


small = functools.partial(small_config, vocab_size=V, block_size=T_BLOCK)  # 128 wide


# Every algebra, hash embeddings on (2 and 3 tables alternate), head mixing where n_head allows.
CAUSAL_CASES = {
    "dense": dict(algebra="dense", ternary=False),
    "dense-ternary": dict(algebra="dense", ternary=True),
    "dense-ternary-mix4": dict(algebra="dense", ternary=True, head_mix=True, head_mix_dim=4),
    "cd2-mix": dict(algebra="cayley_dickson", algebra_dim=2, ternary=True, head_mix=True),
    "cd4-mix-percomp": dict(algebra="cayley_dickson", algebra_dim=4, ternary=True,
                            head_mix=True, per_component_scale=True),
    "cd8-mix": dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True),
    "cd8-mix-float": dict(algebra="cayley_dickson", algebra_dim=8, ternary=False, head_mix=True),
    "cd8-mix-act8": dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True,
                         act_bits=8, mixer_ternary=True),
    "cd16": dict(algebra="cayley_dickson", algebra_dim=16, ternary=True),  # 8 heads % 16 != 0
    "walsh2-blocks-mix4": dict(algebra="walsh", algebra_dim=2, walsh_impl="blocks", ternary=True,
                               head_mix=True, head_mix_dim=4),
    "walsh8-blocks-mix4": dict(algebra="walsh", algebra_dim=8, walsh_impl="blocks", ternary=True,
                               head_mix=True, head_mix_dim=4),
    "walsh8-blocks-mix4-act8": dict(algebra="walsh", algebra_dim=8, walsh_impl="blocks",
                                    ternary=True, head_mix=True, head_mix_dim=4, act_bits=8),
    "walsh32-blocks-mix4": dict(algebra="walsh", algebra_dim=32, walsh_impl="blocks",
                                ternary=True, head_mix=True, head_mix_dim=4),
    "walsh2-dense-mix4": dict(algebra="walsh", algebra_dim=2, walsh_impl="dense", ternary=True,
                              head_mix=True, head_mix_dim=4),
    "walsh8-dense-mix4": dict(algebra="walsh", algebra_dim=8, walsh_impl="dense", ternary=False,
                              head_mix=True, head_mix_dim=4, mixer_ternary=True),
    "walsh32-dense-mix4": dict(algebra="walsh", algebra_dim=32, walsh_impl="dense", ternary=True,
                               head_mix=True, head_mix_dim=4),
    "walsh32-triton": dict(algebra="walsh", algebra_dim=32, walsh_impl="triton", ternary=True),
    "walsh4-triton-mix4": dict(algebra="walsh", algebra_dim=4, walsh_impl="triton", ternary=True,
                               head_mix=True, head_mix_dim=4),
    "dense-ternary-act8-int8": dict(algebra="dense", ternary=True, act_bits=8, int8_matmul=True),
    "cd8-act8-int8": dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, act_bits=8,
                          int8_matmul=True),
    "cd8-act8-int8-dx": dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, act_bits=8,
                             int8_matmul=True, int8_dx=True),
    "walsh32-fused": dict(algebra="walsh", algebra_dim=32, walsh_impl="fused", ternary=True),
    "walsh4-fused-mix4": dict(algebra="walsh", algebra_dim=4, walsh_impl="fused", ternary=True,
                              head_mix=True, head_mix_dim=4),
}


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causality_every_algebra(case):
    kw = CAUSAL_CASES[case]
    tables = 2 + list(CAUSAL_CASES).index(case) % 2
    cfg = small(embedding="hash", hash_tables=tables, hash_buckets=31, **kw)
    torch.manual_seed(0)
    model = WalshLM(cfg).eval()
    if cfg.head_mix:  # leave the identity init so the mixer really mixes heads
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mixer." in name:
                    p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 16), generator=gen)
    idx2 = idx.clone()
    idx2[:, 7] = (idx[:, 7] + 1 + torch.randint(0, V - 1, (2,), generator=gen)) % V
    assert (idx2[:, 7] != idx[:, 7]).all()
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert a.dtype == torch.float32 and a.shape == (2, 16, V)
    assert torch.equal(a[:, :7], b[:, :7]), f"{case}: a change at t=7 leaked into t<7"
    assert not torch.equal(a[:, 7:], b[:, 7:]), f"{case}: changing token 7 changed nothing"
    # every later position sees token 7 through attention
    for t in range(7, 16):
        assert not torch.equal(a[:, t], b[:, t]), f"{case}: position {t} ignores token 7"


@pytest.mark.parametrize(
    "kw",
    [
        dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True),
        dict(algebra="walsh", algebra_dim=8, ternary=True, embedding="hash", hash_buckets=31),
        dict(algebra="dense", ternary=False),
    ],
    ids=["cd8", "walsh8-hash", "dense"],
)
@pytest.mark.parametrize("chunk", [5, 4096], ids=["chunk5", "chunk-big"])
def test_forward_loss_equals_cross_entropy(kw, chunk):
    torch.manual_seed(0)
    model = WalshLM(small(loss_chunk_tokens=chunk, **kw)).eval()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, V, (3, 13), generator=gen)
    targets = torch.randint(0, V, (3, 13), generator=gen)
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
        ref = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        assert loss.shape == ()
        assert abs(loss.item() - ref.item()) / ref.item() < 1e-5

        # -100 targets are ignored: the mean runs over the valid positions only
        masked = targets.clone()
        masked[0, :5] = -100
        masked[2, -3:] = -100
        loss_m = model(idx, masked)
        valid = masked.reshape(-1) != -100
        by_hand = F.cross_entropy(logits.reshape(-1, V)[valid], masked.reshape(-1)[valid],
                                  reduction="sum") / valid.sum()
        assert abs(loss_m.item() - by_hand.item()) / by_hand.item() < 1e-5
        assert loss_m.item() != loss.item()  # the mask really changed what is averaged
        # the logits at ignored positions do not matter: an all-ignored row adds nothing
        masked2 = masked.clone()
        masked2[1] = -100
        valid2 = masked2.reshape(-1) != -100
        by_hand2 = F.cross_entropy(logits.reshape(-1, V)[valid2], masked2.reshape(-1)[valid2])
        assert abs(model(idx, masked2).item() - by_hand2.item()) / by_hand2.item() < 1e-5


@pytest.mark.parametrize(
    "kw",
    [
        dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True,
             embedding="hash", hash_buckets=31),
        dict(algebra="walsh", algebra_dim=8, ternary=True, head_mix=True, head_mix_dim=4,
             embedding="hash", hash_tables=3, hash_buckets=31),
        dict(algebra="walsh", algebra_dim=32, walsh_impl="dense", ternary=True, head_mix=True,
             head_mix_dim=4, mixer_ternary=True),
    ],
    ids=["cd8-mix-hash", "walsh8-mix-hash3", "walsh32-dense-mixternary"],
)
def test_backward_grads_finite_and_reach_gains(kw):
    torch.manual_seed(0)
    model = WalshLM(small(loss_chunk_tokens=7, **kw)).train()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (2, 16), generator=gen)
    targets = torch.randint(0, V, (2, 16), generator=gen)
    targets[0, :3] = -100
    loss = model(idx, targets)
    assert torch.isfinite(loss)
    loss.backward()
    checked = {"mixer": 0, "alpha": 0, "beta": 0, "importance": 0}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        leaf = name.rsplit(".", 1)[-1]
        key = "mixer" if ".mixer." in name else leaf if leaf in checked else None
        if key is not None:
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
            checked[key] += 1
    n_layer = model.config.n_layer
    assert checked["mixer"] >= n_layer
    if model.config.algebra == "walsh":
        assert checked["alpha"] == checked["beta"] == 7 * n_layer
    if model.config.embedding == "hash":
        assert checked["importance"] == 1


@pytest.mark.parametrize("mixer_ternary", [False, True], ids=["float-mixer", "ternary-mixer"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True),
        dict(algebra="walsh", algebra_dim=8, ternary=True, head_mix=True, head_mix_dim=4),
    ],
    ids=["cd8", "walsh8"],
)
def test_head_mixer_starts_as_no_op(kw, mixer_ternary):
    """MODEL_SPEC 5: mixers are initialized to the identity, "so mixing starts as a no-op"
    (float by default, ternary by option). The model with its freshly built mixers must give the
    logits of the same model with the mixers removed."""
    torch.manual_seed(0)
    model = WalshLM(small(mixer_ternary=mixer_ternary, **kw)).eval()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(idx)
        for block in model.blocks:
            assert block.attn.mixer is not None
            block.attn.mixer = None
        plain = model(idx)
    assert rel_err(mixed, plain) < 1e-5


def test_decay_mask_exact():
    decayed = re.compile(r"^blocks\.\d+\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))\.weight$")
    cases = [
        small(algebra="cayley_dickson", algebra_dim=8, ternary=True, head_mix=True,
              embedding="hash", hash_buckets=31, bias=True),
        small(algebra="walsh", algebra_dim=8, ternary=True, head_mix=True, head_mix_dim=4),
        small(algebra="dense", ternary=False),
    ]
    for cfg in cases:
        model = WalshLM(cfg)
        mask = model.decay_mask()
        names = [n for n, _ in model.named_parameters()]
        assert sorted(mask) == sorted(names)
        on = {n for n, d in mask.items() if d}
        expected = {n for n in names if decayed.match(n)}
        assert len(expected) == 7 * cfg.n_layer
        assert on == expected, (cfg.algebra, on ^ expected)
        # spot-check the no-decay families are present and off
        off = [n for n, d in mask.items() if not d]
        assert any(n.endswith("norm1.weight") for n in off) and "norm.weight" in off
        assert any(n.startswith("embed.") for n in off)
        if cfg.head_mix:
            assert any(".mixer." in n for n in off)
        if cfg.algebra == "walsh":
            assert any(n.endswith(".alpha") for n in off)
            assert any(n.endswith(".beta") for n in off)
        if cfg.bias:
            assert any(n.endswith(".bias") for n in off)


def _meta_model(cfg: WalshConfig) -> WalshLM:
    with torch.device("meta"):
        return WalshLM(cfg)


def test_flops_dense_125m_by_hand():
    model = _meta_model(get_preset("dense-125m"))
    V_, C, L, F_, T = 50257, 768, 12, 2048, 1024
    per_layer = 2 * (4 * C * C + 3 * C * F_) + 2 * T * C  # q,k,v,o + gate,up,down + attention
    fwd = L * per_layer + 2 * C * V_  # + tied LM head
    assert model.flops_per_token(T) == 3 * fwd
    assert model.flops_per_token(T, training=False) == fwd
    assert model.flops_per_token() == model.flops_per_token(1024)  # default: block_size
    assert model.flops_per_token(512) == 3 * (fwd - L * 2 * 512 * C)


def _walsh_flops(i: int, o: int, a: int) -> int:
    # blocks GEMM 2 in out / A, two butterflies (in + out) log2 A adds, alpha/beta (in + out)
    return 2 * i * o // a + (i + o) * int(math.log2(a)) + (i + o)


def test_flops_walsh_h_125m_by_hand():
    model = _meta_model(get_preset("walsh-h-125m", walsh_impl="blocks"))
    V_, C, L, F_, A, T = 50257, 768, 12, 2048, 32, 1024
    per_layer = 4 * _walsh_flops(C, C, A) + 2 * _walsh_flops(C, F_, A) + _walsh_flops(F_, C, A)
    assert 4 * _walsh_flops(C, C, A) == 4 * (36864 + 7680 + 1536)  # written out once
    fwd = L * (per_layer + 2 * T * C) + 2 * C * V_
    assert model.flops_per_token(T, training=False) == fwd
    assert model.flops_per_token(T) == 3 * fwd
    # far below the dense model of the same shape
    dense = _meta_model(get_preset("dense-125m")).flops_per_token(T)
    assert model.flops_per_token(T) < dense / 2
    # the preset's default materialized path runs one dense GEMM per layer: dense FLOPs
    materialized = _meta_model(get_preset("walsh-h-125m"))
    assert materialized.config.walsh_impl == "dense"
    assert materialized.flops_per_token(T) == dense


def test_flops_walsh_o_125m_by_hand():
    # CD layers cost what dense costs; the octonion head mixer (1 group of 8 heads of 96) costs
    # 2 (A D)^2 per token per layer.
    model = _meta_model(get_preset("walsh-o-125m"))
    V_, C, L, F_, T, A, D = 50257, 768, 12, 2048, 1024, 8, 96
    mixer = (8 // A) * 2 * (A * D) ** 2
    fwd = L * (2 * (4 * C * C + 3 * C * F_) + mixer + 2 * T * C) + 2 * C * V_
    assert model.flops_per_token(T, training=False) == fwd
    assert model.flops_per_token(T) == 3 * fwd


def test_flops_walsh_mixer_by_hand():
    cfg = small(algebra="walsh", algebra_dim=8, head_mix=True, head_mix_dim=4)
    model = WalshLM(cfg)
    C, H, D, F_, L, T = 128, 8, 16, cfg.mlp_hidden, 2, 20
    assert F_ == 384
    # mixer: per head, its own D x D product (2 D^2) and two butterflies over 4 heads (2 D log2 4)
    mixer = H * (2 * D * D + 2 * D * 2)
    per_layer = 4 * _walsh_flops(C, C, 8) + 2 * _walsh_flops(C, F_, 8) + _walsh_flops(F_, C, 8)
    fwd = L * (per_layer + mixer + 2 * T * C) + 2 * C * V
    assert model.flops_per_token(T, training=False) == fwd


def test_bf16_autocast_loss_close_to_fp32():
    cfg = get_preset("tiny", vocab_size=V, block_size=64)
    assert cfg.algebra == "cayley_dickson" and cfg.algebra_dim == 8 and cfg.head_mix
    torch.manual_seed(0)
    model = WalshLM(cfg).eval()
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, V, (2, 48), generator=gen)
    targets = torch.randint(0, V, (2, 48), generator=gen)
    with torch.no_grad():
        ref = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx, targets)
            logits_low = model(idx)
    assert torch.isfinite(low)
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2
    assert logits_low.dtype == torch.float32
    # the loss under autocast is a real bf16 computation, not an fp32 fallback
    assert low.item() != ref.item()


def test_bf16_autocast_backward_finite():
    torch.manual_seed(0)
    model = WalshLM(get_preset("tiny", vocab_size=V, block_size=64))
    idx = torch.randint(0, V, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_sequence_longer_than_block_size_raises():
    model = WalshLM(small(algebra="dense"))
    idx = torch.zeros(1, T_BLOCK + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        model(idx)
    with pytest.raises(ValueError, match="block_size"):
        model(idx, idx)
    model(idx[:, :T_BLOCK])  # exactly block_size is fine
