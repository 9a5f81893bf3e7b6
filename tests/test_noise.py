"""Keyed noise: a pure function of (seed, global sample index, block/position, step), never of batch or rank."""

from __future__ import annotations

import math

import pytest
import torch

from bd3_megatron.diffusion import (
    ClipWindow,
    corrupt,
    keyed_hash,
    keyed_uniform,
    resample_blocks,
    sample_mask,
    sample_t,
    window_feasible,
)

MASK = 99


def corrupt_kw(**over):
    kw = dict(seed=11, block_size=4, window=ClipWindow(), mask_token_id=MASK, global_batch_size=8)
    kw.update(over)
    return kw


# ---- keyed_uniform ----


def test_keyed_uniform_is_a_deterministic_float32_function_of_its_keys():
    keys = torch.arange(1000)
    a = keyed_uniform(3, 7, keys)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (1000,)
    assert torch.equal(a, keyed_uniform(3, 7, keys))
    assert keyed_uniform(3, 7, 5).item() == a[5].item()  # int keys and tensor keys hash alike
    assert keyed_uniform(3, 7, keys.int()).equal(a)  # key dtype does not matter, its value does
    assert keyed_uniform(3, 7, keys[:, None], torch.arange(4)[None, :]).shape == (1000, 4)  # keys broadcast
    assert not keyed_uniform(4, 7, keys).equal(a) and not keyed_uniform(3, 8, keys).equal(a)
    assert keyed_uniform(3, 5, 9).item() != keyed_uniform(3, 9, 5).item()  # key order matters
    big = keyed_uniform(1, torch.tensor([2**33 + 5, 5, -5]))  # the high word of a key matters, negatives work
    assert big.unique().numel() == 3
    assert keyed_uniform(2**40 + 1, 0).item() != keyed_uniform(1, 0).item()  # so does the seed's
    h = keyed_hash(0, torch.arange(10_000))
    assert h.min() >= 0 and h.max() < 2**32 and h.unique().numel() == 10_000
    with pytest.raises(ValueError, match="integer"):
        keyed_uniform(0, torch.rand(3))


def test_keyed_uniform_is_uniform_and_adjacent_keys_are_independent():
    n = 100_000
    u = keyed_uniform(3, 7, torch.arange(n))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    ks = ((torch.arange(1, n + 1, dtype=torch.float64) / n) - u.double().sort().values).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1% level
    for x, y in [
        (u[:-1], u[1:]),  # neighbouring last key
        (keyed_uniform(3, 7, torch.arange(n), 0), keyed_uniform(3, 7, torch.arange(n), 1)),  # next key
        (keyed_uniform(3, 7, torch.arange(n)), keyed_uniform(4, 7, torch.arange(n))),
    ]:  # next seed
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.01
    grid = keyed_uniform(0, 1, torch.arange(256)[:, None], torch.arange(256)[None, :])
    assert (grid.mean(0) - 0.5).abs().max() < 0.07 and (grid.mean(1) - 0.5).abs().max() < 0.07


# ---- t ----


def test_t_lies_in_the_window_and_t_equal_one_is_exact():
    for window in (ClipWindow(), ClipWindow(0.3, 0.8), ClipWindow(0.5, 0.5)):
        for anti in (True, False):
            t = sample_t(0, torch.arange(32), 0, 4, window, 32, antithetic=anti)
            assert t.dtype == torch.float32 and t.shape == (32, 4)
            assert t.min() >= window.eps_min and t.max() <= window.eps_max
    t1 = sample_t(0, torch.arange(32), 0, 4, ClipWindow(1.0, 1.0), 32)
    assert torch.all(t1 == 1.0)
    c = corrupt(
        torch.zeros(2, 8, dtype=torch.long),
        torch.arange(2),
        0,
        **corrupt_kw(block_size=2, window=ClipWindow(1.0, 1.0), global_batch_size=2),
    )
    assert torch.all(c.t == 1.0) and c.masked.all() and torch.all(c.xt == MASK)


