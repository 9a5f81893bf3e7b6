"""data_pipeline.prepare: exact round trips for MDS and webdataset, worker invariance, inputs, bad data, CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.corpus import SkipStats, embedded_corpus_files, iter_input_documents
from data_pipeline.dataset import build_text_datasets
from data_pipeline.packing import unpack_stream
from data_pipeline.prepare import PrepareSettings, main, prepare
from data_pipeline.readers import open_rows
from data_pipeline.shards import load_manifest, row_dtype
from data_pipeline.tokenizers import get_tokenizer

TOK = "bert-base-uncased"
SEQ = 64
SUBSET = 24  # SOTU speeches copied for these tests (~150K tokens): big enough for many shards, fast to tokenize


@pytest.fixture(scope="module")
def sotu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first SUBSET State of the Union speeches as a folder of .txt files."""
    folder = tmp_path_factory.mktemp("sotu")
    for f in embedded_corpus_files()[:SUBSET]:
        shutil.copy(f, folder / f.name)
    return folder


def _settings(src: Path | str, out: Path, **kw) -> PrepareSettings:
    base = dict(
        input=str(src), output=str(out), tokenizer=TOK, seq_len=SEQ, val_docs=3, shard_bytes=16 << 10, progress=False
    )
    return PrepareSettings(**{**base, **kw})


def _stream(docs: list[str]) -> np.ndarray:
    tok = get_tokenizer(TOK)
    return np.concatenate([np.asarray(ids + [tok.eos_token_id]) for ids in tok.encode_batch(docs)])


def _shard_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _without_build(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "build"}


@pytest.mark.parametrize("fmt,compression", [("mds", None), ("mds", "zstd"), ("wds", None)])
def test_round_trip_recovers_exact_token_stream(sotu: Path, tmp_path: Path, fmt: str, compression: str | None) -> None:
    out = tmp_path / "prepared"
    manifest = prepare(_settings(sotu, out, format=fmt, compression=compression))
    docs = [p.read_text(encoding="utf-8") for p in sorted(sotu.glob("*.txt"))]
    train_stream, val_stream = _stream(docs[:-3]), _stream(docs[-3:])

    train = open_rows(str(out), "train", TOK, SEQ, cache_dir=str(tmp_path / "cache"))
    val = open_rows(str(out), "val", TOK, SEQ, cache_dir=str(tmp_path / "cache"))
    assert len(train) == train_stream.size // SEQ and len(val) == val_stream.size // SEQ
    np.testing.assert_array_equal(unpack_stream(train.rows(np.arange(len(train)))), train_stream[: len(train) * SEQ])
    np.testing.assert_array_equal(unpack_stream(val.rows(np.arange(len(val)))), val_stream[: len(val) * SEQ])
    assert train.num_shards > 3  # rows cross shard boundaries

    # Same rows as the in-memory reader, and the manifest accounts for every token.
    mem_train, mem_val, info = build_text_datasets(str(sotu), get_tokenizer(TOK), SEQ, val_docs=3, cache_dir=None)
    np.testing.assert_array_equal(train.rows(np.arange(len(train))), mem_train.data)
    np.testing.assert_array_equal(val.rows(np.arange(len(val))), mem_val.data)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (tr["tokens"], va["tokens"]) == (info["train_tokens"], info["val_tokens"])
    assert tr["dropped_tail_tokens"] == tr["tokens"] - tr["rows"] * SEQ
    assert (tr["docs"], va["docs"], manifest["source"]["num_docs"]) == (SUBSET - 3, 3, SUBSET)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["name"] == TOK and manifest["seq_len"] == SEQ
    assert manifest["skipped"]["total"] == 0 and len(manifest["source"]["documents_sha256"]) == 64
    assert load_manifest(out) == manifest


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_output_is_byte_identical_for_any_worker_count(sotu: Path, tmp_path: Path, fmt: str) -> None:
    one = prepare(_settings(sotu, tmp_path / "w1", format=fmt, workers=1))
    two = prepare(_settings(sotu, tmp_path / "w2", format=fmt, workers=2))
    assert (one["build"]["workers"], two["build"]["workers"]) == (1, 2)
    assert _without_build(one) == _without_build(two)
    files_one, files_two = _shard_files(tmp_path / "w1"), _shard_files(tmp_path / "w2")
    assert files_one.keys() == files_two.keys() and len(files_one) > 4
    assert all(files_one[k] == files_two[k] for k in files_one)


def test_row_dtype_by_vocabulary() -> None:
    assert row_dtype(30522) == np.uint16 and row_dtype(50258) == np.uint16 and row_dtype(65535) == np.uint16
    assert row_dtype(65536) == np.uint32 and row_dtype(128256) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        row_dtype(0)


