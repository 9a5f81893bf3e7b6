"""Readers over prepared shards: refusal of mismatched or damaged shards, and exact mid-epoch resume.

Resume is checked against a restart in a fresh process for the trainer's global-index path (the real
ShuffledStream over open_rows), plus DP=2 against DP=1; a local folder read as a streaming remote gives the same rows
(object storage itself: tests/test_s3_streaming.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from data_pipeline.corpus import embedded_corpus_files
from data_pipeline.dataset import InMemoryRows, ShuffledStream
from data_pipeline.prepare import PrepareSettings, prepare
from data_pipeline.readers import ShardRows, _TarShard, build_datasets, open_rows
from data_pipeline.tokenizers import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK, SEQ, G, SEED = "bert-base-uncased", 32, 8, 5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first 20 SOTU speeches (~1.5K rows of 32 tokens) prepared as MDS, zstd MDS and webdataset."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "src").mkdir()
    for f in embedded_corpus_files()[:20]:
        shutil.copy(f, root / "src" / f.name)
    out = {}
    for name, fmt, comp in [("mds", "mds", None), ("zstd", "mds", "zstd"), ("wds", "wds", None)]:
        prepare(
            PrepareSettings(
                input=str(root / "src"),
                output=str(root / name),
                format=fmt,
                compression=comp,
                tokenizer=TOK,
                seq_len=SEQ,
                val_docs=2,
                shard_bytes=16 << 10,
                progress=False,
            )
        )
        out[name] = root / name
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_tokenizer_seq_len_and_vocab_mismatch_refused_at_start(prepared: dict[str, Path], fmt: str) -> None:
    path = str(prepared[fmt])
    with pytest.raises(
        ValueError,
        match=r"tokenizer 'bert-base-uncased' but the config asks for 'gpt2'.*"
        r"data\.tokenizer=bert-base-uncased.*--tokenizer gpt2",
    ):
        open_rows(path, "train", "gpt2", SEQ)
    with pytest.raises(ValueError, match=r"seq_len 32 but the config asks for 64.*model\.seq_len=32.*--seq-len 64"):
        open_rows(path, "train", TOK, 64)
    with pytest.raises(ValueError, match=r"vocabulary of 30522 ids but this tokenizer has 100"):
        open_rows(path, "train", TOK, SEQ, expect_vocab_size=100)
    with pytest.raises(ValueError, match="'gpt2'"):
        build_datasets(path, get_tokenizer("gpt2"), SEQ, val_docs=2, cache_dir=None)


def test_streamed_reader_refuses_mismatch_and_webdataset(prepared: dict[str, Path], tmp_path: Path) -> None:
    from data_pipeline.remote import StreamedDataError, open_streamed

    kw = dict(cache=str(tmp_path), rank=0, cache_limit=None, download_timeout=10, download_retry=0)
    with pytest.raises(ValueError, match="seq_len 32 but the config asks for 128"):
        open_streamed(str(prepared["mds"]), TOK, 128, 30522, **kw)
    with pytest.raises(StreamedDataError, match="holds wds shards; streaming reads MDS"):
        open_streamed(str(prepared["wds"]), TOK, SEQ, 30522, **kw)


@pytest.mark.parametrize("name", ["mds", "zstd"])
def test_local_folder_streamed_as_a_remote_equals_the_memory_map(
    prepared: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """data.stream_cache set on a local prepared folder: the folder is read as a remote through mosaicml-streaming
    (copied shard by shard into the cache, zstd decompressed there) and gives the rows the memory map gives."""
    from types import SimpleNamespace

    from data_pipeline.training_data import open_training_data

    d = SimpleNamespace(
        path=str(prepared[name]),
        stream_cache=str(tmp_path / "cache"),
        cache_limit=None,
        cache_dir=None,
        val_docs=2,
        verify_shards=True,
        shuffle="feistel",
        shuffle_window=2,
        download_timeout=10.0,
        download_retry=0,
    )
    train, val, info, stream = open_training_data(d, get_tokenizer(TOK), SEQ, seed=SEED)
    assert info["streamed_from"] == str(prepared[name]) and info["shuffle_window"] == 2
    local = open_rows(str(prepared["mds"]), "train", TOK, SEQ)
    want = ShuffledStream(local, seed=SEED, shuffle="feistel", window_shards=2)
    idx = np.arange(0, 3 * len(local), 5)
    np.testing.assert_array_equal(stream.get(idx).numpy(), want.get(idx).numpy())
    np.testing.assert_array_equal(
        val.rows(np.arange(len(val))), open_rows(str(prepared["mds"]), "val", TOK, SEQ).rows(np.arange(len(val)))
    )
    train.close()
    val.close()


def test_missing_and_corrupt_mds_shards_are_named(prepared: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(prepared["mds"], tmp_path)
    shard = root / "train" / "shard.00001.mds"
    data = shard.read_bytes()

    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard shard\.00001\.mds of the train split is missing"):
        open_rows(str(root), "train", TOK, SEQ)
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"shard shard\.00001\.mds of the train split is corrupt: .* bytes"):
        open_rows(str(root), "train", TOK, SEQ)
    shard.write_bytes(b"\xff\xff\x00\x00" + data[4:])  # same size, wrong sample count
    with pytest.raises(ValueError, match=r"shard\.00001\.mds is corrupt: its header"):  # checked without the hash too
        open_rows(str(root), "train", TOK, SEQ, verify=False)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # a token inside the last row: only the checksum can tell
    shard.write_bytes(bytes(flipped))
    assert len(open_rows(str(root), "train", TOK, SEQ, verify=False)) > 0
    with pytest.raises(ValueError, match=r"shard shard\.00001\.mds of the train split is corrupt: its xxh64"):
        open_rows(str(root), "train", TOK, SEQ)

    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset.*data_pipeline.prepare"):
        open_rows(str(root), "train", TOK, SEQ)


def test_corrupt_zstd_shard_is_named(prepared: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(prepared["zstd"], tmp_path)
    shard = root / "train" / "shard.00001.mds.zstd"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard shard\.00001\.mds\.zstd of the train split is corrupt: its xxh64"):
        open_rows(str(root), "train", TOK, SEQ, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"shard\.00001\.mds\.zstd is corrupt: its decompressed bytes"):
        open_rows(str(root), "train", TOK, SEQ, cache_dir=str(tmp_path / "cache"), verify=False)


def test_wds_index_is_rebuilt_and_corrupt_tar_is_named(prepared: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(prepared["wds"], tmp_path)
    want = open_rows(str(root), "train", TOK, SEQ)
    everything = want.rows(np.arange(len(want)))
    index = root / "train" / "shard-000001.idx.npy"
    index.unlink()
    rebuilt = open_rows(str(root), "train", TOK, SEQ)
    np.testing.assert_array_equal(rebuilt.rows(np.arange(len(rebuilt))), everything)
    assert index.is_file()  # cached again next to the shard

    index.write_bytes(b"not an index")  # a damaged index is rebuilt too
    np.testing.assert_array_equal(open_rows(str(root), "train", TOK, SEQ).rows(np.arange(len(want))), everything)

    # rows at a fixed stride are read as one strided view; any other member layout row by row, to the same rows
    offsets = np.load(index)
    pick = np.array([0, 2, 3, 7])
    irregular = _TarShard(root / "train" / "shard-000001.tar", offsets[pick], SEQ, np.dtype(np.uint16), "shard")
    regular = _TarShard(root / "train" / "shard-000001.tar", offsets, SEQ, np.dtype(np.uint16), "shard")
    assert irregular._strided is None and regular._strided is not None
    np.testing.assert_array_equal(irregular.take(np.arange(4)), regular.take(pick))
    np.testing.assert_array_equal(regular.take(pick), everything[want._starts[1] + pick])

    tar = root / "train" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[512 * 3 : 512 * 3 + 100] = b"x" * 100  # the second member's .npy header
    tar.write_bytes(bytes(data))
    index.unlink()
    with pytest.raises(ValueError, match=r"shard shard-000001\.tar of the train split is corrupt: its xxh64"):
        open_rows(str(root), "train", TOK, SEQ)
    with pytest.raises(ValueError, match=r"webdataset shard .*shard-000001\.tar is corrupt"):
        open_rows(str(root), "train", TOK, SEQ, verify=False)
    tar.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard shard-000001\.tar of the train split is missing"):
        open_rows(str(root), "train", TOK, SEQ)


def _mds_row_at(shard: Path, row: int) -> int:
    """Byte offset of a row's tokens in an MDS shard, from its header (uint32 count, then count+1 sample offsets)."""
    return int(np.frombuffer(shard.read_bytes(), dtype="<u4", count=row + 2)[row + 1])


