"""The keyed Feistel shuffle (data_pipeline.shuffle): a bijection, keyed by (seed, epoch), uniform, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from data_pipeline.dataset import InMemoryRows, ShuffledStream
from data_pipeline.shuffle import KeyedShuffle, derive_key, feistel_permute


def _feistel_reference(x: int, n: int, key: int) -> int:
    """Scalar pure-Python Feistel + cycle walking written from the definition (independent of the numpy code)."""
    m64 = (1 << 64) - 1

    def mix(v: int) -> int:
        v &= m64
        v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & m64
        v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & m64
        return v ^ (v >> 31)

    h = max(1, (max(1, (n - 1).bit_length()) + 1) // 2)
    keys = [mix(key + (r + 1) * 0x9E3779B97F4A7C15) for r in range(6)]

    def network(v: int) -> int:
        left, right = v >> h, v & ((1 << h) - 1)
        for k in keys:
            left, right = right, left ^ (mix(right ^ k) & ((1 << h) - 1))
        return (left << h) | right

    y = network(x)
    while y >= n:
        y = network(y)
    return y


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 100, 1000, 4097])
def test_feistel_is_a_bijection_and_matches_the_scalar_reference(n):
    for key in (0, 1, derive_key(5, 3)):
        got = feistel_permute(np.arange(n), n, key)
        np.testing.assert_array_equal(np.sort(got), np.arange(n))
        sample = range(n) if n <= 100 else range(0, n, n // 50)
        assert [int(got[i]) for i in sample] == [_feistel_reference(i, n, key) for i in sample]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        feistel_permute(np.array([5]), 5, 0)


def test_feistel_order_is_uniform_chi_square():
    """P(position i -> row j) = 1/n over keys: chi-square over the n x n table for 6000 keys (n = 6). Fixed keys, so
    the statistic is deterministic; the bound is the 99.9% quantile of chi2 with (n-1)^2 = 25 dof (52.6), and the
    same statistic for a broken map (identity for half the keys) is far above it (checked too)."""
    n, draws = 6, 6000
    counts = np.zeros((n, n))
    for k in range(draws):
        counts[np.arange(n), feistel_permute(np.arange(n), n, derive_key(11, k))] += 1
    expect = draws / n
    stat = ((counts - expect) ** 2 / expect).sum()
    assert stat < 52.6, stat
    broken = counts / 2 + np.eye(n) * draws / 2
    assert ((broken - expect) ** 2 / expect).sum() > 1000


def test_feistel_neighbours_are_decorrelated():
    """Consecutive positions land on rows |j - j'| = 1 apart with the uniform rate 2/n (no locality leak), and the
    orders of two epochs agree on a position about 1/n of the time."""
    n = 4096
    a = KeyedShuffle([n], seed=3).rows(np.arange(2 * n))
    e0, e1 = a[:n], a[n:]
    adjacent = np.mean(np.abs(np.diff(e0)) == 1)
    assert adjacent == pytest.approx(2 / n, abs=6 / n)
    assert np.mean(e0 == e1) < 6 / n
    assert not np.array_equal(e0, e1)


def test_keyed_shuffle_each_row_once_per_epoch_and_keyed_by_seed_and_epoch():
    shard_rows = [7, 3, 10, 5, 1, 9, 9]
    n = sum(shard_rows)
    for window in (0, 1, 2, 3, 7, 50):
        s = KeyedShuffle(shard_rows, seed=4, window_shards=window)
        for epoch in range(3):
            got = s.rows(np.arange(epoch * n, (epoch + 1) * n))
            np.testing.assert_array_equal(np.sort(got), np.arange(n))
        idx = np.array([5, 3 * n + 2, 0, n - 1, 2 * n])
        np.testing.assert_array_equal(s.rows(idx), KeyedShuffle(shard_rows, seed=4, window_shards=window).rows(idx))
        assert not np.array_equal(s.rows(np.arange(n)), KeyedShuffle(shard_rows, 5, window).rows(np.arange(n)))


def test_windows_read_only_their_shards():
    """With window_shards=k each window's rows lie in the k shards window_shard_ids names, the windows cover every
    shard once per epoch, and the window's rows are contiguous positions of the epoch."""
    shard_rows = np.array([4, 6, 5, 5, 3, 8, 2])
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    n = int(shard_rows.sum())
    s = KeyedShuffle(shard_rows, seed=9, window_shards=2)
    for epoch in range(2):
        rows = s.rows(np.arange(epoch * n, (epoch + 1) * n))
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        seen = []
        for i in range(n):
            e, w = s.locate(epoch * n + i)
            assert e == epoch and shard_of[i] in s.window_shard_ids(epoch, w)
            if not seen or seen[-1] != w:
                seen.append(w)
        assert seen == list(range(s.num_windows))  # windows in order, each a contiguous run
        assert sorted(np.concatenate([s.window_shard_ids(epoch, w) for w in range(s.num_windows)])) == list(range(7))


def test_billion_rows_first_batch_bounded_memory():
    """N = 10^9 rows in 30,518 shards: the first batch needs O(batch + shards) memory (< 100 MB is the issue's bound;
    this asserts < 5 MB), for a global shuffle and for shuffle windows, at any epoch."""
    tracemalloc.start()
    try:
        for window in (0, 16):
            s = KeyedShuffle([32768] * 30517 + [10**9 - 32768 * 30517], seed=1, window_shards=window)
            rows = s.rows(np.arange(512) + 7 * 10**9)
            assert rows.min() >= 0 and rows.max() < 10**9 and len(np.unique(rows)) == 512
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak


def test_shuffled_stream_kinds():
    """data.shuffle=permutation keeps the old order exactly (checkpoints written before data.shuffle resume with it);
    feistel is another order over the same rows; windows need feistel."""
    data = InMemoryRows(np.arange(40 * 3).reshape(40, 3))
    old = ShuffledStream(data, seed=2, shuffle="permutation")
    perm = np.random.Generator(np.random.PCG64([2, 1])).permutation(40)
    np.testing.assert_array_equal(old.row_indices(np.arange(40, 80)), perm)
    new = ShuffledStream(data, seed=2, shuffle="feistel")
    assert sorted(new.row_indices(np.arange(40, 80))) == list(range(40))
    assert not np.array_equal(new.row_indices(np.arange(40)), old.row_indices(np.arange(40)))
    with pytest.raises(ValueError, match="feistel"):
        ShuffledStream(data, seed=2, shuffle="permutation", window_shards=2)
    with pytest.raises(ValueError, match="shuffle must be"):
        ShuffledStream(data, seed=2, shuffle="random")


def test_resume_refuses_a_change_of_data_order():
    """A checkpoint's order (data.shuffle, data.shuffle_window in its data metadata) must continue; a checkpoint
    written before those keys existed used the permutation, and resumes with data.shuffle=permutation only."""
    from bd3_megatron.checkpoint.sharded import CheckpointError
    from bd3_megatron.training.resume_check import check_data_order

    check_data_order("ck", {"shuffle": "feistel", "shuffle_window": 2}, {"shuffle": "feistel", "shuffle_window": 2})
    check_data_order("ck", {}, {"shuffle": "permutation", "shuffle_window": 0})
    with pytest.raises(CheckpointError, match="data.shuffle=permutation but this run has data.shuffle=feistel"):
        check_data_order("ck", {}, {"shuffle": "feistel", "shuffle_window": 0})
    with pytest.raises(CheckpointError, match="resume with data.shuffle_window=2"):
        check_data_order("ck", {"shuffle": "feistel", "shuffle_window": 2}, {"shuffle": "feistel", "shuffle_window": 0})