@pytest.mark.parametrize("step", [0, 3])
def test_t_is_stratified_over_the_global_batch_and_not_monotone(step):
    G, nb, window = 16, 8, ClipWindow(0.2, 0.9)
    t = sample_t(1, torch.arange(G) + step * G, step=step, num_blocks=nb, window=window, global_batch_size=G)
    unit = (t.double() - window.eps_min) / (window.eps_max - window.eps_min)
    strata = torch.floor(unit.flatten() * G * nb).long()
    assert torch.equal(strata.sort().values, torch.arange(G * nb))  # exactly one t per stratum
    assert not (t[:, 1:] > t[:, :-1]).all(dim=1).all()  # the reference's row-major strata made every row increasing
    assert (t[:, 0] > t[:, -1]).any()
    per_sample_spread = t.max(1).values - t.min(1).values
    assert per_sample_spread.mean() > 0.3  # a sample's blocks are not confined to a 1/G band


def test_t_without_antithetic_is_unstratified_but_uniform():
    t = sample_t(5, torch.arange(4096), 2, 4, ClipWindow(), 4096, antithetic=False)
    assert abs(t.mean().item() - 0.5) < 0.01
    stratified = sample_t(5, torch.arange(4096), 2, 4, ClipWindow(), 4096)
    assert abs(stratified.mean().item() - (1e-3 + 0.999 / 2)) < 1e-4  # stratification pins the mean


# ---- batch and layout invariance ----


def test_same_sample_same_noise_whatever_the_batch():
    x0 = torch.randint(0, MASK, (8, 32), generator=torch.Generator().manual_seed(0))
    for kw in (
        corrupt_kw(),
        corrupt_kw(window=ClipWindow(0.25, 0.75), resample=True, max_tries=3),
        corrupt_kw(antithetic=False),
    ):
        full = corrupt(x0, torch.arange(8), 5, **kw)
        for subset in ([5, 2], [7, 0, 3], [4], [1, 0, 2, 3, 4, 5, 6, 7]):
            idx = torch.tensor(subset)
            part = corrupt(x0[idx], idx, 5, **kw)
            for name in ("xt", "masked", "t", "t_tokens"):
                assert torch.equal(getattr(part, name), getattr(full, name)[idx]), name


def test_different_steps_and_seeds_give_different_noise():
    x0 = torch.zeros(8, 64, dtype=torch.long)
    base = corrupt(x0, torch.arange(8), 5, **corrupt_kw())
    for other in (
        corrupt(x0, torch.arange(8), 6, **corrupt_kw()),
        corrupt(x0, torch.arange(8), 5, **corrupt_kw(seed=12)),
    ):
        assert not torch.equal(other.t, base.t) and not torch.equal(other.masked, base.masked)
    t_u = keyed_uniform(11, 0x51A7, 5, torch.arange(8)[:, None], torch.arange(16)[None, :])
    m_u = keyed_uniform(11, 0x3C6E, 5, torch.arange(8)[:, None], torch.arange(16)[None, :])
    assert abs(torch.corrcoef(torch.stack([t_u.flatten(), m_u.flatten()]))[0, 1]) < 0.2  # streams are separate


# ---- the mask ----


def test_mask_rate_follows_t():
    x0 = torch.zeros(64, 256, dtype=torch.long)
    c = corrupt(x0, torch.arange(64), 0, **corrupt_kw(block_size=256, global_batch_size=64, antithetic=False))
    rate = c.masked.float().mean(1)
    assert (rate - c.t[:, 0]).abs().max() < 0.12  # binomial sd <= 1/32
    assert torch.equal(c.t_tokens, c.t.repeat_interleave(256, 1))
    assert torch.equal(c.xt == MASK, c.masked)
    m = sample_mask(0, torch.arange(4), 0, torch.ones(4, 16))
    assert m.all() and not sample_mask(0, torch.arange(4), 0, torch.zeros(4, 16)).any()


def test_resampling_keeps_every_block_in_the_window_and_is_deterministic():
    window = ClipWindow(0.25, 0.75)
    x0 = torch.zeros(32, 64, dtype=torch.long)
    kw = corrupt_kw(seed=2, window=window, global_batch_size=32, resample=True, max_tries=2)
    c = corrupt(x0, torch.arange(32), 1, **kw)
    frac = c.masked.view(32, 16, 4).float().mean(-1)
    assert frac.min() >= 0.25 and frac.max() <= 0.75
    assert torch.equal(c.masked, corrupt(x0, torch.arange(32), 1, **kw).masked)
    plain = corrupt(x0, torch.arange(32), 1, **{**kw, "resample": False}).masked.view(32, 16, 4)
    plain_frac = plain.float().mean(-1)
    admissible = (plain_frac >= 0.25) & (plain_frac <= 0.75)
    assert not admissible.all()  # the test exercises real resampling
    assert torch.equal(c.masked.view(32, 16, 4)[admissible], plain[admissible])  # try 0 kept where admissible