def test_pad_mode_one_row_per_document(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    texts = ["alpha beta", "gamma", " ".join(["delta"] * 40), "epsilon zeta eta"]
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t)
    tok = get_tokenizer(TOK)
    manifest = prepare(_settings(src, tmp_path / "out", seq_len=8, pack="pad", val_docs=1))
    rows = open_rows(str(tmp_path / "out"), "train", TOK, 8).rows(np.arange(3))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for row, text in zip(rows, texts[:3]):
        body = tok.encode(text)[:6]
        want = [bos, *body, eos] + [eos] * (6 - len(body))
        assert row.tolist() == want
    assert manifest["splits"]["train"]["truncated_docs"] == 1 and manifest["pad_token_id"] == eos
    assert manifest["splits"]["val"]["rows"] == 1 and manifest["pack"] == "pad"


def _docs(n: int) -> list[str]:
    return [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(30 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def txt_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, bytes]]:
    """Eight documents as .txt files, prepared: the manifest and shard bytes other input kinds must match."""
    root = tmp_path_factory.mktemp("txt_ref")
    (root / "txt").mkdir()
    for i, d in enumerate(_docs(8)):
        (root / "txt" / f"{i:02d}.txt").write_text(d)
    manifest = prepare(_settings(root / "txt", root / "out", seq_len=16, val_docs=2))
    return manifest, _shard_files(root / "out")


def _assert_same_as_reference(src: Path | str, key: str, out: Path, reference: tuple[dict, dict[str, bytes]]) -> None:
    manifest = prepare(_settings(src, out, seq_len=16, val_docs=2, text_key=key))
    assert manifest["source"]["documents_sha256"] == reference[0]["source"]["documents_sha256"]
    assert manifest["splits"] == reference[0]["splits"]
    assert _shard_files(out) == reference[1]


def test_jsonl_gz_input_with_text_key_matches_txt(tmp_path: Path, txt_reference) -> None:
    src = tmp_path / "d.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(_docs(8)))
    _assert_same_as_reference(src, "body", tmp_path / "out", txt_reference)
    with pytest.raises(ValueError, match="no usable|leaves none"):  # wrong key: every record is skipped
        prepare(_settings(src, tmp_path / "out2", seq_len=16, val_docs=2))


def test_parquet_folder_input_matches_txt(tmp_path: Path, txt_reference) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(8)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs[:5], "n": list(range(5))}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"text": docs[5:], "n": list(range(3))}), tmp_path / "pq" / "b.parquet")
    _assert_same_as_reference(tmp_path / "pq", "text", tmp_path / "out", txt_reference)
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text, n\)"):
        prepare(_settings(tmp_path / "pq", tmp_path / "out2", seq_len=16, text_key="body"))