def _set_manifest_hash(root: Path, split: str, file: str, key: str = "xxh64") -> None:
    """Make the manifest agree with the shard's current bytes, as a bad prepare or an edited manifest would."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(e for e in manifest["splits"][split]["shards"] if e["file"] == file)
    entry[key] = xxhash.xxh64((root / split / file).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_overwritten_shard_refused_at_open_unless_verification_is_off(
    prepared: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    """Same-size garbage inside a token row: the hash refuses the shard at open, naming it and both hashes; with
    verification off it opens, and the vocabulary guard refuses the row when it is read, naming shard and row."""
    root = _copy(prepared[fmt], tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    shard = root / "train" / entry["file"]
    if fmt == "mds":
        at = _mds_row_at(shard, 5)
    else:
        at = int(np.load(root / "train" / entry["file"].replace(".tar", ".idx.npy"))[5])
    data = bytearray(shard.read_bytes())
    data[at + 2 * 7 : at + 2 * 9] = b"\xff" * 4  # tokens 7 and 8 of in-shard row 5 become id 65535
    shard.write_bytes(bytes(data))
    actual = xxhash.xxh64(bytes(data)).hexdigest()
    assert actual != entry["xxh64"]

    name = re.escape(entry["file"])
    with pytest.raises(
        ValueError,
        match=rf"shard {name} of the train split is corrupt: its xxh64 is {actual}, the "
        rf"manifest says {entry['xxh64']} .*re-copy \(re-download\)",
    ):
        open_rows(str(root), "train", TOK, SEQ)
    with pytest.raises(ValueError, match=rf"shard {name} of the train split"):  # the trainer's switch, default on
        build_datasets(str(root), get_tokenizer(TOK), SEQ, val_docs=2, cache_dir=None)

    rows = open_rows(str(root), "train", TOK, SEQ, verify=False)  # the hash is not read
    first = manifest["splits"]["train"]["shards"][0]["rows"]
    good = np.r_[0 : first + 5, first + 6 : len(rows)]
    assert rows.rows(good).max() < 30522  # every other row still reads
    with pytest.raises(
        ValueError,
        match=rf"shard {name} of the train split \(.*\) row 5 holds token id 65535 at "
        r"position 7, outside the vocabulary \[0, 30522\)",
    ):
        rows.rows(np.array([3, first + 5]))


def test_out_of_vocabulary_id_behind_a_matching_hash_refused_at_open(prepared: dict[str, Path], tmp_path: Path) -> None:
    """Ids past the vocabulary in a shard whose manifest hash was recomputed: the scan at open names shard and row."""
    root = _copy(prepared["mds"], tmp_path)
    shard = root / "val" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    at = _mds_row_at(shard, 2) + 2 * 31  # the last token of row 2 of the val split
    data[at : at + 2] = (30522).to_bytes(2, "little")  # the first id past the BERT vocabulary
    shard.write_bytes(bytes(data))
    _set_manifest_hash(root, "val", shard.name)
    with pytest.raises(
        ValueError,
        match=r"shard shard\.00000\.mds of the val split \(.*\) row 2 holds token id "
        r"30522 at position 31, outside the vocabulary \[0, 30522\).*re-run "
        r"data_pipeline\.prepare",
    ):
        open_rows(str(root), "val", TOK, SEQ)
    val = open_rows(str(root), "val", TOK, SEQ, verify=False)  # no scan at open; the rows read are still checked
    assert val.rows(np.array([0, 1, 3])).shape == (3, SEQ)
    with pytest.raises(ValueError, match=r"row 2 holds token id 30522"):
        val.rows(np.arange(4))


def test_damaged_decompressed_cache_is_rebuilt_when_verifying(prepared: dict[str, Path], tmp_path: Path) -> None:
    """A zstd shard's cached raw copy is derived data: verification re-hashes it and rebuilds it if damaged."""
    cache = tmp_path / "cache"
    want = open_rows(str(prepared["zstd"]), "train", TOK, SEQ, cache_dir=str(cache))
    everything = want.rows(np.arange(len(want)))
    raw = sorted(cache.glob("*-shard.00000.mds"))[0]
    data = bytearray(raw.read_bytes())
    data[_mds_row_at(raw, 0) : _mds_row_at(raw, 0) + 2] = b"\xff\xff"
    raw.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=r"shard shard\.00000\.mds\.zstd of the train split .* row 0 holds token "
        r"id 65535 at position 0",
    ):
        open_rows(str(prepared["zstd"]), "train", TOK, SEQ, cache_dir=str(cache), verify=False).rows(np.arange(1))
    rebuilt = open_rows(str(prepared["zstd"]), "train", TOK, SEQ, cache_dir=str(cache))
    np.testing.assert_array_equal(rebuilt.rows(np.arange(len(rebuilt))), everything)
    assert raw.read_bytes() != bytes(data)


