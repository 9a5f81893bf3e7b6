"""Keyed shuffle with bounded memory: global sample index -> row without materialising a permutation.

``feistel_permute(x, n, key)`` is a keyed bijection of [0, n): a balanced Feistel network over the smallest
power-of-four domain 4^h >= n (6 rounds, splitmix64 round function), restricted to [0, n) by cycle walking (an
output >= n is fed through the network again until it lands below n; the domain is < 4n, so under 4 passes on
average). It needs O(batch) memory and time whatever n is: no O(n) permutation array (issue #17: a materialised
permutation of 512M rows costs ~70 s and 4-8 GB per rank at every epoch boundary).

``KeyedShuffle`` maps a global sample index i to a row: epoch e = i // N, position p = i % N, and the order of epoch
e depends only on (seed, e). Each row appears once per epoch. With ``window_shards = k > 0`` the epoch is a sequence
of shuffle windows: the shards are put in a keyed random order (a permutation of the S shards: O(S) memory, S is
thousands, not rows), consecutive groups of k shards form a window, and the window's rows are visited in a keyed
Feistel order. A window's rows come only from its k shards, so a streamed dataset needs only the shards of the
current (and, prefetched, the next) window on local disk: with a cache smaller than the dataset this is what keeps
each shard downloaded once per epoch (mosaicml-streaming's py1b shuffle has the same shape). k = 0 is one window
over all rows in their stored order: a uniform global Feistel shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SHUFFLES = ("feistel", "permutation")  # data.shuffle (the permutation lives in data_pipeline.dataset.ShuffledStream)
_ROUNDS = 6
_SCALAR_BATCH = 32  # batches up to this size take the Python-int path (same results, lower fixed cost)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix_scalar(x: int) -> int:
    """splitmix64's finaliser on a Python int (64-bit wraparound)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (numpy's uint64 arithmetic wraps modulo 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from a tuple of non-negative ints, e.g. (seed, epoch, window): a splitmix64 chain."""
    h = _GOLDEN
    for p in parts:
        h = _mix_scalar(h ^ ((int(p) + _GOLDEN) & _MASK64))
    return h


def _round_keys(key: int) -> list[np.uint64]:
    return [np.uint64(_mix_scalar(key + (r + 1) * _GOLDEN)) for r in range(_ROUNDS)]


def _half_bits(n: int) -> int:
    """h with 4^h >= n (at least 1): the Feistel halves have h bits each."""
    bits = max(1, int(n - 1).bit_length())
    return max(1, (bits + 1) // 2)


def _network(x: np.ndarray, h: int, keys: list[np.uint64]) -> np.ndarray:
    """One pass of the Feistel network over [0, 4^h): uint64 in, uint64 out, a bijection of that domain."""
    mask = np.uint64((1 << h) - 1)
    shift = np.uint64(h)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << shift) | right


def _walk_scalar(x: int, n: int, h: int, keys: list[int]) -> int:
    """feistel_permute for one position, on Python ints (the same network, bit for bit)."""
    mask = (1 << h) - 1
    while True:
        left, right = x >> h, x & mask
        for k in keys:
            left, right = right, left ^ (_mix_scalar(right ^ k) & mask)
        x = (left << h) | right
        if x < n:
            return x


def feistel_permute(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """Image of positions x (int, each in [0, n)) under the keyed bijection of [0, n): int64, same shape as x.

    Cycle walking keeps it a bijection of [0, n) (the walk from x < n stays on x's cycle of the domain permutation,
    which returns below n). Cost: O(len(x)) time and memory, independent of n (n up to 2^62).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"feistel_permute needs n >= 1, got {n}")
    flat = np.asarray(x, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}); got min {flat.min()}, max {flat.max()}")
    if n == 1:
        return np.zeros_like(np.asarray(x, dtype=np.int64))
    h, keys = _half_bits(n), _round_keys(key)
    if flat.size <= _SCALAR_BATCH:  # a micro-batch: Python ints beat ~70 numpy calls per pass
        ints = [int(k) for k in keys]
        return np.array([_walk_scalar(int(v), n, h, ints) for v in flat], dtype=np.int64).reshape(np.shape(x))
    y = _network(flat.astype(np.uint64), h, keys)
    out_of_range = y >= np.uint64(n)
    while out_of_range.any():
        y[out_of_range] = _network(y[out_of_range], h, keys)
        out_of_range = y >= np.uint64(n)
    return y.astype(np.int64).reshape(np.shape(x))


