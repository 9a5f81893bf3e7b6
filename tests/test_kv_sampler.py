"""The single-device sampler: the KV cache against full recomputation, batch vs per-sample, stopping rules, NFE.

The network here is the standalone BD3Net with random weights (its equality with the megatron model is in
test_convert.py); weights are scaled up so that the distributions are far from uniform and the tests can tell
samplers apart.
"""

from __future__ import annotations

import math

import pytest
import torch

from bd3_megatron.sampling.kv_sampler import (
    CachedDenoiser,
    RecomputeDenoiser,
    SampleOptions,
    _nucleus,
    generate,
    propose,
    token_entropy,
)
from bd3_megatron.sampling.net import BD3Net, NetConfig, build_net
from tests.helpers import sorted_nucleus_filter

VOCAB, MASK = 61, 60
PROMPT = [1, 2, 3, 4, 5, 6]  # one full block of 4 plus a 2-token tail that the first block denoises around


def make_net(layers: int = 2, seq_len: int = 32, block: int = 4, seed: int = 0, scale: float = 0.4) -> BD3Net:
    cfg = NetConfig(
        num_layers=layers,
        hidden_size=32,
        num_heads=4,
        ffn_hidden_size=64,
        vocab_size=VOCAB,
        mask_token_id=MASK,
        seq_len=seq_len,
        block_size=block,
    )
    net = build_net(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def constant_net(logits: torch.Tensor, block: int = 4, seq_len: int = 32) -> BD3Net:
    """A crafted network whose output distribution is ``logits`` at every position, whatever the input: the
    final LayerNorm outputs the unit vector e_0 and the head's column 0 holds the logits."""
    net = make_net(layers=1, seq_len=seq_len, block=block)
    with torch.no_grad():
        net.decoder.final_layernorm.weight.zero_()
        net.decoder.final_layernorm.bias.zero_()
        net.decoder.final_layernorm.bias[0] = 1.0
        net.output_layer.weight.zero_()
        net.output_layer.weight[:, 0] = logits
    return net


def tokens(stats) -> list[list[int]]:
    return [r.tokens for r in stats.results]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: extra intra-op threads only add spin-waiting on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net():
    return make_net()


def test_cached_logits_equal_recomputed_logits_block_by_block(net):
    """Same context, same block: the cache (with its fused clean pass) reproduces the full x_t ⊕ x0 forward."""
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, MASK, (3, 8), generator=gen)
    cached, full = CachedDenoiser(net, 4, 32), RecomputeDenoiser(net, 4, 32)
    cached.start(prefix)
    full.start(prefix)
    for step in range(5):  # 8 + 5*4 = 28 = capacity: the whole window, no eviction yet
        block = torch.randint(0, MASK, (3, 4), generator=gen)
        block[:, step % 4] = MASK
        for _ in range(2):  # first call carries the pending clean pass, the second does not
            rows = torch.tensor([2, 0])
            torch.testing.assert_close(cached.logits(block, rows), full.logits(block, rows), rtol=1e-5, atol=1e-5)
        cached.commit(block)
        full.commit(block)
    assert cached.cache.length == 24 and cached.pending is not None


@pytest.mark.parametrize("schedule", ["ddpm", "first_hitting", "threshold"])
@pytest.mark.parametrize("greedy,nucleus_p", [(True, 1.0), (False, 0.9), (False, 1.0)])
def test_kv_cache_sampling_equals_no_cache(net, schedule, greedy, nucleus_p):
    opts = dict(length=22, schedule=schedule, greedy=greedy, nucleus_p=nucleus_p, seed=7, threshold=0.3)
    with_cache = generate(net, 3, SampleOptions(kv_cache=True, **opts), prompt=PROMPT)
    without = generate(net, 3, SampleOptions(kv_cache=False, **opts), prompt=PROMPT)
    assert tokens(with_cache) == tokens(without)
    assert [r.nfe for r in with_cache.results] == [r.nfe for r in without.results]
    assert all(len(r.tokens) == len(PROMPT) + 22 and r.tokens[:6] == PROMPT for r in with_cache.results)
    if not (greedy and schedule == "threshold"):  # the only deterministic combination
        assert len({tuple(t) for t in tokens(with_cache)}) == 3  # the samples differ from each other
    if not greedy:  # a different seed gives different samples
        other = generate(net, 3, SampleOptions(kv_cache=True, **dict(opts, seed=8)), prompt=PROMPT)
        assert tokens(other) != tokens(with_cache)


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cache_equals_no_cache_from_an_empty_context(greedy):
    """No prompt and small weights: the first block's masked positions differ only by their rotary position, so
    their confidences tie to ~1e-8; round-off between the two forwards must not change which one the threshold
    schedule reveals (without the tie tolerance this test fails)."""
    net = make_net(scale=0.02)
    for seed in range(3):
        opts = dict(length=24, block_size=8, schedule="threshold", greedy=greedy, threshold=0.99, seed=seed)
        assert tokens(generate(net, 2, SampleOptions(kv_cache=True, **opts))) == tokens(
            generate(net, 2, SampleOptions(kv_cache=False, **opts))
        )


