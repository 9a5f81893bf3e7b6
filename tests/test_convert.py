"""tools/convert.py and the sampler checkpoint: converted weights reproduce the megatron model, HF layout round trip.

Fast tests build a tiny megatron-core BD3Model in-process and write training checkpoints in the trainer's file
layout: TP=1 with the real ``save_checkpoint``, and TP=2 / PP=2 / TP=2×PP=2 by splitting the TP=1 tensors
ourselves (same file naming, vocabulary padded for tp=2 like megatron does). Slow tests convert real checkpoints:
one written by the trainer CLI in a subprocess, and TP=2 and PP=2 ones written by forked distributed ranks, whose
validation NELBO the converted network must reproduce.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bd3_megatron.checkpoint.hf import from_hf, load_hf, save_hf, to_hf
from bd3_megatron.checkpoint.sampler import load_checkpoint, load_native, save_native
from bd3_megatron.diffusion import bd3_mask
from bd3_megatron.model.bd3_model import canonical_parameter_names, padded_vocab_size
from bd3_megatron.sampling.net import build_net
from tests.helpers import MASK_ID, VOCAB, random_tokens, tiny_model
from tools import convert

ROOT = Path(__file__).resolve().parents[1]
SEQ, BLOCK = 16, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin on a shared CPU
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- helpers
def model_state(model) -> dict:
    """What the trainer saves for a single-process model: canonical names, TP partition dims."""
    names = canonical_parameter_names(model)
    return {
        "model": {names[n]: p.detach().clone() for n, p in model.named_parameters()},
        "tp_partition": {
            names[n]: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for n, p in model.named_parameters()
        },
    }


def metadata(vocab_size: int = VOCAB, tokenizer: str | None = None) -> dict:
    from bd3_megatron.config import Config

    cfg = Config().to_dict()
    cfg["model"].update(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=None, seq_len=SEQ, block_size=BLOCK)
    cfg["diffusion"].update(eps_min=0.2, eps_max=0.8)
    return {"config": cfg, "vocab_size": vocab_size, "mask_token_id": MASK_ID, "tokenizer": tokenizer}


def write_checkpoint(root: Path, step: int, tp: int, pp: int, shards: dict[tuple[int, int], dict], meta: dict) -> Path:
    """A published checkpoint directory in the trainer's layout (model files + metadata.json + latest)."""
    import hashlib

    from bd3_megatron.checkpoint.sharded import FORMAT_VERSION, metadata_digest, step_dir_name

    d = root / step_dir_name(step)
    d.mkdir(parents=True)
    for (t, p), state in shards.items():
        torch.save(state, d / f"model_tp{t:02d}_pp{p:02d}.pt")
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(d.iterdir())
    }
    meta = dict(meta, format_version=FORMAT_VERSION, step=step, files=files, layout={"tp": tp, "pp": pp, "dp": 1})
    (d / "metadata.json").write_text(json.dumps(dict(meta, metadata_sha256=metadata_digest(meta))))
    (root / "latest").write_text(d.name + "\n")
    return d


def split_state(
    state: dict, tp: int, pp: int, num_layers: int, gen: torch.Generator, record_partition: bool = True
) -> dict[tuple[int, int], dict]:
    """Cut a TP=1 training state ({"model", "ema", "tp_partition"}) into the files of a tp×pp layout."""
    part = state["tp_partition"]

    def stage_of(name: str) -> int:
        if name.startswith("embedding."):
            return 0
        if name.startswith("decoder.layers."):
            return int(name.split(".")[2]) * pp // num_layers
        return pp - 1

    def cut(tensors: dict) -> dict[tuple[int, int], dict]:
        out: dict[tuple[int, int], dict] = {(t, p): {} for p in range(pp) for t in range(tp)}
        for name, full in tensors.items():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                rows = padded_vocab_size(VOCAB, 128, tp)  # megatron pads the vocabulary for tp ranks
                pad = torch.randn(rows - VOCAB, full.shape[1], generator=gen) * 100  # junk: must be dropped
                full = torch.cat([full[:VOCAB], pad])
            pieces = [full] * tp if part[name] is None else list(full.chunk(tp, dim=part[name]))
            for t in range(tp):
                out[(t, stage_of(name))][name] = pieces[t].clone()
        return out

    model, ema = cut(state["model"]), cut(state["ema"]["shadow"])
    files = {}
    for key in model:
        f = {"model": model[key], "ema": {"decay": 0.9, "num_updates": 3, "shadow": ema[key]}}
        if record_partition:
            f["tp_partition"] = {n: part[n] for n in model[key]}
        files[key] = f
    return files


