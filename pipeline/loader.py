"""Streaming token loader over a staged dataset's webdataset shards, with exact resume.

``TokenLoader(manifest, split, seq_len=T, batch_size=B, rank, world_size, num_workers)`` yields
endless ``torch.long`` batches ``[B, T + 1]`` (inputs ``x[:, :-1]``, targets ``x[:, 1:]``) cut
from the chunks of one split of a ``data_prep.manifest.Manifest``.

Streams
    There are ``S = world_size * max(1, num_workers)`` streams; stream
    ``s = rank * max(1, num_workers) + worker`` where ``worker`` is the DataLoader worker
    (worker 0 when ``num_workers == 0``).

Epochs and the split into streams
    In epoch ``e`` the split's shards are permuted with ``np.random.default_rng([seed, e])``
    (manifest order when ``shuffle=False``; shards with no samples are left out). The chunks of
    the split in that shard order (each shard's samples in file order) form one sequence of ``N``
    chunks, and stream ``s`` takes the contiguous positions ``stream_ranges(N, S)[s] =
    [floor(s N / S), floor((s + 1) N / S))``. So every chunk, hence every token, goes to exactly
    one stream per epoch, streams differ by at most one chunk, and a stream opens only the few
    shards that overlap its range. ``N < S`` is a ``ValueError`` (naming the split, N and S):
    some stream would have nothing, and a rank with nothing would hang the others.

Lanes: the rows of a batch come from different places
    With ``interleave=True`` (training) each role's stream is itself ``B`` lanes, so there are
    ``S = world_size * max(1, num_workers) * B`` streams and stream ``s = (rank * max(1,
    num_workers) + worker) * B + row``; row ``i`` of every batch is the next window of lane
    ``i``. A batch then holds ``B`` windows from ``B`` places of the epoch, and a micro step of
    all ranks ``world_size * B`` of them: the same rows per micro step split over other rank
    counts read the same data (1 rank x 8 rows = 2 ranks x 4 rows, the same lane ranges). With
    accumulation a lane gives one window per micro step. Without lanes (``interleave=False``,
    ``S = world_size * max(1, num_workers)``), a batch is ``B`` consecutive windows of one
    stream: on a corpus whose neighbouring documents are alike, a 1-rank run's batches were then
    far less diverse than a 2-rank run's at the same global batch, and its loss curve sat
    visibly higher (docs/benchmarks.md, issue 6). Evaluation keeps ``interleave=False``: it
    reads fixed batches of a small split.
    The price: a lane that starts inside a shard reads that shard through up to its start (read,
    not decoded) at every epoch start and resume, so ``B`` times more streams read more bytes
    (measured: a 1.1-1.7 s first batch with 16 lanes over 128 MiB shards, docs/benchmarks.md).

Windows and batches
    Each stream is an endless token sequence: the concatenation over epochs ``e = 0, 1, 2, ...``
    of its chunks in that epoch. Windows of ``T + 1`` tokens are cut back to back from it
    (non-overlapping; a window may span chunks and epochs); a batch takes one window from each
    of its ``B`` lanes, or ``B`` consecutive windows of its one stream without lanes. Every rank
    therefore always has a next batch, whatever the shard counts.

Position and state
    Every chunk holds ``manifest.chunk_tokens`` tokens except possibly the split's last chunk (the
    last sample of the one shard whose token total is short; checked against the manifest at
    construction and against every chunk read). Chunk lengths are thus known without reading, and
    a stream's position is fully described by the number of windows it has consumed: it is mapped
    to (epoch, chunk, offset) arithmetically and the stream seeks there, opening only the shards
    it still needs and skipping samples only inside the first of them (skipped samples are read
    through, not decoded).

    With ``num_workers = W > 0`` the batches come from a ``torch.utils.data.DataLoader``
    (``batch_size=None``, ``in_order=True``) over an ``IterableDataset`` that batches itself;
    torch takes batches from its workers round robin, so the rank's batch ``b`` comes from stream
    role ``b % W``. The state is the number of batches the rank has consumed, counted in the main
    process as batches are handed out (prefetching does not matter), plus identity fields:
    ``{"batches", "seq_len", "batch_size", "world_size", "num_workers", "seed", "split",
    "shuffle", "interleave", "start_epoch", "version": 2}`` (a version-1 state, written before
    lanes existed, reads as ``interleave=False``). Each role's windows consumed follow from
    ``batches``; after a resume at batch ``n`` the DataLoader's worker ``i`` plays role
    ``(i + n) % W`` so that the next batch is exactly the one the saved loader would have yielded.
    All ranks consume batches in lockstep, so the state is the same on every rank.

    ``start_epoch`` is 0 unless an approximate restart happened: loading a state saved with a
    different world size, worker count, sequence length, batch size or lane setting cannot be
    exact, so it logs
    a warning and restarts every stream at the beginning of the epoch the slowest saved stream was
    in (tokens of that epoch already seen by faster streams are seen again). A different split,
    seed or shuffle flag is a ``ValueError``.

Neither the global torch RNG (the DataLoader gets its own generator), numpy's nor Python's
``random`` is touched, so a trainer's saved RNG states are unaffected by the loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import Manifest
from data_prep.shards import read_samples

logger = logging.getLogger(__name__)

STATE_VERSION = 2


def stream_ranges(n_chunks: int, n_streams: int) -> list[tuple[int, int]]:
    """The contiguous split of chunk positions ``0..n_chunks-1`` into ``n_streams`` ranges:
    stream ``s`` gets ``[floor(s * n / S), floor((s + 1) * n / S))``. Ranges are disjoint, cover
    every position, and their lengths differ by at most one."""
    if n_streams < 1:
        raise ValueError(f"n_streams must be >= 1, got {n_streams}")
    return [(s * n_chunks // n_streams, (s + 1) * n_chunks // n_streams) for s in range(n_streams)]


def _layout(state: dict[str, Any]) -> dict[str, int]:
    """The stream layout a loader state implies. Two states with equal layouts read the same
    streams, so a resume between them is exact: 0 and 1 workers are both one stream per rank,
    and with one row per batch a lane is the role's one stream."""
    return {"world_size": state["world_size"], "num_workers": max(1, state["num_workers"]),
            "seq_len": state["seq_len"], "batch_size": state["batch_size"],
            "interleave": state["batch_size"] if state["interleave"] else 1}  # lanes per role


