"""Autoregressive scoring with the project's own checkpoints: L'=1 BD3 at window (1, 1) is the AR NLL of its weights,
the AR baseline's scorer reproduces its training evaluation, sliding windows, generative perplexity in eval_ppl."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from bd3_megatron.checkpoint.sampler import SamplerCheckpoint
from bd3_megatron.sampling.net import KVCache, NetConfig, build_net
from bd3_megatron.sampling.scorer import ProjectScorer, load_scorer, sequence_nll, window_spans
from tests.test_train_e2e import ROOT, metrics, run, tiny_args


def random_scorer(mode: str, block_size: int = 1, seq_len: int = 8) -> ProjectScorer:
    cfg = NetConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        ffn_hidden_size=64,
        vocab_size=30522,
        mask_token_id=103,
        seq_len=seq_len,
        block_size=block_size,
        mode=mode,
    )
    torch.manual_seed(0)
    state = build_net(cfg).state_dict()
    return ProjectScorer(SamplerCheckpoint(cfg, state, tokenizer="bert-base-uncased"))


def test_window_spans_score_every_target_exactly_once():
    for n in (1, 5, 8, 9, 16, 21):
        spans = window_spans(n, context=8, stride=4)
        scored = [i for _, end, first in spans for i in range(first, end)]
        assert scored == list(range(n))
        assert all(end - start <= 8 for start, end, _ in spans)
        assert all(first - start >= 4 for start, _, first in spans[1:])  # later windows keep >= stride context
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, context=8, stride=9)


@pytest.mark.parametrize("mode", ["ar", "bd3"])
def test_long_texts_are_scored_in_sliding_windows(mode):
    scorer = random_scorer(mode)
    ids = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(1))
    nll = sequence_nll(scorer, ids.tolist())
    torch.testing.assert_close(nll[:8], scorer.window_nll(ids[:8]), equal_nan=True)  # first window: context 8
    torch.testing.assert_close(nll[8:12], scorer.window_nll(ids[4:12])[4:])  # then stride 4, new tokens only
    torch.testing.assert_close(nll[16:], scorer.window_nll(ids[12:20])[4:])
    assert math.isnan(nll[0]) == (mode == "ar") and not torch.isnan(nll[1:]).any()


def test_bd3_scorer_needs_block_size_one():
    with pytest.raises(ValueError, match="not an autoregressive scorer"):
        random_scorer("bd3", block_size=4)


def kv_cache_ar_nll(net, row: torch.Tensor) -> torch.Tensor:
    """The L'=1 BD3 weights run as an AR language model, one token at a time with a KV cache: a mask token at
    position l reads the cached clean prefix, then the clean x_l joins the cache (the KV sampler's exact cache)."""
    cfg = net.cfg
    cache = KVCache(cfg, 1, len(row), torch.device("cpu"), torch.float32)
    out = []
    with torch.no_grad():
        for pos in range(len(row)):
            where = torch.tensor([pos])
            query = net.run(torch.tensor([[cfg.mask_token_id]]), where, cache)  # not kept: length unchanged
            out.append(torch.nn.functional.cross_entropy(net.logits(query)[0], row[pos : pos + 1]))
            net.run(row[None, pos : pos + 1], where, cache)
            cache.length += 1
    return torch.stack(out)


def validation_rows(ckpt_dir, n: int) -> torch.Tensor:
    """The first n rows of a run's validation split, read the way the trainer reads them."""
    from bd3_megatron.checkpoint import sharded as ckpt
    from data_pipeline.readers import build_datasets
    from data_pipeline.tokenizers import get_tokenizer

    c = ckpt.read_metadata(ckpt.resolve_checkpoint("auto", ckpt_dir))["config"]
    tok = get_tokenizer(c["data"]["tokenizer"])
    _, val, _ = build_datasets(
        c["data"]["path"], tok, c["model"]["seq_len"], c["data"]["val_docs"], c["data"]["cache_dir"]
    )
    return torch.from_numpy(val.rows(np.arange(n))).long()


def eval_ppl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/eval_ppl.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_block_size_one_nelbo_at_window_one_is_the_ar_nll_and_ar_checkpoints_score_samples(tmp_path, data_cache):
    common = ("train.max_steps=6", "train.eval_interval=6", "checkpoint.interval=6", "sample.after_train=false")
    bd3, ar = tmp_path / "bd3_l1", tmp_path / "ar"
    proc = run(tiny_args(bd3, data_cache, "model.block_size=1", "diffusion.clip_search=true", *common))
    assert proc.returncode == 0, proc.stderr[-2000:]
    searched = metrics(bd3 / "log")[6]
    assert sorted(k for k in searched if k.startswith("clip_var/")) == ["clip_var/0.001-1", "clip_var/1-1"]
    proc = run(tiny_args(ar, data_cache, "model.mode=ar", "model.block_size=1", *common))
    assert proc.returncode == 0, proc.stderr[-2000:]

    # L'=1, window (1, 1): the megatron NELBO of the trainer's evaluation path ...
    res = eval_ppl("--checkpoint", str(bd3 / "ckpt"), "--max-rows", "8", "--batch-size", "4", "--window", "1", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    nelbo = json.loads(res.stdout.strip().splitlines()[-1])["nelbo"]
    assert "PPL = " in res.stdout  # an exact likelihood, not a bound
    # ... equals the NLL of the same weights run as an AR model: plain-torch scorer and token-by-token KV cache
    scorer = load_scorer(bd3 / "ckpt")
    rows = validation_rows(bd3 / "ckpt", 8)
    per_token = torch.stack([sequence_nll(scorer, r.tolist()) for r in rows])
    assert per_token.mean().item() == pytest.approx(nelbo, rel=1e-5)
    for r, nll in zip(rows[:2], per_token[:2]):
        torch.testing.assert_close(kv_cache_ar_nll(scorer.net, r), nll, rtol=1e-4, atol=1e-5)

    # the AR baseline as a scorer reproduces the run's own validation NLL (16 rows, token 0 unpredicted) ...
    want = metrics(ar / "log")[6]["val_nelbo"]
    ar_scorer = load_scorer(ar / "ckpt")
    got = torch.stack([sequence_nll(ar_scorer, r.tolist())[1:] for r in validation_rows(ar / "ckpt", 16)])
    assert got.mean().item() == pytest.approx(want, rel=1e-5)
    # ... also after conversion to a sampler folder, which the bd3 sampler and the HF layout refuse
    from tools import convert

    assert convert.main(["--input", str(ar / "ckpt"), "--output", str(tmp_path / "ar_native"), "--quiet"]) == 0
    folder_scorer = load_scorer(tmp_path / "ar_native")
    row = validation_rows(ar / "ckpt", 1)[0].tolist()
    torch.testing.assert_close(sequence_nll(folder_scorer, row), sequence_nll(ar_scorer, row), equal_nan=True)
    assert convert.main(["--input", str(ar / "ckpt"), "--output", str(tmp_path / "ar_hf"), "--format", "hf"]) == 2
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate

    with pytest.raises(ValueError, match="model.mode=ar"):
        generate(folder_scorer.net, 1, SampleOptions(length=4))

    # eval_ppl: samples of the BD3 model scored by the project's own AR checkpoint
    gen = eval_ppl(
        "--checkpoint",
        str(bd3 / "ckpt"),
        "--max-rows",
        "4",
        "--batch-size",
        "4",
        "--gen-ppl-model",
        str(ar / "ckpt"),
        "--num-samples",
        "2",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    g = json.loads(gen.stdout.strip().splitlines()[-1])
    assert len(g["gen_ppl_per_sample"]) == 2 and all(p > 1 for p in g["gen_ppl_per_sample"])
    assert g["scorer"].startswith("ar checkpoint") and g["gen_ppl_tokens"] > 0 and len(g["samples"]) == 2
    # refusals: a block-diffusion model cannot score; --window means nothing for an AR checkpoint
    bad = eval_ppl("--checkpoint", str(ar / "ckpt"), "--max-rows", "4", "--batch-size", "4", "--window", "1", "1")
    assert bad.returncode == 2 and "--window applies to diffusion models" in bad.stderr
    bad = eval_ppl("--checkpoint", str(bd3 / "ckpt"), "--max-rows", "4", "--window", "0.5", "0.2")
    assert bad.returncode == 2 and "BETA <= OMEGA" in bad.stderr
