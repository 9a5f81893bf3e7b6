"""Keyed noise: a pure function of (seed, global sample index, block/position, step), never of batch or rank."""
from __future__ import annotations

import pytest
import torch

from bd3_megatron.diffusion import ClipWindow, corrupt, keyed_uniform, sample_t, window_feasible
from bd3_megatron.diffusion.noise import resample_blocks

MASK = 99


def test_keyed_uniform_is_deterministic_and_uniform():
    keys = torch.arange(200_000)
    a, b = keyed_uniform(3, 7, keys), keyed_uniform(3, 7, keys)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() < 1.0
    assert abs(a.mean().item() - 0.5) < 0.005 and abs(a.var().item() - 1 / 12) < 0.002
    hist = torch.histc(a, bins=20, min=0, max=1) / len(a)
    assert (hist - 0.05).abs().max() < 0.003
    adjacent = torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]
    assert abs(adjacent) < 0.01
    assert not torch.equal(a, keyed_uniform(4, 7, keys)) and not torch.equal(a, keyed_uniform(3, 8, keys))
    big = keyed_uniform(1, torch.tensor([2**33 + 5, 5]))  # the high half of a key matters too
    assert big[0] != big[1]


def test_same_sample_same_noise_whatever_the_batch():
    x0 = torch.randint(0, MASK, (8, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(seed=11, block_size=4, window=ClipWindow(), mask_token_id=MASK, global_batch_size=8)
    full = corrupt(x0, torch.arange(8), 5, **kw)
    for subset in ([5, 2], [7, 0, 3], [4]):
        idx = torch.tensor(subset)
        part = corrupt(x0[idx], idx, 5, **kw)
        assert torch.equal(part.xt, full.xt[idx]) and torch.equal(part.t, full.t[idx])
    other_step = corrupt(x0, torch.arange(8), 6, **kw)
    other_seed = corrupt(x0, torch.arange(8), 5, **{**kw, "seed": 12})
    assert not torch.equal(other_step.t, full.t) and not torch.equal(other_seed.t, full.t)


def test_t_is_stratified_over_the_global_batch_and_not_monotone():
    G, nb = 16, 8
    t = sample_t(1, torch.arange(G) + 3 * G, step=3, num_blocks=nb, window=ClipWindow(1e-9, 1.0),
                 global_batch_size=G)
    strata = torch.floor(t.flatten() * G * nb).long()
    assert torch.equal(strata.sort().values, torch.arange(G * nb))  # exactly one t per stratum
    increasing = (t[:, 1:] > t[:, :-1]).all(dim=1)
    assert not increasing.all()  # the reference's row-major strata made every row increasing


def test_window_bounds_and_t_equal_one():
    t = sample_t(0, torch.arange(32), 0, 4, ClipWindow(0.3, 0.8), 32)
    assert t.min() >= 0.3 and t.max() <= 0.8
    c = corrupt(torch.zeros(2, 8, dtype=torch.long), torch.arange(2), 0, seed=0, block_size=2,
                window=ClipWindow(1.0, 1.0), mask_token_id=MASK, global_batch_size=2)
    assert torch.all(c.t == 1.0) and c.masked.all() and torch.all(c.xt == MASK)


def test_mask_rate_follows_t():
    x0 = torch.zeros(64, 256, dtype=torch.long)
    c = corrupt(x0, torch.arange(64), 0, seed=1, block_size=256, window=ClipWindow(), mask_token_id=MASK,
                global_batch_size=64, antithetic=False)
    rate = c.masked.float().mean(1)
    assert torch.allclose(rate, c.t[:, 0], atol=0.12)


def test_resampling_keeps_every_block_in_the_window_and_is_deterministic():
    window = ClipWindow(0.25, 0.75)
    x0 = torch.zeros(32, 64, dtype=torch.long)
    kw = dict(seed=2, block_size=4, window=window, mask_token_id=MASK, global_batch_size=32, resample=True,
              max_tries=2)
    c = corrupt(x0, torch.arange(32), 1, **kw)
    frac = c.masked.view(32, 16, 4).float().mean(-1)
    assert frac.min() >= 0.25 and frac.max() <= 0.75
    assert torch.equal(c.masked, corrupt(x0, torch.arange(32), 1, **kw).masked)
    # with enough tries the fallback is rare and the draw is the plain one wherever that was admissible
    plain = corrupt(x0, torch.arange(32), 1, **{**kw, "resample": False})
    plain_ok = plain.masked.view(32, 16, 4).float().mean(-1)
    ok = (plain_ok >= 0.25) & (plain_ok <= 0.75)
    assert torch.equal(c.masked.view(32, 16, 4)[ok], plain.masked.view(32, 16, 4)[ok])


def test_infeasible_window_is_an_error():
    assert not window_feasible(ClipWindow(0.3, 0.8), 1) and window_feasible(ClipWindow(0.3, 0.8), 4)
    with pytest.raises(ValueError, match="admits no masked-token count"):
        resample_blocks(0, torch.arange(2), 0, torch.full((2, 4), 0.5), 1, ClipWindow(0.3, 0.8))


def test_ignore_bos_and_input_checks():
    x0 = torch.ones(4, 8, dtype=torch.long)
    c = corrupt(x0, torch.arange(4), 0, seed=0, block_size=4, window=ClipWindow(1.0, 1.0), mask_token_id=MASK,
                global_batch_size=4, ignore_bos=True)
    assert not c.masked[:, 0].any() and c.masked[:, 1:].all()
    with pytest.raises(ValueError, match="not a multiple"):
        corrupt(torch.ones(1, 6, dtype=torch.long), torch.arange(1), 0, seed=0, block_size=4, window=ClipWindow(),
                mask_token_id=MASK, global_batch_size=1)
