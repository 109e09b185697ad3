"""Presets and WalshConfig: every preset is valid, parameter counts derived by hand, config
errors name their field, and ``replace`` re-derives the SwiGLU width."""

from __future__ import annotations

import pytest
import torch

from walsh.models import WalshConfig, WalshLM, get_preset, presets

REQUIRED = ("tiny", "dense-125m", "walsh-h-125m", "walsh-o-125m",
            "dense-350m", "walsh-h-350m", "walsh-o-350m")
GPT2_V = 50257


def meta_counts(name: str) -> dict[str, int]:
    """num_params() of a preset built on the meta device (no memory, no init work)."""
    with torch.device("meta"):
        return WalshLM(get_preset(name)).num_params()


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    return {name: meta_counts(name) for name in presets}


def test_required_presets_exist():
    for name in REQUIRED:
        assert name in presets, name
    assert "bitnet-125m" in presets and "bitnet-350m" in presets


@pytest.mark.parametrize("name", sorted(presets))
def test_every_preset_is_a_valid_config(name):
    cfg = presets[name]()
    assert isinstance(cfg, WalshConfig)
    assert cfg.name == name
    # re-validating the plain dict gives the same config (derived fields are consistent)
    assert WalshConfig(**cfg.to_dict()) == cfg
    assert get_preset(name) == cfg
    assert cfg.vocab_size == GPT2_V
    assert cfg.n_embd % cfg.algebra_dim == 0 and cfg.mlp_hidden % cfg.algebra_dim == 0
    if cfg.head_mix:
        assert cfg.n_head % cfg.head_mix_dim == 0


def test_preset_families():
    for size, (layers, width) in {"125m": (12, 768), "350m": (24, 1024)}.items():
        d, b = get_preset(f"dense-{size}"), get_preset(f"bitnet-{size}")
        o, h = get_preset(f"walsh-o-{size}"), get_preset(f"walsh-h-{size}")
        for cfg in (d, b, o, h):
            assert (cfg.n_layer, cfg.n_embd) == (layers, width)
        assert (d.algebra, d.ternary) == ("dense", False)
        assert (b.algebra, b.ternary) == ("dense", True)
        assert (o.algebra, o.algebra_dim, o.ternary, o.head_mix) == ("cayley_dickson", 8, True,
                                                                    True)
        assert (h.algebra, h.algebra_dim, h.ternary) == ("walsh", 32, True)
    tiny = get_preset("tiny")
    assert tiny.n_layer == 2 and tiny.algebra == "cayley_dickson" and tiny.head_mix


def test_get_preset_overrides_and_unknown():
    cfg = get_preset("tiny", vocab_size=512, block_size=64)
    assert (cfg.vocab_size, cfg.block_size) == (512, 64)
    assert get_preset("tiny").vocab_size == GPT2_V  # the preset itself is untouched
    with pytest.raises(KeyError, match="nope"):
        get_preset("nope")
    with pytest.raises(ValueError, match=r"\bn_embd\b"):
        get_preset("walsh-h-125m", n_embd=784, n_head=8)  # 784 % 32 != 0 (head dim 98 is fine)


# -- parameter counts, derived by hand ------------------------------------------------------

def dense_counts(C: int, L: int, F: int, V: int = GPT2_V) -> tuple[int, int, int]:
    """(embedding, non_embedding, ternary-eligible weights) of the dense shape."""
    emb = V * C  # tied: the LM head reuses the embedding
    linear = 4 * C * C + 3 * C * F  # q, k, v, o (C x C) + gate, up (C -> F), down (F -> C)
    norms = 2 * C  # two RMSNorm gains per block
    return emb, L * (linear + norms) + C, L * linear  # + the final RMSNorm


def test_dense_125m_count(counts):
    c = counts["dense-125m"]
    emb, non_emb, _ = dense_counts(C=768, L=12, F=2048)
    assert emb == 50257 * 768 == 38_597_376
    assert emb + non_emb == 123_551_232  # V*C + L*(4C^2 + 3CF + 2C) + C
    assert (c["embedding"], c["non_embedding"], c["total"]) == (emb, non_emb, emb + non_emb)
    assert c["ternary"] == 0 and c["float"] == c["total"]
    assert c["storage_bits"] == 16 * c["total"]


def test_dense_350m_count(counts):
    c = counts["dense-350m"]
    F = 2752  # 8 * 1024 / 3 = 2730.67, rounded up to a multiple of 64
    emb, non_emb, _ = dense_counts(C=1024, L=24, F=F)
    assert (c["embedding"], c["non_embedding"], c["total"]) == (emb, non_emb, emb + non_emb)


