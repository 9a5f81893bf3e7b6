"""model.mode=sedd: the time-conditioned backbone with the score-entropy head against independent evaluations.

* the model's fused head (value and gradients) = diffusion.sedd's dense score entropy of the same network's logits;
* the batch's sigma and NELBO weights are SEDD's log-linear sigma(t) and dsigma(t) of the drawn t;
* the conditioning reaches every layer and the final norm (another sigma, other outputs);
* the converted single-device network computes the training model's logits (TP=1 in process; a PP=2 checkpoint
  with its per-stage copies of the time embedding converts to the single-process run's weights);
* every TP/PP/DP layout trains like the single process (losses, gradient norms, validation NELBO, weights);
* the sampler: sample i is the same in any batch, the prompt is kept, the context bounds the length;
* config and init_from refusals.
"""

from __future__ import annotations

import pytest
import torch

from bd3_megatron.config import ConfigError, load_config
from bd3_megatron.diffusion.sedd import SEDDLogLinearNoise, score_entropy, sedd_log_score
from bd3_megatron.sampling.net import NetConfig, build_net
from bd3_megatron.training.batches import BatchMaker
from tests.dist_harness import run_ranks
from tests.dist_workers import merge_full_weights, train_and_save, train_layout
from tests.helpers import MASK_ID, VOCAB, random_tokens, tiny_model

L, COND = 16, 8
SEDD_ARGS = ["model.mode=sedd", "model.arch=bd3lms", f"model.seq_len={L}", f"model.block_size={L}"]
SEDD_ARGS += [f"model.cond_dim={COND}", "diffusion.resample=false"]


def sedd_model(seed: int = 0):
    """A 2-layer SEDD model on the 61-token vocabulary. adaLN-Zero makes every layer the identity at
    initialisation, so the modulation and the time embedding are drawn at random: the test must see them act."""
    model = tiny_model(seq_len=L, block_size=L, mode="sedd", arch="bd3lms", cond_dim=COND, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "time_embedding" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def sedd_batch(seed: int = 0, b: int = 3):
    cfg = load_config(None, [*SEDD_ARGS, f"train.micro_batch_size={b}", f"train.global_batch_size={b}"])
    maker = BatchMaker(cfg, mask_token_id=MASK_ID, device=torch.device("cpu"))
    return maker.corrupt(random_tokens(b, L, seed), torch.arange(b), step=5)


def dense_logits(model, batch, sigma=None):
    """[b, L, V] logits of the same network without the fused head (the sampling/evaluation path)."""
    hidden, seq_len = model._stream_hidden(batch.xt, batch.x0, None, batch.sigma if sigma is None else sigma)
    return model.full_logits(hidden[:seq_len].transpose(0, 1))


def test_batch_carries_sedd_sigma_and_dsigma_weights():
    batch = sedd_batch()
    t = batch.t[:, 0]
    assert batch.t.shape == (3, 1) and batch.masked.any()  # one t per sequence (block size L)
    sigma, dsigma = SEDDLogLinearNoise().sigma_dsigma(t)
    torch.testing.assert_close(batch.sigma, sigma)
    torch.testing.assert_close(batch.weight, torch.where(batch.masked, dsigma[:, None], 0.0))
    assert torch.equal(batch.xt[batch.masked], torch.full_like(batch.xt[batch.masked], MASK_ID))


def test_fused_head_equals_the_dense_score_entropy_value_and_gradients(mcore):
    model = sedd_model()
    batch = sedd_batch()
    out = model(batch.xt, batch.x0, batch.masked, batch.weight, None, batch.sigma)
    out.nelbo_sum.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = dense_logits(model, batch)  # mask token at -inf; V = 61 real ids, so log(V - 1) as the head
    ref = score_entropy(
        sedd_log_score(logits, batch.xt, batch.sigma, MASK_ID), batch.sigma, batch.xt, batch.x0, MASK_ID
    )
    (batch.weight * ref).sum().backward()

    torch.testing.assert_close(out.ce, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nelbo_sum, (batch.weight * ref).sum().detach(), rtol=1e-5, atol=1e-4)
    assert float(out.ce[~batch.masked].abs().max()) == 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused_grads["time_embedding.mlp.0.weight"].abs().sum() > 0  # the conditioning is trained
    assert fused_grads["decoder.final_layernorm.modulation.weight"].abs().sum() > 0


def test_sigma_conditions_every_layer_and_is_required(mcore):
    model = sedd_model()
    batch = sedd_batch()
    with torch.no_grad():
        a = dense_logits(model, batch)
        b = dense_logits(model, batch, sigma=batch.sigma * 0.5)
    assert (a - b)[..., :MASK_ID].abs().max() > 1e-3  # the mask token's column is -inf in both
    with pytest.raises(ValueError, match="time-conditioned: the forward needs sigma"):
        model(batch.xt, batch.x0, batch.masked, batch.weight, None, None)


def net_config(**over) -> NetConfig:
    fields = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=128, vocab_size=VOCAB)
    fields.update(mask_token_id=MASK_ID, seq_len=L, block_size=L, mode="sedd", arch="bd3lms")
    fields.update(time_conditioning=True, cond_dim=COND, **over)
    return NetConfig(**fields)