def _role_batches(batches: int, role: int, workers: int) -> int:
    """How many of a rank's first ``batches`` batches came from role ``role`` (batch b from role
    ``b % workers``)."""
    return max(0, (batches - role + workers - 1) // workers)


class _Plan:
    """What every stream needs to know about one split: shard paths and sample counts, chunk
    lengths, and the per-epoch shard order. Picklable (it travels to DataLoader workers)."""

    def __init__(self, manifest: Manifest, split: str, seed: int, shuffle: bool):
        shards = [s for s in manifest.split(split) if s.samples > 0]
        if not shards:
            known = ", ".join(manifest.splits) or "none"
            raise ValueError(f"split {split!r} has no samples in the manifest (splits: {known})")
        C = manifest.chunk_tokens
        if C < 1:
            raise ValueError(f"manifest chunk_tokens must be >= 1, got {C}")
        self.split, self.seed, self.shuffle, self.chunk_tokens = split, seed, shuffle, C
        self.dtype = np.dtype(manifest.dtype)
        self.paths = [str(manifest.path(s)) for s in shards]
        self.names = [s.name for s in shards]
        self.samples = np.array([s.samples for s in shards], dtype=np.int64)
        self.n_chunks = int(self.samples.sum())
        # The one shard whose last sample is the split's short last chunk (if any).
        self.short_shard, self.deficit = -1, 0
        for i, s in enumerate(shards):
            full = s.samples * C
            if s.tokens == full:
                continue
            if not (full - C < s.tokens < full):
                raise ValueError(f"shard {s.name}: {s.tokens} tokens in {s.samples} samples of "
                                 f"chunk_tokens={C} (every chunk but the split's last is full)")
            if self.short_shard >= 0:
                raise ValueError(f"shards {self.names[self.short_shard]} and {s.name} both end "
                                 f"in a short chunk; only the last chunk of split {split!r} may "
                                 f"be shorter than chunk_tokens={C}")
            self.short_shard, self.deficit = i, full - s.tokens
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- epoch layout -----------------------------------------------------------------------
    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, starts)``: shard indices in read order for ``epoch`` and the first chunk
        position of each (``starts`` has one more entry, ``N``)."""
        if epoch not in self._layouts:
            n = len(self.paths)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.samples[order])])
            if len(self._layouts) >= 8:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[epoch] = (order, starts)
        return self._layouts[epoch]

    def short_pos(self, epoch: int) -> int:
        """Chunk position of the short chunk in ``epoch`` (-1 if every chunk is full)."""
        if self.deficit == 0:
            return -1
        order, starts = self.layout(epoch)
        i = int(np.flatnonzero(order == self.short_shard)[0])
        return int(starts[i + 1]) - 1

    def chunk_len(self, shard: int, sample: int) -> int:
        short = shard == self.short_shard and sample == self.samples[shard] - 1
        return self.chunk_tokens - (self.deficit if short else 0)

    def stream_tokens(self, epoch: int, a: int, b: int) -> int:
        """Tokens of chunk positions ``[a, b)`` in ``epoch``."""
        return (b - a) * self.chunk_tokens - (self.deficit if a <= self.short_pos(epoch) < b else 0)

    # -- positions --------------------------------------------------------------------------
    def locate(self, a: int, b: int, start_epoch: int, tokens: int) -> tuple[int, int]:
        """``(epoch, offset)``: where the stream over ``[a, b)`` that began at ``start_epoch``
        is after ``tokens`` tokens (offset in tokens from the start of its range in epoch)."""
        full = (b - a) * self.chunk_tokens
        if self.deficit == 0:
            return start_epoch + tokens // full, tokens % full
        epoch = start_epoch
        while tokens >= (n := self.stream_tokens(epoch, a, b)):
            tokens -= n
            epoch += 1
        return epoch, tokens

    def chunk_at(self, epoch: int, a: int, b: int, offset: int) -> tuple[int, int]:
        """``(chunk position, offset in chunk)`` of token ``offset`` of range ``[a, b)``."""
        C, sp = self.chunk_tokens, self.short_pos(epoch)
        if a <= sp < b and offset >= (sp - a) * C:
            rest = offset - (sp - a) * C
            if rest < C - self.deficit:
                return sp, rest
            rest -= C - self.deficit
            return sp + 1 + rest // C, rest % C
        return a + offset // C, offset % C

    # -- reading ----------------------------------------------------------------------------
    def pieces(self, a: int, b: int, epoch: int, offset: int) -> Iterator[np.ndarray]:
        """The stream over ``[a, b)`` from token ``offset`` of ``epoch`` on, endlessly, as 1-D
        token arrays (whole chunks, the first one possibly cut)."""
        pos, off = self.chunk_at(epoch, a, b, offset)
        while True:
            order, starts = self.layout(epoch)
            i = int(np.searchsorted(starts, pos, side="right")) - 1
            while pos < b:
                shard = int(order[i])
                start = int(starts[i])
                first, stop = pos - start, min(int(self.samples[shard]), b - start)
                for j, (key, arr) in enumerate(read_samples(self.paths[shard], first, stop)):
                    want = self.chunk_len(shard, first + j)
                    if arr.dtype != self.dtype or arr.ndim != 1 or arr.shape[0] != want:
                        raise RuntimeError(
                            f"{self.paths[shard]}: sample {key} is {arr.dtype}{list(arr.shape)}, "
                            f"the manifest implies {self.dtype}[{want}]")
                    yield arr[off:] if off else arr
                    off = 0
                pos = start + stop
                i += 1
            epoch, pos, off = epoch + 1, a, 0


class _StreamDataset(IterableDataset):
    """The rank's streams as an ``IterableDataset`` of ready batches ``[B, T + 1]`` (long).

    ``start_batches`` is the rank's batch count when the iterator starts: DataLoader worker ``i``
    (0 in-process) plays role ``(i + start_batches) % workers``, whose streams (its ``lanes``)
    start after the windows that role consumed so far."""

    def __init__(self, plan: _Plan, seq_len: int, batch_size: int, rank: int, world_size: int,
                 workers: int, lanes: int, start_epoch: int, start_batches: int):
        super().__init__()
        self.plan, self.seq_len, self.batch_size = plan, seq_len, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.lanes, self.start_epoch, self.start_batches = lanes, start_epoch, start_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, the loader expects "
                               f"{self.workers}")
        return self.batches((worker + self.start_batches) % self.workers)

    def _pieces(self, stream: int, windows_done: int) -> Iterator[np.ndarray]:
        """Stream ``stream``'s tokens after its first ``windows_done`` windows (lazily: no
        shard is opened before the first read)."""
        a, b = stream_ranges(self.plan.n_chunks,
                             self.world_size * self.workers * self.lanes)[stream]
        epoch, offset = self.plan.locate(a, b, self.start_epoch,
                                         windows_done * (self.seq_len + 1))
        return self.plan.pieces(a, b, epoch, offset)

    def batches(self, role: int) -> Iterator[torch.Tensor]:
        B, W1 = self.batch_size, self.seq_len + 1
        per_lane = B // self.lanes  # consecutive rows (windows) per lane per batch: 1 or B
        done = _role_batches(self.start_batches, role, self.workers) * per_lane
        first = (self.rank * self.workers + role) * self.lanes
        lanes = [_Lane(self._pieces(first + i, done)) for i in range(self.lanes)]
        while True:
            buf = np.empty((B, W1), dtype=np.int64)
            for i, lane in enumerate(lanes):  # a lane's rows are contiguous in buf
                lane.fill(buf[i * per_lane:(i + 1) * per_lane].reshape(-1))
            yield torch.from_numpy(buf)


class _Lane:
    """One stream, read into the caller's buffers: each token is copied once, from the shard's
    array into the batch."""

    def __init__(self, pieces: Iterator[np.ndarray]):
        self.pieces, self.piece, self.pos = pieces, np.empty(0, dtype=np.int64), 0

    def fill(self, dst: np.ndarray) -> None:
        """Fill the 1-D ``dst`` with the stream's next ``len(dst)`` tokens."""
        fill, n = 0, dst.shape[0]
        while fill < n:
            if self.pos == self.piece.shape[0]:
                self.piece, self.pos = next(self.pieces), 0
            take = min(n - fill, self.piece.shape[0] - self.pos)
            dst[fill:fill + take] = self.piece[self.pos:self.pos + take]
            fill, self.pos = fill + take, self.pos + take