def test_saved_hf_dataset_input_matches_txt(tmp_path: Path, txt_reference) -> None:
    datasets = pytest.importorskip("datasets")
    docs = _docs(8)
    splits = {
        "train": datasets.Dataset.from_dict({"content": docs}),
        "test": datasets.Dataset.from_dict({"content": docs[:2]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    _assert_same_as_reference(tmp_path / "hf", "content", tmp_path / "out", txt_reference)
    _assert_same_as_reference(f"hf:{tmp_path / 'hf'}", "content", tmp_path / "out2", txt_reference)
    with pytest.raises(ValueError, match="has splits train, test, not 'validation'"):
        prepare(_settings(tmp_path / "hf", tmp_path / "out3", text_key="content", hf_split="validation"))


def test_bad_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    good = _docs(6)
    (src / "a_good.txt").write_text(good[0])
    (src / "b_empty.txt").write_text(" \n\t ")
    (src / "c_binary.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00garbage")
    (src / "d_latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    lines = [
        json.dumps({"text": good[1]}),
        "{not json",
        json.dumps({"body": "no text key"}),
        json.dumps({"text": 7}),
        json.dumps(["a list"]),
        json.dumps({"text": ""}),
        "",
        json.dumps({"text": good[2]}),
    ]
    (src / "e.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    (src / "f_ok.jsonl").write_text(json.dumps({"text": good[3]}) + "\n")
    full = gzip.compress((json.dumps({"text": good[4]}) + "\n" + json.dumps({"text": good[5]}) + "\n").encode() * 50)
    (src / "g_truncated.jsonl.gz").write_bytes(full[: len(full) // 2])
    (src / "h_notes.md").write_text("not an input kind: ignored")

    skipped = SkipStats()
    docs = list(iter_input_documents(str(src), skipped=skipped))
    assert docs[:4] == [good[0], good[1], good[2], good[3]]
    assert len(docs) > 4 and set(docs[4:]) <= {good[4], good[5]}  # what precedes the gzip cut is kept
    assert skipped.counts == {
        "empty": 2,
        "binary": 1,
        "undecodable": 2,
        "bad_record": 4,
        "unreadable": 1,
        "no_tokens": 0,
    }  # counted by prepare, after tokenizing
    assert any("c_binary.txt" in e for e in skipped.examples)

    manifest = prepare(_settings(src, tmp_path / "out", seq_len=16, val_docs=1))
    assert manifest["skipped"]["total"] == 10 and manifest["skipped"]["bad_record"] == 4
    assert manifest["source"]["num_docs"] == len(docs)


@pytest.mark.parametrize("pack", ["pad", "wrap"])
def test_documents_that_tokenize_to_nothing_are_skipped(tmp_path: Path, pack: str) -> None:
    """Zero-width spaces or control characters only: not empty text, but no bert-base-uncased ids. Such a document
    is skipped as no_tokens: no [CLS] + [SEP]... row (--pad), no stray EOS (--wrap), not counted, not hashed."""
    good = _docs(5)
    nothing = ["\u200b\u200b\u200b", "\x01\x02\x7f", "\u200b \x03 \u200c\ufeff"]
    tok = get_tokenizer(TOK)
    assert all(t.strip() and tok.encode(t) == [] for t in nothing)
    texts = [good[0], nothing[0], good[1], nothing[1], good[2], good[3], nothing[2], good[4]]
    (tmp_path / "with.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "without.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    kw = dict(seq_len=16, val_docs=1, pack=pack)
    manifest = prepare(_settings(tmp_path / "with.jsonl", tmp_path / "out", **kw))
    clean = prepare(_settings(tmp_path / "without.jsonl", tmp_path / "clean", **kw))
    assert manifest["skipped"]["no_tokens"] == 3 and manifest["skipped"]["total"] == 3
    assert all("no_tokens" in e for e in manifest["skipped"]["examples"])
    assert manifest["source"]["num_docs"] == 5 and manifest["splits"]["train"]["docs"] == 4
    assert manifest["source"]["documents_sha256"] == clean["source"]["documents_sha256"]
    assert manifest["splits"] == clean["splits"] and _shard_files(tmp_path / "out") == _shard_files(tmp_path / "clean")
    train = open_rows(str(tmp_path / "out"), "train", TOK, 16)
    rows = train.rows(np.arange(len(train)))
    if pack == "pad":  # one row per real document, each starting with text after [CLS]
        assert len(rows) == 4 and all(r[1] != tok.eos_token_id for r in rows)
    else:  # the token stream is exactly the real documents with one EOS each
        stream = _stream(good[:4])
        assert unpack_stream(rows).tolist() == stream[: len(rows) * 16].tolist()

    # the in-memory reader (data.path = a .jsonl) drops them as well
    train_m, val_m, info = build_text_datasets(str(tmp_path / "with.jsonl"), tok, 16, 1)
    assert info["num_docs"] == 5 and info["skipped_no_tokens"] == 3
    assert unpack_stream(train_m.data).tolist() == _stream(good[:4])[: len(train_m) * 16].tolist()


def test_val_fraction_counts_usable_documents(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    for i, d in enumerate(_docs(20)):
        (src / f"{i:02d}.txt").write_text(d)
    (src / "zz_empty.txt").write_text("")
    manifest = prepare(_settings(src, tmp_path / "out", seq_len=16, val_docs=None, val_fraction=0.1))
    assert manifest["validation"]["val_docs"] == 2 and manifest["splits"]["val"]["docs"] == 2
    assert manifest["splits"]["train"]["docs"] == 18


def test_bad_settings_and_inputs_fail_clearly(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    for i, d in enumerate(_docs(3)):
        (src / f"{i}.txt").write_text(d)
    with pytest.raises(ValueError, match="--compression applies to --format mds"):
        prepare(_settings(src, tmp_path / "o1", format="wds", compression="zstd"))
    with pytest.raises(ValueError, match="leaves none for training"):
        prepare(_settings(src, tmp_path / "o2", val_docs=3))
    with pytest.raises(ValueError, match="lower --seq-len"):
        prepare(_settings(src, tmp_path / "o3", seq_len=4096, val_docs=1))
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare(_settings(tmp_path / "nope", tmp_path / "o4"))
    with pytest.raises(ValueError, match="either --val-docs or --val-fraction"):
        prepare(_settings(src, tmp_path / "o5", val_fraction=0.5))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]  # nothing half-written is left


def test_cli_prepares_refuses_to_clobber_and_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    for i, d in enumerate(_docs(6)):
        (src / f"{i}.txt").write_text(d)
    out = tmp_path / "out"
    common = ["--input", str(src), "--format", "wds", "--tokenizer", "gpt2", "--seq-len", "16", "--no-progress"]
    args = [*common, "--output", str(out), "--val-docs", "2", "--workers", "2"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    first = load_manifest(out)
    assert first["format"] == "wds" and first["tokenizer"]["name"] == "gpt2" and first["build"]["workers"] == 2

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and "\n" not in err
    assert main([*common, "--output", str(out), "--val-docs", "1", "--overwrite"]) == 0
    assert load_manifest(out)["validation"]["val_docs"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp/old folders cleaned up

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("precious")
    assert main([*common, "--output", str(tmp_path / "other"), "--val-docs", "2"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "precious"