def test_resampling_fallback_masks_the_rounded_count():
    t = torch.tensor([[0.1] * 8 + [0.9] * 8])
    for window, expected in [(ClipWindow(0.5, 0.5), [4, 4]), (ClipWindow(0.25, 0.5), [2, 4])]:
        m = resample_blocks(3, torch.tensor([0]), 0, t, 8, window, max_tries=1)
        assert m.view(2, 8).sum(-1).tolist() == expected
        assert torch.equal(m, resample_blocks(3, torch.tensor([0]), 0, t, 8, window, max_tries=1))
    # the k masked tokens are the k smallest try-0 uniforms
    u0 = keyed_uniform(3, 0x3C6E, 0, torch.tensor([0])[:, None], torch.arange(16)[None, :])[0, :8]
    m = resample_blocks(3, torch.tensor([0]), 0, t, 8, ClipWindow(0.5, 0.5), max_tries=1)[0, :8]
    assert torch.equal(m, u0 <= u0.sort().values[3])


def test_reference_bounds_convention():
    # only the bound that differs from the default (1e-3, 1) is enforced, as in the reference
    t = torch.full((64, 8), 0.05)
    upper_only = resample_blocks(0, torch.arange(64), 0, t, 4, ClipWindow(1e-3, 0.5))
    assert (upper_only.view(64, 2, 4).sum(-1) == 0).any()  # zero masked tokens are admissible
    lower_only = resample_blocks(0, torch.arange(64), 0, torch.full((64, 8), 0.95), 4, ClipWindow(0.5, 1.0))
    assert (lower_only.view(64, 2, 4).sum(-1) == 4).any()
    assert (lower_only.view(64, 2, 4).sum(-1) >= 2).all()
    x0 = torch.zeros(8, 16, dtype=torch.long)
    on = corrupt(x0, torch.arange(8), 0, **corrupt_kw(resample=True))
    assert torch.equal(on.masked, corrupt(x0, torch.arange(8), 0, **corrupt_kw()).masked)  # default window: no-op


def test_infeasible_window_is_an_error():
    assert not window_feasible(ClipWindow(0.3, 0.8), 1) and window_feasible(ClipWindow(0.3, 0.8), 4)
    assert not window_feasible(ClipWindow(0.3, 0.45), 2) and window_feasible(ClipWindow(0.3, 0.3), 10)
    assert window_feasible(ClipWindow(), 1) and window_feasible(ClipWindow(1.0, 1.0), 1)
    with pytest.raises(ValueError, match="admits no masked-token count"):
        resample_blocks(0, torch.arange(2), 0, torch.full((2, 4), 0.5), 1, ClipWindow(0.3, 0.8))
    with pytest.raises(ValueError, match="admits no masked-token count"):
        corrupt(
            torch.zeros(2, 4, dtype=torch.long),
            torch.arange(2),
            0,
            **corrupt_kw(block_size=1, window=ClipWindow(0.3, 0.8), global_batch_size=2, resample=True),
        )


