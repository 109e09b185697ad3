"""pipeline.loader: streams over real webdataset shards, every token once per epoch, seeded shard
order, no hang with fewer shards than streams, exact resume (in-process and DataLoader workers),
with and without lanes (each batch row its own stream)."""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from data_prep.manifest import Manifest, TokenizerInfo
from data_prep.shards import write_shard
from pipeline.loader import TokenLoader, stream_ranges

C = 16  # chunk_tokens
T, B = 9, 2  # windows of 10 tokens, 2 per batch
TRAIN_SHARDS = [3, 2, 4, 1, 3]  # chunks per shard: N = 13, the last chunk is short
SHORT = 7  # tokens in the split's last chunk


def make_dataset(root, layout: dict[str, list[int]], short: dict[str, int], dtype="uint32",
                 base: int = 1):
    """Write shards for each split (``layout[split]`` = chunks per shard; the split's last chunk
    has ``short[split]`` tokens if given) with unique, consecutive token values from ``base``.
    Returns the loaded manifest and ``{split: [[chunk arrays of shard 0], ...]}``."""
    infos, chunks, nxt = [], {}, base
    for split, per_shard in layout.items():
        n = sum(per_shard)
        lens = [C] * n
        if split in short:
            lens[-1] = short[split]
        it, chunk_id, chunks[split] = iter(lens), 0, []
        for index, k in enumerate(per_shard):
            shard = []
            for _ in range(k):
                m = next(it)
                shard.append(np.arange(nxt, nxt + m, dtype=dtype))
                nxt += m
            infos.append(write_shard(root, split, index, chunk_id, shard))
            chunks[split].append(shard)
            chunk_id += k
    Manifest(tokenizer=TokenizerInfo("test", "0" * 64, 1 << 17, 0), dtype=dtype,
             chunk_tokens=C, source={}, filters={}, split_rule={}, totals={},
             shards=infos).save(root)
    return Manifest.load(root), chunks