@pytest.mark.slow
def test_training_run_refuses_a_damaged_shard_in_one_line(
    prepared: dict[str, Path], tmp_path: Path, data_cache: str
) -> None:
    """launcher.train: a damaged shard is one `error:` line and exit 2 before any step; with data.verify_shards=false
    the run opens the shards and the vocabulary guard stops it at the first read of the bad row (the initial eval)."""
    from tests.test_train_e2e import run, tiny_args

    root = _copy(prepared["mds"], tmp_path)
    shard = root / "val" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[_mds_row_at(shard, 0) : _mds_row_at(shard, 0) + 2] = b"\xff\xff"
    shard.write_bytes(bytes(data))
    common = (f"data.path={root}", "train.max_steps=1", "sample.after_train=false")
    for verify, want in (
        (
            "true",
            r"shard shard\.00000\.mds of the val split is corrupt: its xxh64 is [0-9a-f]+, the "
            r"manifest says [0-9a-f]+",
        ),
        ("false", r"shard shard\.00000\.mds of the val split \(.*\) row 0 holds token id 65535"),
    ):
        out = run(tiny_args(tmp_path / verify, data_cache, *common, f"data.verify_shards={verify}"))
        assert out.returncode == 2, out.stderr[-3000:]
        assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
            out.stderr.strip().splitlines()[-1]
        ]
        assert re.search(want, out.stderr.strip().splitlines()[-1])
        assert not (tmp_path / verify / "ckpt").exists() or not any((tmp_path / verify / "ckpt").iterdir())