def megatron_logits(model, xt, x0) -> torch.Tensor:
    with torch.no_grad():
        hidden, seq = model._stream_hidden(xt, x0)
        return model.full_logits(hidden[:seq].transpose(0, 1))


def assert_logits_match(net, model, seed: int = 0) -> None:
    """Logits of every noisy position and the per-token CE of the megatron forward, fp32 to 1e-5."""
    x0 = random_tokens(3, SEQ, seed=seed)
    masked = torch.rand(3, SEQ, generator=torch.Generator().manual_seed(seed)) < 0.5
    xt = torch.where(masked, torch.full_like(x0, MASK_ID), x0)
    ours = net.bd3_logits(xt, x0)
    torch.testing.assert_close(ours, megatron_logits(model, xt, x0), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ce = model(xt, x0, masked).ce
    mine = -ours.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(torch.where(masked, mine, torch.zeros_like(mine)), ce, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models(mcore):
    """Two tiny megatron models: the raw weights (seed 0) and a distinct 'EMA' (seed 1)."""
    return tiny_model(SEQ, BLOCK, seed=0), tiny_model(SEQ, BLOCK, seed=1)


@pytest.fixture(scope="module")
def train_state(models):
    raw, ema = models
    state = model_state(raw)
    state["ema"] = {"decay": 0.9, "num_updates": 3, "shadow": model_state(ema)["model"]}
    return state


# ---------------------------------------------------------------------------------------------- layouts
def test_tp1_checkpoint_from_save_checkpoint_matches_megatron(models, train_state, tmp_path):
    from bd3_megatron.checkpoint.sharded import Layout, save_checkpoint

    save_checkpoint(
        tmp_path / "ckpt", 5, Layout(1, 1, 1, 0, 0, 0, 0), model_state=train_state, optim_state={}, metadata=metadata()
    )
    ck = convert.gather_training_checkpoint(convert.resolve_step_dir(tmp_path / "ckpt", None))
    assert ck.source["weights"] == "ema" and ck.source["step"] == 5 and ck.clip_window == (0.2, 0.8)
    assert ck.state["output_layer.weight"].shape[0] == VOCAB  # 128 padded rows -> 61
    assert_logits_match(build_net(ck.config, ck.state), models[1])
    raw = convert.gather_training_checkpoint(tmp_path / "ckpt/step_00000005", "raw")
    assert_logits_match(build_net(raw.config, raw.state), models[0])


@pytest.mark.parametrize(
    "tp,pp,recorded",
    [(2, 1, True), (1, 2, True), (2, 2, True), (2, 2, False)],
    ids=["tp2", "pp2", "tp2_pp2", "tp2_pp2_no_partition_record"],
)
def test_synthetic_distributed_checkpoints_convert_to_the_same_model(models, train_state, tmp_path, tp, pp, recorded):
    """Synthetic TP/PP files (split from the TP=1 tensors): merged, de-padded, they give the model's logits."""
    files = split_state(
        train_state, tp, pp, num_layers=2, gen=torch.Generator().manual_seed(tp * 10 + pp), record_partition=recorded
    )
    write_checkpoint(tmp_path / "ckpt", 7, tp, pp, files, metadata())
    ema = convert.gather_training_checkpoint(tmp_path / "ckpt/step_00000007")
    raw = convert.gather_training_checkpoint(tmp_path / "ckpt/step_00000007", "raw")
    assert ema.clip_window == (0.2, 0.8)  # the configured window, as no search result is recorded
    for ck, model in ((ema, models[1]), (raw, models[0])):
        assert ck.source["layout"]["tp"] == tp and ck.source["layout"]["pp"] == pp
        assert_logits_match(build_net(ck.config, ck.state), model, seed=tp + pp)


def test_the_searched_clip_window_is_exported(train_state, tmp_path):
    write_checkpoint(tmp_path / "ckpt", 2, 1, 1, {(0, 0): train_state}, dict(metadata(), clip_window=[0.3, 0.75]))
    ck = convert.gather_training_checkpoint(tmp_path / "ckpt/step_00000002")
    assert ck.clip_window == (0.3, 0.75)
    assert to_hf(ck)[0]["sampling_eps_min"] == 0.3


def test_hf_config_values_are_the_checkpoints(train_state, tmp_path):
    """Every run-dependent field of the exported HF config is the checkpoint's value (dropout 0.25, not the
    reference default 0.1), and it survives hf -> native -> hf."""
    meta = metadata()
    meta["config"]["model"]["dropout"] = 0.25
    write_checkpoint(tmp_path / "ckpt", 3, 1, 1, {(0, 0): train_state}, dict(meta, clip_window=[0.3, 0.75]))
    ck = convert.gather_training_checkpoint(tmp_path / "ckpt/step_00000003")
    config = to_hf(ck)[0]
    m = meta["config"]["model"]
    assert config["dropout"] == 0.25
    assert (config["hidden_dim"], config["n_blocks"], config["n_heads"]) == (
        m["hidden_size"],
        m["num_layers"],
        m["num_heads"],
    )
    assert (config["model_length"], config["block_size"], config["vocab_size"]) == (SEQ, BLOCK, VOCAB)
    assert (config["sampling_eps_min"], config["sampling_eps_max"]) == (0.3, 0.75)
    assert config["bd3_megatron"]["mask_token_id"] == MASK_ID
    save_hf(ck, tmp_path / "hf")
    save_native(load_hf(tmp_path / "hf"), tmp_path / "native")
    assert to_hf(load_native(tmp_path / "native"))[0]["dropout"] == 0.25


def test_missing_stage_file_and_truncated_shard_are_refused(train_state, tmp_path):
    from bd3_megatron.checkpoint.sharded import CheckpointError

    files = split_state(train_state, 2, 2, num_layers=2, gen=torch.Generator().manual_seed(0))
    d = write_checkpoint(tmp_path / "ckpt", 3, 2, 2, files, metadata())
    shard = d / "model_tp01_pp01.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        convert.gather_training_checkpoint(d)
    shard.unlink()
    with pytest.raises(CheckpointError, match="model_tp01_pp01.pt"):
        convert.gather_training_checkpoint(d)


# ---------------------------------------------------------------------------------------------- HF layout
def hf_reference_logits(config: dict, sd: dict, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The reference BD3LM forward written from the spec (§3): adaLN with sigma = 0, weight-only LayerNorm then
    modulate, qkv rows (three h d), gated residuals, MLP with biases, final adaLN + biased linear. SUBS on top."""
    d, heads, n = config["hidden_dim"], config["n_heads"], xt.shape[1]
    hd = d // heads
    x = sd["backbone.vocab_embed.embedding"][torch.cat([xt, x0], dim=1)]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    t_freq = torch.cat([torch.cos(0 * freqs), torch.sin(0 * freqs)])[None]  # sigma = 0
    c = F.linear(t_freq, sd["backbone.sigma_map.mlp.0.weight"], sd["backbone.sigma_map.mlp.0.bias"])
    c = F.silu(F.linear(F.silu(c), sd["backbone.sigma_map.mlp.2.weight"], sd["backbone.sigma_map.mlp.2.bias"]))
    ang = torch.outer(torch.arange(n, dtype=torch.float32), sd["backbone.rotary_emb.inv_freq"])
    ang = torch.cat([ang, ang], dim=-1).repeat(2, 1)  # both halves share positions 0..n-1
    cos, sin = ang.cos(), ang.sin()

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def ln(t, w):
        return F.layer_norm(t, [d]) * w

    mask = bd3_mask(n, config["block_size"])
    for i in range(config["n_blocks"]):
        p = f"backbone.blocks.{i}."
        mod = F.linear(c, sd[p + "adaLN_modulation.weight"], sd[p + "adaLN_modulation.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=-1)
        h = ln(x, sd[p + "norm1.weight"]) * (1 + scale1) + shift1
        qkv = F.linear(h, sd[p + "attn_qkv.weight"]).view(x.shape[0], 2 * n, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=mask, scale=1 / math.sqrt(hd))
        x = x + gate1 * F.linear(a.transpose(1, 2).reshape(x.shape[0], 2 * n, d), sd[p + "attn_out.weight"])
        h = ln(x, sd[p + "norm2.weight"]) * (1 + scale2) + shift2
        m = F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]), approximate="tanh")
        x = x + gate2 * F.linear(m, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    f = "backbone.output_layer."
    shift, scale = F.linear(c, sd[f + "adaLN_modulation.weight"], sd[f + "adaLN_modulation.bias"])[:, None].chunk(2, -1)
    h = ln(x, sd[f + "norm_final.weight"]) * (1 + scale) + shift
    logits = F.linear(h, sd[f + "linear.weight"], sd[f + "linear.bias"])[:, :n]
    logits[..., MASK_ID] = float("-inf")
    return logits


@pytest.fixture(scope="module")
def native(train_state, tmp_path_factory):
    root = tmp_path_factory.mktemp("native_src")
    write_checkpoint(root / "ckpt", 9, 1, 1, {(0, 0): train_state}, metadata())
    ck = convert.gather_training_checkpoint(root / "ckpt/step_00000009")
    out = root / "native"
    save_native(ck, out)
    return out


def test_hf_layout_computes_the_reference_forward(native, models):
    ck = load_native(native)
    config, sd = to_hf(ck)
    assert sd["backbone.blocks.0.attn_qkv.weight"].shape == (96, 32)
    assert sd["sampling_eps_min"].item() == pytest.approx(0.2)
    x0 = random_tokens(2, SEQ, seed=4)
    xt = torch.where(torch.rand(2, SEQ, generator=torch.Generator().manual_seed(4)) < 0.5, MASK_ID, x0)
    torch.testing.assert_close(
        hf_reference_logits(config, sd, xt, x0), megatron_logits(models[1], xt, x0), rtol=1e-5, atol=1e-5
    )


def test_native_hf_native_round_trip_is_lossless(native, tmp_path):
    ck = load_native(native)
    save_hf(ck, tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    assert back.config == ck.config and back.clip_window == ck.clip_window and back.tokenizer == ck.tokenizer
    assert set(back.state) == set(ck.state)
    assert all(torch.equal(back.state[k], ck.state[k]) for k in ck.state)
    assert convert.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "native2"), "--quiet"]) == 0
    assert (tmp_path / "native2/model.safetensors").read_bytes() == (native / "model.safetensors").read_bytes()
    assert load_checkpoint(tmp_path / "native2").source["imported_from"] == "hf"


@pytest.mark.parametrize(
    "edit",
    [
        # W·c with c = silu(sigma_map(0)) != 0 (with a zero sigma_map, c = 0 and W would not matter)
        lambda s: (
            s["backbone.blocks.1.adaLN_modulation.weight"].add_(0.01),
            s["backbone.sigma_map.mlp.2.bias"].add_(1),
        ),
        lambda s: s["backbone.blocks.0.mlp.0.bias"].add_(0.5),
        lambda s: s["backbone.blocks.1.mlp.2.bias"].add_(0.5),
        lambda s: s["backbone.output_layer.linear.bias"].add_(1.0),
        lambda s: s["backbone.blocks.0.adaLN_modulation.bias"][64:96].mul_(2),  # gate_msa
        lambda s: s["backbone.blocks.0.adaLN_modulation.bias"][32:64].add_(1),  # scale_msa
        lambda s: s["backbone.output_layer.adaLN_modulation.bias"][32:].add_(0.5),  # final scale
    ],
)
def test_hf_import_of_what_the_plain_layer_cannot_hold_uses_the_bd3lms_layer(native, edit):
    """Each of these once refused the import; now the weights map to model.arch=bd3lms exactly (the spec-written
    reference forward equals the imported network's)."""
    config, sd = to_hf(load_native(native))
    sd = {k: v.clone() for k, v in sd.items()}
    edit(sd)
    ck = from_hf(config, sd)
    assert ck.config.arch == "bd3lms"
    x0 = random_tokens(2, SEQ, seed=5)
    xt = torch.where(torch.rand(2, SEQ, generator=torch.Generator().manual_seed(5)) < 0.5, MASK_ID, x0)
    with torch.no_grad():
        ours = build_net(ck.config, ck.state).bd3_logits(xt, x0)
    torch.testing.assert_close(ours, hf_reference_logits(config, sd, xt, x0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c, s: s.pop("backbone.blocks.1.attn_out.weight"), "missing"),
        (lambda c, s: s.__setitem__("backbone.extra.weight", torch.ones(2)), "no counterpart"),
        (lambda c, s: s["backbone.rotary_emb.inv_freq"].mul_(0.5), "base-10000"),
        (lambda c, s: c.update(n_heads=8), "inv_freq has shape"),
        (lambda c, s: c.update(causal=True), "AR baseline"),
        (lambda c, s: c.update(cross_attn=False), "MDLM"),
        (lambda c, s: s["backbone.blocks.0.mlp.0.bias"].__setitem__(3, float("nan")), "non-finite"),
    ],
)
def test_hf_import_refuses_what_it_cannot_represent(native, edit, message):
    config, sd = to_hf(load_native(native))
    sd = {k: v.clone() for k, v in sd.items()}
    edit(config, sd)
    with pytest.raises(ValueError, match=message):
        from_hf(config, sd)


def test_hf_import_infers_the_reference_vocabularies(native):
    config, sd = to_hf(load_native(native))
    del config["bd3_megatron"]
    with pytest.raises(ValueError, match="mask id is unknown"):
        from_hf(config, sd)


# ---------------------------------------------------------------------------------------------- CLIs
def test_convert_cli_output_and_refusals(native, train_state, tmp_path, capsys):
    files = split_state(train_state, 2, 1, num_layers=2, gen=torch.Generator().manual_seed(1))
    write_checkpoint(tmp_path / "ckpt", 4, 2, 1, files, metadata())
    assert convert.main(["--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "decoder.layers.1.mlp.linear_fc2.weight" in out and "32x128" in out and "total" in out
    assert '"weights": "ema"' in out and "wrote native checkpoint" in out
    before = (tmp_path / "out/model.safetensors").read_bytes()
    cases = [
        (["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")], "does not exist"),
        (["--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")], "not empty"),
        (
            ["--input", str(tmp_path / "ckpt"), "--step", "5", "--output", str(tmp_path / "o2")],
            "no checkpoint for step 5",
        ),
        (["--input", str(native), "--raw", "--output", str(tmp_path / "o3")], "training checkpoints only"),
    ]
    for argv, message in cases:
        assert convert.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert (tmp_path / "out/model.safetensors").read_bytes() == before  # never overwritten
    del files[(0, 0)]["ema"], files[(1, 0)]["ema"]
    write_checkpoint(tmp_path / "noema", 4, 2, 1, files, metadata())
    assert convert.main(["--input", str(tmp_path / "noema"), "--ema", "--output", str(tmp_path / "o4")]) == 2
    assert "--raw" in capsys.readouterr().err


def test_truncated_or_foreign_sampler_folders_are_refused(native, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((native / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((native / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="neither"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


def test_sample_cli_on_a_converted_checkpoint(native, tmp_path, capsys):
    from tools import sample

    argv = [
        "--checkpoint",
        str(native),
        "--num-samples",
        "3",
        "--length",
        "12",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--output",
        str(tmp_path / "s.jsonl"),
        "--no-progress",
    ]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3 and "NFE" in out and "tok/s" in out
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(r["length"] == 12 for r in rows)
    assert sample.main(argv[:-3] + ["--batch-size", "3", "--no-kv-cache", "--output", str(tmp_path / "t.jsonl")]) == 0
    again = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in again] == [r["tokens"] for r in rows]  # batch size and cache change nothing
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error:")


# ---------------------------------------------------------------------------------------------- real checkpoints
@torch.no_grad()
def _val_nelbo_of_net(net, cfg, cache_dir: str) -> float:
    """The trainer's validation NELBO (EMA weights, window [1e-3, 1], fixed noise, token-weighted), recomputed
    with the converted network."""
    from bd3_megatron.diffusion.schedule import ClipWindow
    from bd3_megatron.training.batches import BatchMaker
    from data_pipeline.dataset import build_text_datasets
    from data_pipeline.tokenizers import get_tokenizer

    tok = get_tokenizer(cfg.data.tokenizer)
    _, val_rows, _ = build_text_datasets(cfg.data.path, tok, cfg.model.seq_len, cfg.data.val_docs, cache_dir)
    n = min(len(val_rows), cfg.train.eval_rows or len(val_rows))
    maker = BatchMaker(cfg, tok.mask_token_id, torch.device("cpu"))
    total, count = 0.0, 0
    for start in range(0, n, 3):  # any batch size scores the same rows with the same noise
        b = maker.eval_batch(val_rows, np.arange(start, start + 3), n, ClipWindow(1e-3, 1.0))
        logp = net.bd3_logits(b.xt, b.x0).log_softmax(-1)
        ce = torch.where(b.masked, -logp.gather(-1, b.x0[..., None]).squeeze(-1), torch.zeros(()))
        total += float((ce * b.weight).sum())
        count += int(b.valid.sum()) * ce.shape[1]
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1, 1, 0), (1, 2, 1, 0)], ids=["tp2", "pp2"])
def test_real_distributed_checkpoint_reproduces_the_distributed_validation_nelbo(layout, data_cache, tmp_path):
    from tests.dist_harness import run_ranks
    from tests.dist_workers import make_config, save_and_eval

    tp, pp, _, _ = layout
    results = run_ranks(save_and_eval, tp * pp, layout, data_cache, str(tmp_path))
    want = next(r["val"]["val_nelbo"] for r in results if r["last_stage"])
    assert convert.main(["--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--quiet"]) == 0
    ck = load_checkpoint(tmp_path / "out")
    assert ck.source["layout"]["tp"] == tp and ck.source["layout"]["pp"] == pp and ck.source["weights"] == "ema"
    cfg = make_config(layout, data_cache, str(tmp_path / "log"), ["optim.ema=0.9"])
    got = _val_nelbo_of_net(build_net(ck.config, ck.state), cfg, data_cache)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_trainer_cli_checkpoint_converts_and_samples(mcore, data_cache, tmp_path):
    """The user path: train (subprocess CLI), convert (CLI), sample (CLI); converted weights = the megatron model's."""
    from bd3_megatron.checkpoint.sharded import load_file
    from bd3_megatron.model.bd3_model import BD3Model, BD3Spec, build_transformer_config
    from tests.test_train_e2e import run, tiny_args

    proc = run(
        tiny_args(
            tmp_path,
            data_cache,
            "train.max_steps=3",
            "train.eval_interval=0",
            "optim.ema=0.9",
            "sample.after_train=false",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw_out, ema_out = tmp_path / "raw", tmp_path / "ema"
    for extra, out in ((["--raw"], raw_out), ([], ema_out)):
        conv = run(
            [sys.executable, "tools/convert.py", "--input", str(tmp_path / "ckpt"), "--output", str(out), *extra]
        )
        assert conv.returncode == 0, conv.stderr
        assert "output_layer.weight" in conv.stdout and "checksum" in conv.stdout
    meta = json.loads((tmp_path / "ckpt/step_00000003/metadata.json").read_text())
    m = meta["config"]["model"]
    tconf = build_transformer_config(
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        num_heads=m["num_heads"],
        ffn_hidden_size=m["ffn_hidden_size"],
        dropout=0.0,
        tp=1,
        pp=1,
    )
    model = BD3Model(tconf, BD3Spec(meta["vocab_size"], meta["mask_token_id"], m["seq_len"], m["block_size"])).eval()
    saved = load_file(tmp_path / "ckpt/step_00000003/model_tp00_pp00.pt")
    for out, tensors in ((raw_out, saved["model"]), (ema_out, saved["ema"]["shadow"])):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(tensors[name])
        net = build_net(load_checkpoint(out).config, load_checkpoint(out).state)
        x0 = torch.randint(0, meta["vocab_size"] - 1, (2, m["seq_len"]), generator=torch.Generator().manual_seed(0))
        xt = torch.where(
            torch.rand(2, m["seq_len"], generator=torch.Generator().manual_seed(1)) < 0.5, meta["mask_token_id"], x0
        )
        torch.testing.assert_close(net.bd3_logits(xt, x0), megatron_logits(model, xt, x0), rtol=1e-5, atol=1e-5)
    smp = run(
        [
            sys.executable,
            "tools/sample.py",
            "--checkpoint",
            str(ema_out),
            "--num-samples",
            "2",
            "--length",
            "16",
            "--no-progress",
        ]
    )
    assert smp.returncode == 0, smp.stderr
    assert smp.stdout.count("--- sample") == 2 and "network calls" in smp.stdout


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--length", "0"], "--length must be >= 1, got 0"),
        (["--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--block-size", "-4"], "--block-size must be >= 1, got -4"),
        (["--block-size", "BIG"], "is larger than the model's context of"),
    ],
    ids=["length0", "block0", "block_negative", "block_beyond_context"],
)
def test_sample_cli_refuses_zero_sizes_and_a_block_beyond_the_context(native, capsys, flags, message):
    """issue 14: 0 is refused, not silently replaced by the default; a block longer than the context names that."""
    from tools import sample

    flags = [str(2 * SEQ) if f == "BIG" else f for f in flags]
    assert sample.main(["--checkpoint", str(native), "--num-samples", "1", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert "context length 0" not in err[0]