def ref_stream(shards, S: int, s: int, epochs: int, seed=0, shuffle=True, start_epoch=0):
    """The design, written out: stream ``s`` of ``S`` over ``epochs`` epochs from
    ``start_epoch``; returns (tokens, tokens in each epoch)."""
    out, lens = [], []
    for e in range(start_epoch, start_epoch + epochs):
        order = (np.random.default_rng([seed, e]).permutation(len(shards)) if shuffle
                 else range(len(shards)))
        seq = [c for i in order for c in shards[i]]
        a, b = stream_ranges(len(seq), S)[s]
        out += seq[a:b]
        lens.append(sum(len(c) for c in seq[a:b]))
    return np.concatenate(out).astype(np.int64), lens


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def streams_of(manifest, split, world, workers, n_batches, batch_size=B, interleave=True, **kw):
    """Tokens each stream yielded (flattened, in order) over ``n_batches`` batches per rank:
    with lanes, row ``i`` of a batch of role ``r`` is stream ``r * batch_size + i``."""
    W, L = max(1, workers), batch_size if interleave else 1
    streams = {s: [] for s in range(world * W * L)}
    for rank in range(world):
        loader = TokenLoader(manifest, split, T, batch_size, rank=rank, world_size=world,
                             num_workers=workers, interleave=interleave, **kw)
        for i, x in enumerate(take(loader, n_batches)):
            assert x.dtype == torch.long and x.shape == (batch_size, T + 1)
            role = rank * W + i % W
            for lane in range(L):
                rows = x[lane * (batch_size // L):(lane + 1) * (batch_size // L)]
                streams[role * L + lane].append(rows.reshape(-1).numpy())
    return {s: np.concatenate(v) for s, v in streams.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return make_dataset(root, {"train": TRAIN_SHARDS, "val": [2, 1]}, {"train": SHORT, "val": 5})


def test_stream_ranges():
    assert stream_ranges(13, 4) == [(0, 3), (3, 6), (6, 9), (9, 13)]
    for n, S in [(13, 6), (8, 8), (100, 7)]:
        r = stream_ranges(n, S)
        assert r[0][0] == 0 and r[-1][1] == n
        assert all(r[i][1] == r[i + 1][0] for i in range(S - 1))
        assert max(b - a for a, b in r) - min(b - a for a, b in r) <= 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_token_once_per_epoch(data, world, workers, interleave):
    manifest, chunks = data
    shards = chunks["train"]
    L = B if interleave else 1
    S = world * max(1, workers) * L
    longest = max(sum(ref_stream(shards, S, s, 2)[1]) for s in range(S))  # two epochs
    n_batches = max(1, workers) * (longest // (B // L * (T + 1)) + 3)
    streams = streams_of(manifest, "train", world, workers, n_batches, interleave=interleave)
    split = np.sort(np.concatenate([c for sh in shards for c in sh])).astype(np.int64)
    epoch0 = []
    for s, got in streams.items():
        want, lens = ref_stream(shards, S, s, 8)
        assert sum(lens[:2]) <= len(got) <= len(want)  # two epochs or more, windows spanning
        np.testing.assert_array_equal(got, want[:len(got)])
        # epoch 0 of this stream: floor(L / (T + 1)) whole windows plus the tail that the next
        # window carries into epoch 1
        whole = lens[0] // (T + 1) * (T + 1)
        epoch0.append(np.concatenate([got[:whole], got[whole:lens[0]]]))
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch0)), split)


def _shard_orders(tokens: np.ndarray, shards, epochs: int) -> list[list[int]]:
    """Per epoch, the shard order read by a single stream (from the unique token values)."""
    owner = {int(c[0]): i for i, sh in enumerate(shards) for c in sh}
    total = sum(len(c) for sh in shards for c in sh)
    orders = []
    for e in range(epochs):
        part = tokens[e * total:(e + 1) * total]
        starts = [int(t) for t in part if int(t) in owner]  # first token of each chunk
        order = list(dict.fromkeys(owner[t] for t in starts))
        assert sorted(order) == list(range(len(shards)))
        orders.append(order)
    return orders


def test_shard_order_seeded_per_epoch(data):
    manifest, chunks = data
    shards, total = chunks["train"], sum(len(c) for sh in chunks["train"] for c in sh)
    n = 3 * total // (B * (T + 1)) + 1
    one = dict(interleave=False)  # one stream reads the whole split in shard order
    got = {seed: streams_of(manifest, "train", 1, 0, n, seed=seed, **one)[0] for seed in (0, 1)}
    orders = _shard_orders(got[0], shards, 3)
    assert orders[0] != orders[1]
    assert _shard_orders(got[1], shards, 3) != orders
    again = streams_of(manifest, "train", 1, 0, n, seed=0, **one)[0]
    np.testing.assert_array_equal(again, got[0])
    fixed = streams_of(manifest, "train", 1, 0, n, shuffle=False, **one)[0]
    assert _shard_orders(fixed, shards, 3) == [list(range(len(shards)))] * 3
    np.testing.assert_array_equal(fixed[:total], np.concatenate([c for sh in shards for c in sh]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("interleave", [True, False])
def test_fewer_shards_than_streams(tmp_path, interleave):
    manifest, chunks = make_dataset(tmp_path, {"train": [8]}, {})
    # 1 shard, 8 full chunks, 2 ranks x 2 workers = 4 streams of 2 chunks (lanes: x 2 rows =
    # 8 streams of 1 chunk); many epochs each
    L = B if interleave else 1
    streams = streams_of(manifest, "train", 2, 2, 20, interleave=interleave)
    assert len(streams) == 4 * L
    for s, got in streams.items():
        assert len(got) == 10 * B // L * (T + 1)
        want, lens = ref_stream(chunks["train"], 4 * L, s, 8)
        assert lens == [2 // L * C] * 8
        np.testing.assert_array_equal(got, want[:len(got)])


def test_fewer_chunks_than_streams_raises(tmp_path):
    manifest, _ = make_dataset(tmp_path, {"train": [3]}, {})
    with pytest.raises(ValueError, match=r"'train'.*N=3.*S=4"):
        TokenLoader(manifest, "train", T, B, rank=0, world_size=4, interleave=False)
    with pytest.raises(ValueError, match=r"N=3.*S=4"):
        TokenLoader(manifest, "train", T, B, rank=1, world_size=2, num_workers=2,
                    interleave=False)
    with pytest.raises(ValueError, match=r"N=3.*S=4.*batch_size=2 lanes"):  # 2 ranks x 2 rows
        TokenLoader(manifest, "train", T, B, rank=1, world_size=2)
    TokenLoader(manifest, "train", T, 3)  # 3 lanes of one chunk each
    with pytest.raises(ValueError, match="'test'"):
        TokenLoader(manifest, "test", T, B)


def _resume_case(manifest, world, workers, k, batch_size=4):
    """For every rank: the uninterrupted loader's batches k..k+4 equal those of a fresh loader
    restored from the state saved after k batches (JSON round trip); then once more from the
    resumed loader's own state."""
    kw = dict(world_size=world, num_workers=workers, seed=3)
    for rank in range(world):
        straight = take(TokenLoader(manifest, "train", T, batch_size, rank=rank, **kw), k + 7)
        first = TokenLoader(manifest, "train", T, batch_size, rank=rank, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["batches"] == k and state["version"] == 2 and state["interleave"]
        resumed = TokenLoader(manifest, "train", T, batch_size, rank=rank, **kw)
        resumed.load_state_dict(state)
        before = resumed.epoch
        got = take(resumed, 5)
        assert math.floor(resumed.epoch) > math.floor(before)  # crossed an epoch boundary
        for i in range(5):
            assert torch.equal(got[i], straight[k + i]), (rank, i)
        again = TokenLoader(manifest, "train", T, batch_size, rank=rank, **kw)
        again.load_state_dict(resumed.state_dict())
        for i, x in enumerate(take(again, 2)):
            assert torch.equal(x, straight[k + 5 + i])


@pytest.mark.parametrize("k", [0, 3, 8])
def test_exact_resume_ranks(data, k):
    _resume_case(data[0], world=2, workers=0, k=k)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [3, 8])
def test_exact_resume_workers(data, k):
    # k = 3: the resumed DataLoader's worker 0 must continue stream role 1
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()
    _resume_case(data[0], world=1, workers=2, k=k)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the loader leaves global RNGs alone
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))


def test_changed_world_size_warns_and_restarts_epoch(data, caplog):
    manifest, chunks = data
    saved = TokenLoader(manifest, "train", T, B, rank=1, world_size=2, seed=3,
                        interleave=False)
    take(saved, 9)
    state = saved.state_dict()
    loader = TokenLoader(manifest, "train", T, B, seed=3, interleave=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        loader.load_state_dict(state)
    assert any("world_size=2 (now 1)" in r.getMessage() for r in caplog.records)
    e = loader.epoch
    assert e == int(e) and 1 <= e <= saved.epoch
    want, _ = ref_stream(chunks["train"], 1, 0, 2, seed=3, start_epoch=int(e))
    got = torch.cat([x.reshape(-1) for x in take(loader, 3)]).numpy()
    np.testing.assert_array_equal(got, want[:len(got)])
    # the restart is remembered: an exact resume from the new loader's state continues it
    state2 = loader.state_dict()
    assert state2["start_epoch"] == int(e) and state2["batches"] == 3
    more = TokenLoader(manifest, "train", T, B, seed=3, interleave=False)
    more.load_state_dict(state2)
    got2 = next(more).reshape(-1).numpy()
    np.testing.assert_array_equal(got2, want[len(got):len(got) + B * (T + 1)])


@pytest.mark.timeout(120)
def test_zero_and_one_worker_resume_exactly(data, caplog):
    manifest = data[0]
    straight = take(TokenLoader(manifest, "train", T, B, num_workers=1), 6)
    first = TokenLoader(manifest, "train", T, B)
    take(first, 3)
    resumed = TokenLoader(manifest, "train", T, B, num_workers=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        resumed.load_state_dict(first.state_dict())
    assert not caplog.records
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 3), straight[3:]))


def test_state_mismatch_raises(data):
    manifest, _ = data
    state = TokenLoader(manifest, "train", T, B, seed=3).state_dict()
    for key, loader in [("seed", TokenLoader(manifest, "train", T, B, seed=4)),
                        ("split", TokenLoader(manifest, "val", T, B, seed=3)),
                        ("shuffle", TokenLoader(manifest, "train", T, B, seed=3, shuffle=False))]:
        with pytest.raises(ValueError, match=key):
            loader.load_state_dict(state)


def test_uint16_and_short_last_chunk(tmp_path):
    manifest, chunks = make_dataset(tmp_path, {"train": [2, 3]}, {"train": 1}, dtype="uint16",
                                    base=65536 - 5 * C)
    shards = chunks["train"]
    assert manifest.split_tokens("train") == 4 * C + 1
    n = 3 * (4 * C + 1) // (B * (T + 1)) + 1
    for world in (1, 2):
        streams = streams_of(manifest, "train", world, 0, n, interleave=False)
        for s, got in streams.items():
            want, _ = ref_stream(shards, world, s, 8)
            assert len(want) >= len(got)
            np.testing.assert_array_equal(got, want[:len(got)])
    # with 2 streams the short chunk (one token, the largest value) is always in stream 1
    assert int(streams[1].max()) == 65536 - C and int(streams[0].max()) < 65536 - C


def test_inconsistent_manifest_raises(data, tmp_path):
    manifest, _ = data
    raw = manifest.to_dict()
    raw["shards"][1]["tokens"] -= 1  # a short chunk in a shard that is not the split's last
    bad = Manifest.from_dict(raw, root=manifest.root)
    with pytest.raises(ValueError, match="short chunk"):
        TokenLoader(bad, "train", T, B)
    raw["shards"][1]["tokens"] -= C  # not even one short chunk
    with pytest.raises(ValueError, match="train-000001.tar"):
        TokenLoader(Manifest.from_dict(raw, root=manifest.root), "train", T, B)


def test_version_one_state_means_no_lanes(data, caplog):
    """A state saved before lanes existed resumes exactly into a lane-less loader, and
    approximately (with a warning naming the setting) into the default one."""
    manifest = data[0]
    straight = take(TokenLoader(manifest, "train", T, B, seed=3, interleave=False), 6)
    old = TokenLoader(manifest, "train", T, B, seed=3, interleave=False)
    take(old, 3)
    state = old.state_dict()
    del state["interleave"]
    state["version"] = 1
    exact = TokenLoader(manifest, "train", T, B, seed=3, interleave=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        exact.load_state_dict(state)
    assert not caplog.records
    assert all(torch.equal(x, y) for x, y in zip(take(exact, 3), straight[3:]))
    lanes = TokenLoader(manifest, "train", T, B, seed=3)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        lanes.load_state_dict(state)
    assert any("interleave=False (now True)" in r.getMessage() for r in caplog.records)
    state["version"] = 3
    with pytest.raises(ValueError, match="version 3"):
        lanes.load_state_dict(state)
    state["version"] = 2  # a version-2 state must say whether it had lanes
    with pytest.raises(ValueError, match="lacks interleave"):
        lanes.load_state_dict(state)
    # one row per batch: with or without lanes it is the same stream, so the resume is exact
    single = TokenLoader(manifest, "train", T, 1, seed=3, interleave=False)
    straight1 = take(TokenLoader(manifest, "train", T, 1, seed=3), 5)
    take(single, 2)
    one = {**single.state_dict(), "version": 1}
    del one["interleave"]
    resumed = TokenLoader(manifest, "train", T, 1, seed=3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        resumed.load_state_dict(one)
    assert not caplog.records
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 3), straight1[2:]))