@pytest.mark.parametrize("kv_cache", [True, False])
def test_batched_sampling_equals_per_sample_sampling(net, kv_cache):
    opts = SampleOptions(length=20, nucleus_p=0.9, seed=3, kv_cache=kv_cache)
    batch = generate(net, 4, opts, prompt=PROMPT)
    single = [generate(net, 1, opts, prompt=PROMPT, first_index=i).results[0] for i in range(4)]
    assert tokens(batch) == [r.tokens for r in single]
    assert [r.nfe for r in batch.results] == [r.nfe for r in single]
    assert [r.index for r in batch.results] == [0, 1, 2, 3]


def test_sliding_window_cache_is_exact_for_a_one_layer_model():
    """Beyond seq_len the window drops whole blocks and re-bases positions. With one layer a token's K/V do not
    depend on its context, so even the cached variant must then equal recomputation: this checks the eviction
    and the re-rotation of cached keys. (With more layers the cache is approximate there, like the reference.)"""
    net = make_net(layers=1, seq_len=16, seed=4)
    opts = dict(length=40, nucleus_p=0.95, seed=1)  # 46 tokens through a 16-token window
    cached = generate(net, 2, SampleOptions(kv_cache=True, **opts), prompt=PROMPT)
    full = generate(net, 2, SampleOptions(kv_cache=False, **opts), prompt=PROMPT)
    assert tokens(cached) == tokens(full)
    deep = make_net(layers=2, seq_len=16, seed=4)  # the deeper model still samples the full length
    out = generate(deep, 2, SampleOptions(kv_cache=True, **opts), prompt=PROMPT)
    assert all(len(r.tokens) == 46 for r in out.results)


def test_recompute_window_holds_whole_latest_blocks(net):
    den = RecomputeDenoiser(net, 4, 16)
    den.start(torch.arange(8)[None])
    for i in range(3):
        den.commit(torch.full((1, 4), 10 + i))
    assert den.ctx.tolist() == [[10] * 4 + [11] * 4 + [12] * 4]  # 12 = 16 - L' clean tokens


def test_shift_keys_equals_rotation_at_the_earlier_position(net):
    k = torch.randn(2, 4, 3, 8)
    pos = torch.tensor([9, 10, 11])
    cos, sin = net.rotary(pos)
    cos2, sin2 = net.rotary(pos - 4)
    torch.testing.assert_close(
        net.shift_keys(net._rope(k, cos, sin), 4), net._rope(k, cos2, sin2), rtol=1e-5, atol=1e-6
    )


def test_ddpm_reuses_the_x0_prediction_when_nothing_changes(net):
    """64 DDPM steps per block of 4: a forward pass only when the block changed, so at most 4 per block (not 64).
    Batched, the network runs when any row needs it: between the largest NFE and their sum."""
    out = generate(net, 2, SampleOptions(length=16, steps=64, seed=0), prompt=PROMPT[:4])
    nfe = [r.nfe for r in out.results]
    assert all(4 <= n <= 16 for n in nfe)
    assert max(nfe) <= out.model_calls <= sum(nfe)


def test_first_hitting_reveals_one_token_per_forward(net):
    out = generate(net, 2, SampleOptions(length=18, schedule="first_hitting", seed=0), prompt=PROMPT)
    assert [r.nfe for r in out.results] == [18, 18]  # blocks of 4 from position 4: 2 prompt-tail tokens given


def test_threshold_decoding_reveals_confident_tokens_together():
    confident = torch.full((VOCAB,), -20.0)
    confident[7] = 10.0
    out = generate(
        constant_net(confident), 2, SampleOptions(length=16, schedule="threshold", threshold=0.9), prompt=PROMPT[:4]
    )
    assert [r.nfe for r in out.results] == [4, 4]  # one pass per block of 4
    assert all(r.generated == [7] * 16 for r in out.results)
    flat = torch.zeros(VOCAB)  # uniform: nothing is confident, so exactly one token per pass
    out = generate(
        constant_net(flat), 2, SampleOptions(length=16, schedule="threshold", threshold=0.9), prompt=PROMPT[:4]
    )
    assert [r.nfe for r in out.results] == [16, 16]


