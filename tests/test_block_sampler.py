"""The no-cache block sampler: mechanics on controllable logits, and a real model end to end."""
from __future__ import annotations

import torch

from bd3_megatron.sampling.block_sampler import nucleus_filter, sample
from tests.helpers import MASK_ID, tiny_model

V = 61


def test_point_mass_logits_are_reproduced_block_by_block():
    """If the model is certain, the sampler must write exactly its prediction; it also must pass the right
    prefix: here the prediction for position p is (p + number of prefix tokens seen) % 50."""
    seen = []

    def logits_fn(xt, x0, start, end):
        seen.append((xt.shape[1], start, end))
        assert torch.equal(xt[:, :start], x0[:, :start]) and (xt[:, start:end] != MASK_ID).sum() >= 0
        target = (torch.arange(start, end) + start) % 50
        out = torch.full((xt.shape[0], end - start, V), -1e9)
        out[:, torch.arange(end - start), target] = 0.0
        return out

    out = sample(logits_fn, num_samples=2, length=12, block_size=4, context_len=8, mask_id=MASK_ID, steps=3)
    assert out.shape == (2, 12) and not (out == MASK_ID).any()
    # block 0: prefix 0; block 1: prefix 4; block 2: the window slides, prefix = last 4 tokens (context 8 - 4)
    assert [s[1] for s in seen if s[2] - s[1] == 4][:1] == [0]
    assert torch.equal(out[0, :4], torch.arange(0, 4) % 50)
    assert torch.equal(out[0, 4:8], (torch.arange(4, 8) + 4) % 50)
    assert torch.equal(out[0, 8:12], (torch.arange(4, 8) + 4) % 50)  # re-based to positions 4..7 after sliding
    assert max(s[0] for s in seen) <= 8


def test_sampling_is_seeded():
    def logits_fn(xt, x0, start, end):
        return torch.zeros(xt.shape[0], end - start, V)

    kw = dict(num_samples=3, length=8, block_size=4, context_len=8, mask_id=MASK_ID, steps=4)
    a, b, c = sample(logits_fn, seed=1, **kw), sample(logits_fn, seed=1, **kw), sample(logits_fn, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nucleus_filter_keeps_the_top_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(nucleus_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(nucleus_filter(probs, 0.01), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(nucleus_filter(probs, 1.0), probs)


def test_real_model_samples_valid_tokens(mcore):
    model = tiny_model(seq_len=16, block_size=4)
    with torch.no_grad():
        out = sample(model.block_logits, num_samples=2, length=24, block_size=4, context_len=16, mask_id=MASK_ID,
                     steps=2, nucleus_p=0.9)
    assert out.shape == (2, 24) and out.min() >= 0 and out.max() < MASK_ID