class KeyedShuffle:
    """Global sample index -> dataset row, keyed by (seed, epoch), in O(batch + shards) memory.

    shard_rows: rows of each shard in stored order (a dataset without shards is one shard of all its rows);
    window_shards: k shards per shuffle window (0: one window of all rows, a uniform global shuffle). See the module
    docstring for the order. Raises ValueError for an empty dataset, a negative seed, k < 0 or a negative index.
    """

    def __init__(self, shard_rows: Sequence[int], seed: int, window_shards: int = 0) -> None:
        counts = np.asarray(shard_rows, dtype=np.int64).reshape(-1)
        if counts.size == 0 or counts.sum() == 0 or counts.min() < 0:
            raise ValueError("cannot shuffle an empty dataset; lower seq_len or add documents")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if window_shards < 0:
            raise ValueError(f"window_shards must be >= 0 (0: the whole dataset), got {window_shards}")
        self.seed, self.shard_rows = int(seed), counts
        self.num_shards = int(counts.size)
        self.window_shards = window_shards if 0 < window_shards < self.num_shards else 0
        self.shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.epoch_length = int(self.shard_start[-1])
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_windows(self) -> int:
        k = self.window_shards
        return 1 if k == 0 else -(-self.num_shards // k)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order [S], first epoch position of each window [W + 1]) of one epoch."""
        got = self._layouts.get(epoch)
        if got is None:
            if self.window_shards == 0:
                order = np.arange(self.num_shards, dtype=np.int64)
                starts = np.array([0, self.epoch_length], dtype=np.int64)
            else:
                order = feistel_permute(np.arange(self.num_shards), self.num_shards, derive_key(self.seed, epoch, 1))
                per_window = np.add.reduceat(self.shard_rows[order], np.arange(0, self.num_shards, self.window_shards))
                starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
            self._layouts = {e: v for e, v in self._layouts.items() if abs(e - epoch) <= 1}
            self._layouts[epoch] = got = (order, starts)
        return got

    def window_shard_ids(self, epoch: int, window: int) -> np.ndarray:
        """Shard ids (stored order numbers) whose rows window `window` of epoch `epoch` visits."""
        order, _ = self._layout(epoch)
        if self.window_shards == 0:
            return order
        return order[window * self.window_shards : (window + 1) * self.window_shards]

    def locate(self, sample_index: int) -> tuple[int, int]:
        """(epoch, window) of a global sample index."""
        epoch, pos = divmod(int(sample_index), self.epoch_length)
        _, starts = self._layout(epoch)
        return epoch, int(np.searchsorted(starts, pos, side="right") - 1)

    def _rows_in_epoch(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        order, starts = self._layout(epoch)
        window = np.searchsorted(starts, pos, side="right") - 1
        out = np.empty_like(pos)
        for w in np.unique(window):
            sel = window == w
            n_w = int(starts[w + 1] - starts[w])
            local = feistel_permute(pos[sel] - starts[w], n_w, derive_key(self.seed, epoch, 2, int(w)))
            if self.window_shards == 0:
                out[sel] = local
                continue
            shards = self.window_shard_ids(epoch, int(w))
            within = np.concatenate([[0], np.cumsum(self.shard_rows[shards])])
            which = np.searchsorted(within, local, side="right") - 1
            out[sel] = self.shard_start[shards[which]] + (local - within[which])
        return out

    def rows(self, sample_indices: np.ndarray) -> np.ndarray:
        """Dataset row (int64) for each global sample index (any shape in, flat out)."""
        idx = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise ValueError(f"global sample indices must be non-negative, got {idx.min()}")
        epochs, pos = np.divmod(idx, self.epoch_length)
        out = np.empty_like(idx)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._rows_in_epoch(int(e), pos[sel])
        return out