class TokenLoader:
    """Endless batches ``[batch_size, seq_len + 1]`` (``torch.long``) of split ``split`` for
    ``rank`` of ``world_size``, with ``num_workers`` DataLoader worker processes (0: in-process).

    The loader is its own iterator (``for x in loader`` and ``next(loader)`` share one position);
    ``state_dict()`` / ``load_state_dict()`` save and restore that position exactly. See the
    module docstring for the stream, epoch and state design. ``pin_memory`` is passed to the
    DataLoader (workers > 0 only). ``close()`` stops the worker processes (the next batch starts
    new ones at the current position).
    """

    def __init__(self, manifest: Manifest, split: str, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, *, interleave: bool = True, pin_memory: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle, self.pin_memory = seed, bool(shuffle), pin_memory
        self.interleave = bool(interleave)
        self._workers = max(1, num_workers)
        self._lanes = batch_size if self.interleave else 1
        self._plan = _Plan(manifest, split, seed, self.shuffle)
        n, S = self._plan.n_chunks, world_size * self._workers * self._lanes
        if n < S:
            lanes = f" x batch_size={batch_size} lanes" if self.interleave else ""
            raise ValueError(
                f"split {split!r} has N={n} chunks, fewer than the S={S} streams "
                f"(world_size={world_size} x max(1, num_workers)={self._workers}{lanes}); every "
                f"stream needs at least one chunk: use fewer ranks, workers or sequences per "
                f"batch, or a smaller chunk_tokens")
        self._batches = 0
        self._start_epoch = 0
        self._it: Iterator[torch.Tensor] | None = None

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        """The next batch ``[batch_size, seq_len + 1]`` (long); starts the workers lazily."""
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self._batches += 1
        return batch

    def _start(self) -> Iterator[torch.Tensor]:
        ds = _StreamDataset(self._plan, self.seq_len, self.batch_size, self.rank,
                            self.world_size, self._workers, self._lanes, self._start_epoch,
                            self._batches)
        if self.num_workers == 0:
            return ds.batches(self._batches % self._workers)
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, in_order=True,
                        pin_memory=self.pin_memory,
                        generator=torch.Generator().manual_seed(self.seed))
        return iter(dl)

    def close(self) -> None:
        """Stop the worker processes (if any); the position is kept."""
        self._it = None

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position (batches handed out by this loader) plus identity fields; plain ints,
        strings and bools (JSON-safe), identical on every rank."""
        return {"batches": self._batches, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "split": self.split,
                "shuffle": self.shuffle, "interleave": self.interleave,
                "start_epoch": self._start_epoch,
                "version": STATE_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next batch equals the one the saved loader would have yielded
        next (0 and 1 workers are the same streams). A different world size, worker count,
        seq_len or batch size cannot be exact: a warning is logged and every stream restarts at
        the beginning of the epoch the slowest saved stream was in (approximate). A different
        split, seed or shuffle flag raises ``ValueError``."""
        keys = ("batches", "seq_len", "batch_size", "world_size", "num_workers", "seed", "split",
                "shuffle", "version")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {', '.join(missing)}")
        if state["version"] not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state['version']}, this loader reads "
                             f"1 and {STATE_VERSION}")
        if state["version"] == 1:  # written before lanes: batches of consecutive windows
            state = {**state, "interleave": False}
        elif "interleave" not in state:
            raise ValueError("loader state lacks interleave")
        for k in ("split", "seed", "shuffle"):
            if state[k] != getattr(self, k):
                raise ValueError(f"loader state has {k}={state[k]!r}, this loader "
                                 f"{k}={getattr(self, k)!r}: the data order would differ")
        self._it = None
        start_epoch = int(state.get("start_epoch", 0))
        saved, now = _layout(state), _layout(self.state_dict())
        changed = [k for k in saved if saved[k] != now[k]]
        if not changed:
            self._batches, self._start_epoch = int(state["batches"]), start_epoch
            return
        epoch = min(self._stream_epochs(int(state["batches"]), start_epoch, state["world_size"],
                                        max(1, state["num_workers"]), state["seq_len"],
                                        state["batch_size"], state["interleave"],
                                        ranks=range(state["world_size"])))
        epoch = int(epoch)
        logger.warning(
            "loader state was saved with %s; resuming is approximate: every stream restarts at "
            "the beginning of epoch %d (the slowest saved stream's epoch)",
            ", ".join(f"{k}={state[k]} (now {getattr(self, k)})" for k in changed), epoch)
        self._batches, self._start_epoch = 0, epoch

    @property
    def epoch(self) -> float:
        """Epochs completed by this rank's streams, averaged (fractional; for metrics)."""
        e = self._stream_epochs(self._batches, self._start_epoch, self.world_size, self._workers,
                                self.seq_len, self.batch_size, self.interleave, ranks=[self.rank])
        return float(np.mean(e))

    def _stream_epochs(self, batches: int, start_epoch: int, world_size: int, workers: int,
                       seq_len: int, batch_size: int, interleave: bool, ranks) -> list[float]:
        """Fractional epoch of every stream of ``ranks`` after ``batches`` batches per rank."""
        lanes = batch_size if interleave else 1
        ranges = stream_ranges(self._plan.n_chunks, world_size * workers * lanes)
        out = []
        for r in ranks:
            for role in range(workers):
                windows = _role_batches(batches, role, workers) * (batch_size // lanes)
                for lane in range(lanes):
                    a, b = ranges[(r * workers + role) * lanes + lane]
                    e, off = self._plan.locate(a, b, start_epoch, windows * (seq_len + 1))
                    out.append(e + off / self._plan.stream_tokens(e, a, b))
        return out