def test_bitnet_counts(counts):
    for size, (C, L, F) in {"125m": (768, 12, 2048), "350m": (1024, 24, 2752)}.items():
        c = counts[f"bitnet-{size}"]
        emb, non_emb, linear = dense_counts(C, L, F)
        assert c["total"] == emb + non_emb  # same parameters as the dense model
        assert c["ternary"] == linear  # L * (4C^2 + 3CF)
        assert c["float"] == c["total"] - linear
        # 2 bits per ternary weight, 16 per float parameter, one 32-bit scale per layer
        assert c["storage_bits"] == 2 * linear + 16 * (c["total"] - linear) + 32 * 7 * L
    assert counts["bitnet-125m"]["ternary"] == 12 * (4 * 768**2 + 3 * 768 * 2048) == 84_934_656


def walsh_h_counts(C: int, L: int, F: int, A: int = 32) -> tuple[int, int, int]:
    # each Walsh linear: in * out / A latent weights + alpha (in) + beta (out) gains
    weights = (4 * C * C + 3 * C * F) // A
    gains = 4 * (C + C) + 2 * (C + F) + (F + C)  # q,k,v,o; gate, up; down
    return GPT2_V * C, L * (weights + gains + 2 * C) + C, L * weights


def test_walsh_h_counts(counts):
    for size, (C, L, F) in {"125m": (768, 12, 2048), "350m": (1024, 24, 2752)}.items():
        c = counts[f"walsh-h-{size}"]
        emb, non_emb, tern = walsh_h_counts(C, L, F)
        assert (c["embedding"], c["non_embedding"], c["total"]) == (emb, non_emb, emb + non_emb)
        assert c["ternary"] == tern
        assert c["storage_bits"] == 2 * tern + 16 * (c["total"] - tern) + 32 * 7 * L
    # written out for 125m: weights (4 * 768^2 + 3 * 768 * 2048) / 32 = 221,184;
    # gains 4 * 1,536 + 2 * 2,816 + 2,816 = 14,592; norms 1,536; final norm 768
    assert walsh_h_counts(768, 12, 2048)[1] == 12 * (221_184 + 14_592 + 1_536) + 768 == 2_848_512


def walsh_o_counts(C: int, L: int, F: int, H: int, A: int = 8) -> tuple[int, int, int]:
    # each Cayley-Dickson linear: in * out / A; the head mixer: A components M_k of D x D,
    # i.e. (A D)^2 / A, shared by every group of A heads (full precision by default)
    D = C // H
    weights = (4 * C * C + 3 * C * F) // A
    mixer = (A * D) ** 2 // A
    return GPT2_V * C, L * (weights + mixer + 2 * C) + C, L * weights


def test_walsh_o_counts(counts):
    shapes = {"125m": (768, 12, 2048, 8), "350m": (1024, 24, 2752, 16)}
    for size, (C, L, F, H) in shapes.items():
        cfg = get_preset(f"walsh-o-{size}")
        assert cfg.n_head == H and cfg.mlp_hidden == F and not cfg.mixer_ternary
        c = counts[f"walsh-o-{size}"]
        emb, non_emb, tern = walsh_o_counts(C, L, F, H)
        assert (c["embedding"], c["non_embedding"], c["total"]) == (emb, non_emb, emb + non_emb)
        assert c["ternary"] == tern
        assert c["float"] == c["total"] - tern
    # 125m written out: D = 96, mixer 768^2 / 8 = 73,728 per layer
    assert walsh_o_counts(768, 12, 2048, 8)[1] == 12 * (884_736 + 73_728 + 1_536) + 768


def test_tiny_count(counts):
    c = counts["tiny"]
    C, L, F, H = 128, 2, 384, 8  # F: 8 * 128 / 3 = 341.3 -> 384
    emb, non_emb, tern = walsh_o_counts(C, L, F, H)
    assert (c["embedding"], c["non_embedding"], c["ternary"]) == (emb, non_emb, tern)


def test_meta_count_equals_real_build():
    cfg = get_preset("tiny", vocab_size=512, block_size=32)
    with torch.device("meta"):
        meta = WalshLM(cfg).num_params()
    assert WalshLM(cfg).num_params() == meta


def test_structured_models_are_smaller(counts):
    for size in ("125m", "350m"):
        dense = counts[f"dense-{size}"]["non_embedding"]
        assert counts[f"walsh-o-{size}"]["non_embedding"] < dense / 6
        assert counts[f"walsh-h-{size}"]["non_embedding"] < dense / 25


# -- config errors name the field -----------------------------------------------------------

