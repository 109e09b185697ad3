"""Hash embeddings (MODEL_SPEC section 7): distinct index tuples for the 50,257 GPT-2 tokens,
a 3-table hash that really wraps modulo p, init, table()/forward agreement, gradients, and the
config checks."""

from __future__ import annotations

import math

import pytest
import torch

from walsh.embedding import HashEmbedding, TokenEmbedding, hash_indices
from walsh.models import WalshConfig, WalshLM

GPT2_V, B = 50257, 1021


@pytest.fixture(scope="module", params=[2, 3], ids=["2tables", "3tables"])
def gpt2_hash(request):
    k = request.param
    return k, hash_indices(GPT2_V, B, k, seed=0)


def test_hash_tuples_distinct_and_in_range(gpt2_hash):
    k, idx = gpt2_hash
    assert idx.shape == (GPT2_V, k) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < B
    # every token has its own tuple (the seed's 3-table hash had only 4,084 distinct triples)
    assert torch.unique(idx, dim=0).shape[0] == GPT2_V


def test_hash_deterministic_per_seed(gpt2_hash):
    k, idx = gpt2_hash
    assert torch.equal(hash_indices(GPT2_V, B, k, seed=0), idx)


def test_two_table_hash_is_mod_and_div():
    idx = hash_indices(GPT2_V, B, 2)
    t = torch.arange(GPT2_V)
    assert torch.equal(idx[:, 0], t % B)
    assert torch.equal(idx[:, 1], (t // B) % B)


def test_three_table_hash_wraps_modulo_p():
    idx = hash_indices(GPT2_V, B, 3, seed=0)
    for i in range(3):
        col = idx[:, i]
        # Without wrapping modulo p, h(t) = (a t + b) mod B and consecutive steps
        # h(t+1) - h(t) mod B would all equal a mod B. Wrapping (subtracting p) adds a second step.
        steps = torch.unique((col[1:] - col[:-1]) % B)
        assert steps.numel() >= 2, f"table {i}: a_i t never wraps modulo p"
        assert not bool((col[1:] >= col[:-1]).all()), f"table {i}: monotone"
        # near-uniform use of the buckets: every bucket used, none overloaded
        counts = torch.bincount(col, minlength=B)
        assert int((counts == 0).sum()) == 0
        assert int(counts.max()) <= 3 * math.ceil(GPT2_V / B)
    # the three tables are independent hashes, not copies of each other
    assert not torch.equal(idx[:, 0], idx[:, 1]) and not torch.equal(idx[:, 1], idx[:, 2])


def test_three_table_seed_changes_hash():
    a = hash_indices(1000, 31, 3, seed=0)
    b = hash_indices(1000, 31, 3, seed=1)
    assert torch.unique(a, dim=0).shape[0] == torch.unique(b, dim=0).shape[0] == 1000
    assert not torch.equal(a, b)


def test_hash_indices_rejects_bad_arguments():
    with pytest.raises(ValueError):
        hash_indices(GPT2_V, 211, 2)  # 211^2 = 44,521 < 50,257
    with pytest.raises(ValueError):
        hash_indices(100, 31, 4)


@pytest.mark.parametrize("k", [2, 3])
def test_hash_embedding_init(k):
    torch.manual_seed(0)
    emb = HashEmbedding(GPT2_V, 64, buckets=B, tables=k, std=0.02)
    assert emb.tables.shape == (k, B, 64)
    assert emb.importance.shape == (GPT2_V, k)
    assert torch.equal(emb.importance, torch.ones(GPT2_V, k))
    # the tables are scaled so that a sum of k rows has the std of a plain embedding row
    std = emb.tables.std().item()
    assert abs(std - 0.02 / math.sqrt(k)) / (0.02 / math.sqrt(k)) < 0.03
    assert abs(emb.tables.mean().item()) < 1e-3
    e_std = emb.table().std().item()
    assert abs(e_std - 0.02) / 0.02 < 0.05


@pytest.mark.parametrize("k", [2, 3])
def test_hash_embedding_formula_and_table_agree(k):
    torch.manual_seed(0)
    vocab, dim = 500, 32
    emb = HashEmbedding(vocab, dim, buckets=31, tables=k, seed=3)
    with torch.no_grad():
        emb.importance.copy_(torch.randn(vocab, k))  # non-trivial importances
    idx = torch.randint(0, vocab, (3, 11))
    out = emb(idx)
    assert out.shape == (3, 11, dim)
    table = emb.table()
    assert table.shape == (vocab, dim)
    assert torch.equal(table[idx], out)  # table()[t] is exactly forward(t)
    # e(t) = sum_i I[t, i] * E_i[h_i(t)], summed in table order
    rows = emb.indices[idx]
    by_hand = 0
    for i in range(k):
        by_hand = by_hand + emb.importance[idx][..., i, None] * emb.tables[i][rows[..., i]]
    assert torch.equal(out, by_hand)
    # and the tuple for each token is distinct, so no two tokens share an embedding
    assert torch.unique(table, dim=0).shape[0] == vocab


def test_hash_embedding_gradients_reach_importance_and_tables():
    torch.manual_seed(0)
    vocab, dim, k = 300, 16, 2
    emb = HashEmbedding(vocab, dim, buckets=31, tables=k)
    idx = torch.tensor([[3, 4, 3, 250]])
    g = torch.randn(1, 4, dim)
    (emb(idx) * g).sum().backward()
    gi = emb.importance.grad
    assert gi is not None and emb.tables.grad is not None
    used = torch.zeros(vocab, dtype=torch.bool)
    used[idx.flatten()] = True
    assert (gi[used] != 0).all()
    assert torch.equal(gi[~used], torch.zeros_like(gi[~used]))
    # dL/dI[t, i] = sum over occurrences of g . E_i[h_i(t)]
    for t in (3, 4, 250):
        occ = (idx[0] == t).nonzero().flatten()
        for i in range(k):
            expect = (g[0, occ] * emb.tables[i, emb.indices[t, i]].detach()).sum()
            assert abs(gi[t, i].item() - expect.item()) <= 1e-6 * max(1.0, abs(expect.item()))
    assert emb.tables.grad.abs().sum() > 0


def test_token_embedding_plain():
    torch.manual_seed(0)
    emb = TokenEmbedding(4096, 64, std=0.02)
    assert abs(emb.weight.std().item() - 0.02) / 0.02 < 0.03
    idx = torch.randint(0, 4096, (2, 5))
    assert torch.equal(emb(idx), emb.table()[idx])


def test_lm_does_not_reinitialize_hash_embedding():
    # seed defect 5: the model's generic init re-initialized tables and importances
    cfg = WalshConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=64,
                      embedding="hash", hash_tables=3, hash_buckets=31)
    torch.manual_seed(0)
    model = WalshLM(cfg)
    assert isinstance(model.embed, HashEmbedding)
    assert torch.equal(model.embed.importance, torch.ones(512, 3))
    std = model.embed.tables.std().item()
    assert abs(std - 0.02 / math.sqrt(3)) / (0.02 / math.sqrt(3)) < 0.1
    assert torch.unique(model.embed.indices, dim=0).shape[0] == 512
    # the tied head uses e(v): logits = h . e(v)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        h = model.hidden(idx)
        assert torch.equal(model(idx), (h @ model.embed.table().T).float())


def test_config_hash_buckets_must_be_prime():
    with pytest.raises(ValueError, match="hash_buckets"):
        WalshConfig(embedding="hash", hash_buckets=1000)
    with pytest.raises(ValueError, match="hash_buckets"):
        WalshConfig(embedding="hash", hash_buckets=1)
    WalshConfig(embedding="hash", hash_buckets=1021)  # prime: fine


def test_config_two_tables_need_enough_buckets():
    # 211 is prime, 211^2 = 44,521 < 50,257
    with pytest.raises(ValueError, match="hash_buckets"):
        WalshConfig(vocab_size=50257, embedding="hash", hash_tables=2, hash_buckets=211)
    WalshConfig(vocab_size=50257, embedding="hash", hash_tables=3, hash_buckets=211)
    WalshConfig(vocab_size=44521, embedding="hash", hash_tables=2, hash_buckets=211)  # B^2 == V


def test_config_hash_tables_range():
    with pytest.raises(ValueError, match="hash_tables"):
        WalshConfig(embedding="hash", hash_tables=4)
    with pytest.raises(ValueError, match="hash_tables"):
        WalshConfig(embedding="hash", hash_tables=1)