def test_converted_network_computes_the_training_models_logits(mcore):
    model = sedd_model(seed=3)
    batch = sedd_batch(seed=3)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        state[name] = state[name][:VOCAB]  # the vocabulary padding rows (tensor parallelism) are dropped
    net = build_net(net_config(), state)
    with torch.no_grad():
        want = dense_logits(model, batch)
        got = net.full_logits(batch.xt, batch.sigma)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_sampler_is_batch_invariant_keeps_the_prompt_and_stays_in_the_context(mcore):
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate

    torch.manual_seed(0)
    net = build_net(net_config())  # small random weights
    opts = SampleOptions(length=L - 2, steps=4, seed=7, nucleus_p=0.9)
    together = generate(net, 3, opts, prompt=[5, 6])
    alone = generate(net, 1, opts, prompt=[5, 6], first_index=2)
    assert together.results[2].tokens == alone.results[0].tokens
    for r in together.results:
        assert r.tokens[:2] == [5, 6] and len(r.generated) == L - 2 and MASK_ID not in r.tokens
        assert r.nfe == 5  # 4 analytic steps and the denoising step
    assert together.results[0].tokens != together.results[1].tokens
    with pytest.raises(ValueError, match="inside its context of 16 tokens"):
        generate(net, 1, SampleOptions(length=L, steps=2), prompt=[5])


def test_config_refusals():
    load_config(None, SEDD_ARGS)
    with pytest.raises(ConfigError, match="model.mode=sedd needs model.block_size = model.seq_len"):
        load_config(None, [*SEDD_ARGS, "model.block_size=4"])
    with pytest.raises(ConfigError, match="model.mode=sedd needs model.arch=bd3lms"):
        load_config(None, [*SEDD_ARGS, "model.arch=megatron"])
    with pytest.raises(ConfigError, match="diffusion.clip_search=false"):
        load_config(None, [*SEDD_ARGS, "diffusion.clip_search=true"])
    with pytest.raises(ConfigError, match="model.cond_dim must be an integer >= 1"):
        load_config(None, [*SEDD_ARGS, "model.cond_dim=0"])


# ---- every layout trains like the single process ----
STEPS = 3
DIST_ARGS = [*SEDD_ARGS, "model.num_layers=4", "model.hidden_size=32", "model.num_heads=4"]


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory):
    res = run_ranks(train_layout, 1, (1, 1, 1, 0), data_cache, str(tmp_path_factory.mktemp("ref")), STEPS, DIST_ARGS)
    return res[0], merge_full_weights(res)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1, 1, 0), (1, 1, 2, 1)], ids=["tp2", "dp2_zero1"])
def test_sedd_layout_matches_single_process(layout, reference, data_cache, tmp_path):
    ref, ref_weights = reference
    tp, pp, dp, _ = layout
    results = run_ranks(train_layout, tp * pp * dp, layout, data_cache, str(tmp_path), STEPS, DIST_ARGS)
    last = next(r for r in results if r["last_stage"] and r["tp_rank"] == 0 and r["dp_rank"] == 0)
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(last["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)
    assert last["val"]["val_nelbo"] == pytest.approx(ref["val"]["val_nelbo"], rel=1e-5)
    _weights_match(merge_full_weights(results), ref_weights)


def _weights_match(weights: dict, ref_weights: dict) -> None:
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        rel = (w - ref_weights[name]).norm() / ref_weights[name].norm().clamp_min(1e-12)
        assert rel < 3e-4, (name, float(rel))  # the bound of test_distributed_equivalence, for the same reason


@pytest.mark.slow
def test_sedd_pipeline_keeps_its_time_embedding_copies_equal_and_converts(reference, data_cache, tmp_path):
    """PP=2: each stage holds the time embedding; their gradients are summed over the pipeline, so the copies stay
    equal and equal the single process's; the gradient norm counts them once; the checkpoint converts."""
    from bd3_megatron.checkpoint.from_training import gather_training_checkpoint

    ref, ref_weights = reference
    extra = [*DIST_ARGS, f"checkpoint.dir={tmp_path / 'ckpt'}", "optim.ema=0"]
    results = run_ranks(train_and_save, 2, (1, 2, 1, 0), data_cache, str(tmp_path), STEPS, extra)
    last = next(r for r in results if r["last_stage"])
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert last["val"]["val_nelbo"] == pytest.approx(ref["val"]["val_nelbo"], rel=1e-5)
    copies = [r["params"]["time_embedding.mlp.0.weight"] for r in results]
    assert torch.equal(copies[0], copies[1])
    _weights_match(merge_full_weights(results), ref_weights)
    ck = gather_training_checkpoint(tmp_path / "ckpt" / "step_00000003", weights="raw", log=lambda m: None)
    assert ck.config.time_conditioning and ck.config.cond_dim == COND and ck.config.mode == "sedd"
    torch.testing.assert_close(ck.state["time_embedding.mlp.0.weight"], ref_weights["time_embedding.mlp.0.weight"])
    build_net(ck.config, ck.state)  # every tensor present, shapes as the network expects