def test_ignore_bos():
    x0 = torch.arange(32).view(4, 8)
    c = corrupt(x0, torch.arange(4), 0, **corrupt_kw(window=ClipWindow(1.0, 1.0), global_batch_size=4, ignore_bos=True))
    assert not c.masked[:, 0].any() and c.masked[:, 1:].all()
    assert torch.equal(c.xt[:, 0], x0[:, 0]) and torch.all(c.xt[:, 1:] == MASK)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(x0=torch.ones(1, 6, dtype=torch.long)), "not a multiple"),
        (dict(x0=torch.ones(6, dtype=torch.long)), r"\[batch, seq_len\]"),
        (dict(x0=torch.ones(1, 8)), "integer"),
        (dict(sample_index=torch.arange(2)), "shape"),
        (dict(sample_index=torch.zeros(1)), "integers"),
        (dict(global_batch_size=0), "global_batch_size"),
    ],
)
def test_bad_inputs_are_rejected(bad, match):
    args = dict(x0=torch.ones(1, 8, dtype=torch.long), sample_index=torch.arange(1))
    args.update({k: v for k, v in bad.items() if k in args})
    kw = corrupt_kw(**{"global_batch_size": 1, **{k: v for k, v in bad.items() if k not in args}})
    with pytest.raises(ValueError, match=match):
        corrupt(args["x0"], args["sample_index"], 0, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_is_bit_identical_to_cpu():
    keys = torch.arange(100_000)
    assert torch.equal(keyed_uniform(9, 3, keys.cuda()).cpu(), keyed_uniform(9, 3, keys))
    x0 = torch.randint(0, MASK, (16, 64), generator=torch.Generator().manual_seed(1))
    kw = corrupt_kw(window=ClipWindow(0.3, 0.8), global_batch_size=16, resample=True)
    cpu, gpu = corrupt(x0, torch.arange(16), 4, **kw), corrupt(x0.cuda(), torch.arange(16).cuda(), 4, **kw)
    for name in ("xt", "masked", "t", "t_tokens"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


# ---- validation batches ----


class _Rows:
    """A validation split: ``rows(idx) -> [b, L]`` like the data pipeline's readers (wrapped: no padding)."""

    pad_token_id = None

    def __init__(self, n: int, seq: int):
        self.data = torch.randint(0, MASK, (n, seq), generator=torch.Generator().manual_seed(5)).numpy()

    def __len__(self):
        return len(self.data)

    def rows(self, idx):
        return self.data[idx]


def _eval_rows(maker, rows, n_rows: int, batch: int, draw: int = 0) -> tuple[dict, list]:
    """Every micro-batch of ``batch`` slots over the first n_rows rows, and the concatenation of their real rows."""
    import numpy as np

    out = [
        maker.eval_batch(rows, np.arange(s, s + batch), n_rows, ClipWindow(), noise_draw=draw)
        for s in range(0, n_rows, batch)
    ]
    fields = ("x0", "xt", "masked", "weight", "t", "sample_index")
    return {f: torch.cat([getattr(b, f)[b.valid] for b in out]) for f in fields}, out


def test_validation_noise_depends_on_the_row_and_draw_only():
    """Item 2 of issue 12: batch 8 or 37, a short last batch, --max-rows 10: every row scored, with the same noise;
    a batch straddling the end of a noise group (EVAL_NOISE_GROUP rows) too."""
    from bd3_megatron.config import config_from_dict
    from bd3_megatron.training.batches import EVAL_NOISE_GROUP, BatchMaker

    maker = BatchMaker(config_from_dict({}, ["model.seq_len=16", "model.block_size=4"]), MASK, torch.device("cpu"))
    n = EVAL_NOISE_GROUP + 111
    rows = _Rows(n, 16)
    by8, batches8 = _eval_rows(maker, rows, n, 8)
    by37, batches37 = _eval_rows(maker, rows, n, 37)
    assert torch.equal(by8["sample_index"], torch.arange(n)) and torch.equal(by8["x0"], torch.from_numpy(rows.data))
    for f in by8:
        assert torch.equal(by8[f], by37[f]), f
    last = batches37[-1]  # 623 = 16 x 37 + 31: six padding slots, weight 0, not valid
    assert int(last.valid.sum()) == n % 37 and float(last.weight[~last.valid].abs().sum()) == 0.0
    assert float(by8["weight"].sum()) > 0 and len(batches8) == math.ceil(n / 8)
    first10, _ = _eval_rows(maker, rows, 10, 4)
    for f in first10:
        assert torch.equal(first10[f], by8[f][:10]), f  # the first rows' noise does not depend on how many are scored
    other, _ = _eval_rows(maker, rows, n, 8, draw=1)
    assert not torch.equal(other["t"], by8["t"]) and torch.equal(other["x0"], by8["x0"])
    # within a noise group the antithetic strata are used once each: t is spread like a stratified sample
    g0 = by8["t"][:EVAL_NOISE_GROUP].flatten().double()
    cells = g0.numel()
    strata = torch.floor((g0 - 1e-3) / (1 - 1e-3) * cells).clamp(0, cells - 1).long()
    assert len(torch.unique(strata)) >= cells - 4  # float32 rounding may shift a few at stratum edges