# ---------------------------------------------------------------- the trainer's path


def test_build_datasets_dispatches_on_the_manifest(prepared: dict[str, Path], tmp_path: Path) -> None:
    tok = get_tokenizer(TOK)
    train, val, info = build_datasets(str(prepared["mds"]), tok, SEQ, val_docs=99, cache_dir=None)
    assert isinstance(train, ShardRows) and isinstance(val, ShardRows)
    assert (info["train_rows"], info["val_rows"], info["val_docs"]) == (len(train), len(val), 2)
    assert info["prepared_format"] == "mds" and json.loads(json.dumps(info)) == info  # checkpoint metadata
    text_train, text_val, text_info = build_datasets(
        str(prepared["mds"].parent / "src"), tok, SEQ, val_docs=2, cache_dir=None
    )
    assert isinstance(text_train, InMemoryRows) and "prepared_format" not in text_info
    np.testing.assert_array_equal(train.rows(np.arange(len(train))), text_train.data)
    np.testing.assert_array_equal(val.rows(np.arange(len(val))), text_val.data)
    zstd_train = open_rows(str(prepared["zstd"]), "train", TOK, SEQ, cache_dir=str(tmp_path / "c"))
    wds_train = open_rows(str(prepared["wds"]), "train", TOK, SEQ)
    idx = np.random.default_rng(0).integers(0, len(train), 500)
    np.testing.assert_array_equal(zstd_train.rows(idx), train.rows(idx))
    np.testing.assert_array_equal(wds_train.rows(idx), train.rows(idx))