@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(algebra="cayley_dickson", algebra_dim=8, head_mix=True, n_head=12), "n_head"),
        (dict(algebra="walsh", algebra_dim=32, n_embd=784, n_head=8), "n_embd"),
        (dict(algebra="quaternion"), "algebra"),
        (dict(algebra="cayley_dickson", algebra_dim=32), "algebra_dim"),
        (dict(algebra="walsh", algebra_dim=12), "algebra_dim"),
        (dict(algebra="dense", algebra_dim=2), "algebra_dim"),
        (dict(act_bits=4), "act_bits"),
        (dict(embedding="foo"), "embedding"),
        (dict(algebra="dense", head_mix=True), "head_mix"),
        (dict(algebra="walsh", head_mix=True, head_mix_dim=3, n_head=12), "head_mix_dim"),
        (dict(walsh_impl="fast"), "walsh_impl"),
        (dict(int8_matmul=True, ternary=True), "int8_matmul"),  # act_bits is not 8
        (dict(int8_matmul=True, ternary=True, act_bits=8, algebra="walsh"), "int8_matmul"),
        (dict(int8_dx=True, ternary=True, act_bits=8), "int8_dx"),  # without int8_matmul
        (dict(n_head=7), "n_head"),  # 768 % 7
        (dict(n_embd=96, n_head=32), "n_head"),  # head dim 3 is odd (RoPE)
        (dict(mlp_hidden=100, algebra="cayley_dickson"), "mlp_hidden"),  # 100 % 8
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=True), "n_layer"),
        (dict(walsh_group=3), "walsh_group"),
        (dict(walsh_swiglu="yes"), "walsh_swiglu"),
        (dict(ternary="yes"), "ternary"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    # the message leads with the offending field (optionally as WalshConfig.<field>)
    with pytest.raises(ValueError, match=rf"^(WalshConfig\.)?{field}\b"):
        WalshConfig(**kw)


def test_walsh_o_with_twelve_heads_fails_on_n_head():
    with pytest.raises(ValueError, match="n_head"):
        get_preset("walsh-o-125m", n_head=12)
    with pytest.raises(ValueError, match="n_head"):  # walsh-h with its default group 32
        get_preset("walsh-h-125m", head_mix=True)
    cfg = get_preset("walsh-h-125m", head_mix=True, head_mix_dim=4)  # the documented fix
    assert cfg.head_mix_dim == 4


# -- replace and the SwiGLU width ------------------------------------------------------------

def test_mlp_hidden_default_and_replace():
    assert get_preset("dense-125m").mlp_hidden == 2048  # 8 * 768 / 3 = 2048 exactly
    assert get_preset("walsh-h-125m").mlp_hidden == 2048
    # 8 * 1024 / 3 = 2730.67 -> next multiple of lcm(32, 64) = 64 is 2752
    cfg = get_preset("walsh-h-125m").replace(n_embd=1024, n_head=16)
    assert (cfg.n_embd, cfg.algebra_dim, cfg.mlp_hidden) == (1024, 32, 2752)
    # lcm(128, 64) = 128: 2730.67 -> 2816
    cfg = get_preset("walsh-h-125m").replace(n_embd=1024, n_head=16, algebra_dim=128)
    assert cfg.mlp_hidden == 2816
    # back down: 8 * 512 / 3 = 1365.3 -> 1408 (dense, lcm(1, 64) = 64)
    assert get_preset("dense-125m").replace(n_embd=512, n_head=8).mlp_hidden == 1408


def test_replace_keeps_or_rederives_fields():
    cfg = WalshConfig(n_embd=768, mlp_hidden=1536)
    assert cfg.replace(n_layer=2).mlp_hidden == 1536  # untouched when the width is unchanged
    assert cfg.replace(n_embd=1024, n_head=16, mlp_hidden=3072).mlp_hidden == 3072  # explicit
    assert cfg.replace(n_embd=1024, n_head=16).mlp_hidden == 2752  # re-derived
    # changing the algebra re-derives its dim and the mixing group
    cd = get_preset("dense-125m").replace(algebra="cayley_dickson", n_head=8, head_mix=True)
    assert (cd.algebra_dim, cd.head_mix_dim) == (8, 8)
    w = cd.replace(algebra="walsh", head_mix_dim=4)
    assert (w.algebra_dim, w.head_mix_dim, w.mlp_hidden) == (32, 4, 2048)
    with pytest.raises(ValueError, match="n_head"):  # group re-derived to 32 > 8 heads
        cd.replace(algebra="walsh")
    # replace validates
    with pytest.raises(ValueError, match="n_embd"):
        get_preset("walsh-h-125m").replace(n_embd=784, n_head=8)
    # and never mutates the original
    base = get_preset("walsh-o-125m")
    base.replace(n_layer=3)
    assert base.n_layer == 12