def test_variable_length_stops_each_sequence_at_its_first_eos():
    eos = 0
    logits = torch.full((VOCAB,), -30.0)
    logits[eos] = math.log(0.15)
    logits[1:11] = math.log(0.085)
    net = constant_net(logits)
    opts = SampleOptions(length=60, seed=2, var_length=True, eos_id=eos)
    out = generate(net, 6, opts, prompt=[eos])  # the prompt's EOS (a document boundary) does not stop it
    lengths = [len(r.generated) for r in out.results]
    assert len(set(lengths)) > 1
    for r in out.results:
        if r.stop == "eos":
            assert r.generated[-1] == eos and eos not in r.generated[:-1]
        else:
            assert r.stop == "length" and len(r.generated) == 60 and eos not in r.generated
    assert {r.stop for r in out.results} >= {"eos"}
    single = [generate(net, 1, opts, prompt=[eos], first_index=i).results[0].tokens for i in range(6)]
    assert tokens(out) == single
    fixed = generate(net, 2, SampleOptions(length=60, seed=2, eos_id=eos), prompt=[eos])
    assert all(len(r.generated) == 60 and r.stop == "length" for r in fixed.results)


def test_variable_length_stops_when_the_entropy_of_the_last_window_collapses():
    logits = torch.full((VOCAB,), -30.0)
    logits[5] = 0.0  # always token 5: entropy 0
    out = generate(constant_net(logits), 1, SampleOptions(length=400, seed=0, var_length=True, eos_id=0), prompt=[0])
    r = out.results[0]
    assert r.stop == "entropy"
    # the prompt token opens the first block, so lengths are multiples of 4; checked after every block, the
    # first length above 256 is 260, and the 256-token low-entropy tail is cut off
    assert len(r.tokens) == 260 - 256
    varied = torch.full((VOCAB,), -30.0)
    varied[1:59] = 0.0  # 58 equally likely tokens: ~3.9 nats over 256 draws, well above a 3-nat floor
    out = generate(
        constant_net(varied),
        1,
        SampleOptions(length=300, seed=0, var_length=True, eos_id=0, entropy_min=3.0),
        prompt=[0],
    )
    assert out.results[0].stop == "length" and len(out.results[0].generated) == 300


@pytest.mark.parametrize("temperature", [0.2, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_nucleus_is_exactly_the_sorted_prefix(temperature, p):
    """The partial-ordering nucleus keeps the same tokens as a full sort, peaked or flat."""
    logits = torch.randn(5, 8000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / temperature
    probs = torch.softmax(logits, -1)
    weights, ids = _nucleus(probs, p)
    full = sorted_nucleus_filter(probs, p)
    for k in range(5):
        kept = ids[k][weights[k] > 0]
        assert set(kept.tolist()) == set(full[k].nonzero().squeeze(1).tolist())
        torch.testing.assert_close(weights[k][weights[k] > 0], probs[k, kept])


def test_proposals_follow_the_nucleus_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    draws = propose(logits.expand(40000, 5), torch.Generator().manual_seed(0), 0.8, greedy=False)
    freq = torch.bincount(draws, minlength=5).double() / 40000
    torch.testing.assert_close(
        freq, torch.tensor([0.4, 0.3, 0.15, 0.0, 0.0], dtype=torch.float64) / 0.85, atol=0.01, rtol=0
    )
    assert torch.equal(propose(logits[None], torch.Generator(), 1.0, greedy=True), torch.tensor([0]))


def test_token_entropy():
    assert token_entropy([3, 3, 3]) == 0.0
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    "bad",
    [
        dict(length=0),
        dict(length=4, schedule="beam"),
        dict(length=4, nucleus_p=0.0),
        dict(length=4, threshold=1.0),
        dict(length=4, steps=0),
    ],
)
def test_bad_options_are_refused(net, bad):
    with pytest.raises(ValueError):
        generate(net, 1, SampleOptions(**bad))


def test_bad_prompt_and_context_are_refused(net):
    with pytest.raises(ValueError, match="mask id"):
        generate(net, 1, SampleOptions(length=4), prompt=[MASK])
    with pytest.raises(ValueError, match="multiple of the block size"):
        generate(net, 1, SampleOptions(length=4, context_len=30))