# A restarted process: it knows only the data path, the seed and the consumed-sample count of a checkpoint.
_RESTART = r"""
import json, sys
import numpy as np
from data_pipeline.dataset import ShuffledStream
from data_pipeline.readers import open_rows
a = json.loads(sys.argv[1])
out = {}
for fmt, kind, window in (("mds", "permutation", 0), ("wds", "permutation", 0), ("mds", "feistel", 2)):
    stream = ShuffledStream(open_rows(a[fmt], "train", a["tok"], a["seq"]), a["seed"], kind, window)
    out[f"{fmt}-{kind}"] = np.stack([stream.get(np.arange(s * a["G"], (s + 1) * a["G"])).numpy()
                         for s in range(a["resume_step"], a["end_step"])])
np.savez(a["out"], **out)
"""


def test_mid_epoch_resume_in_a_fresh_process_is_exact(prepared: dict[str, Path], tmp_path: Path) -> None:
    rows = open_rows(str(prepared["mds"]), "train", TOK, SEQ)
    steps_per_epoch = len(rows) // G
    resume_step, end_step = steps_per_epoch - 3, steps_per_epoch + 4  # resume mid-epoch, run past its end

    stream = ShuffledStream(rows, seed=SEED)
    global_batches = [stream.get(np.arange(s * G, (s + 1) * G)).numpy() for s in range(end_step)]
    keyed = ShuffledStream(rows, SEED, "feistel", window_shards=2)
    keyed_batches = [keyed.get(np.arange(s * G, (s + 1) * G)).numpy() for s in range(end_step)]
    args = {
        "mds": str(prepared["mds"]),
        "wds": str(prepared["wds"]),
        "tok": TOK,
        "seq": SEQ,
        "seed": SEED,
        "G": G,
        "resume_step": resume_step,
        "end_step": end_step,
        "out": str(tmp_path / "resumed.npz"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RESTART, json.dumps(args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(resumed["mds-permutation"], np.stack(global_batches[resume_step:]))
    np.testing.assert_array_equal(resumed["wds-permutation"], np.stack(global_batches[resume_step:]))
    np.testing.assert_array_equal(resumed["mds-feistel"], np.stack(keyed_batches[resume_step:]))
    for batches in (global_batches, keyed_batches):  # each epoch is reshuffled
        assert not np.array_equal(batches[0], batches[steps_per_epoch])


def _as_set(batch: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, batch.tolist()))


def test_global_index_dp2_union_equals_dp1(prepared: dict[str, Path]) -> None:
    from bd3_megatron.training.batches import sample_indices

    stream = ShuffledStream(open_rows(str(prepared["wds"]), "train", TOK, SEQ), seed=SEED)
    micro = 2
    for step in (0, 7, len(stream.dataset) // G):  # includes a step that straddles the epoch boundary
        dp1 = stream.get(np.arange(step * G, (step + 1) * G)).numpy()
        ranks = [
            np.concatenate(
                [stream.get(sample_indices(step, m, r, 2, micro, G)).numpy() for m in range(G // (2 * micro))]
            )
            for r in range(2)
        ]
        assert _as_set(np.concatenate(ranks)) == _as_set(dp1)
        assert not set(map(tuple, ranks[0].tolist())) & set(map(tuple, ranks[1].tolist()))
