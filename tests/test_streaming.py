"""Readers over prepared shards: refusal of mismatched or damaged shards, and exact mid-epoch resume.

Resume is checked against a restart in a fresh process, for the trainer's global-index path (the real
ShuffledStream over open_rows) and for the mosaicml-streaming reader, plus DP=2 against DP=1.
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
from data_pipeline.readers import ShardRows, StreamingReader, WebDatasetStream, _TarShard, build_datasets, open_rows
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


@pytest.fixture()
def clean_shm() -> None:
    """StreamingDataset keeps state in shared memory; drop leftovers of crashed runs."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()


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


def test_streaming_reader_refuses_mismatch(prepared: dict[str, Path], tmp_path: Path, clean_shm: None) -> None:
    with pytest.raises(ValueError, match="seq_len 32 but the config asks for 128"):
        StreamingReader(
            str(prepared["mds"]),
            "train",
            local=str(tmp_path / "c"),
            expect_tokenizer=TOK,
            expect_seq_len=128,
            global_batch_size=G,
            seed=SEED,
        )
    with pytest.raises(ValueError, match="reads MDS shards"):
        StreamingReader(
            str(prepared["wds"]),
            "train",
            local=str(tmp_path / "c2"),
            expect_tokenizer=TOK,
            expect_seq_len=SEQ,
            global_batch_size=G,
            seed=SEED,
        )
    with pytest.raises(ValueError, match="multiple of dp=3"):
        StreamingReader(
            str(prepared["mds"]),
            "train",
            local=str(tmp_path / "c3"),
            expect_tokenizer=TOK,
            expect_seq_len=SEQ,
            global_batch_size=G,
            seed=SEED,
            dp=3,
        )
    with pytest.raises(ValueError, match="num_canonical_nodes=2 must be a multiple of dp=4"):
        StreamingReader(
            str(prepared["mds"]),
            "train",
            local=str(tmp_path / "c4"),
            expect_tokenizer=TOK,
            expect_seq_len=SEQ,
            global_batch_size=G,
            seed=SEED,
            dp=4,
            num_canonical_nodes=2,
        )


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
from data_pipeline.readers import StreamingReader, open_rows
a = json.loads(sys.argv[1])
out = {}
for fmt in ("mds", "wds"):
    stream = ShuffledStream(open_rows(a[fmt], "train", a["tok"], a["seq"]), seed=a["seed"])
    out[fmt] = np.stack([stream.get(np.arange(s * a["G"], (s + 1) * a["G"])).numpy()
                         for s in range(a["resume_step"], a["end_step"])])
reader = StreamingReader(a["mds"], "train", local=a["local"], expect_tokenizer=a["tok"], expect_seq_len=a["seq"],
                         global_batch_size=a["G"], seed=a["seed"], num_canonical_nodes=2)
reader.load_state_dict(a["state"])
out["streaming"] = np.stack([reader.next_batch() for _ in range(a["resume_step"], a["end_step"])])
np.savez(a["out"], **out)
"""


def test_mid_epoch_resume_in_a_fresh_process_is_exact(
    prepared: dict[str, Path], tmp_path: Path, clean_shm: None
) -> None:
    rows = open_rows(str(prepared["mds"]), "train", TOK, SEQ)
    steps_per_epoch = len(rows) // G
    resume_step, end_step = steps_per_epoch - 3, steps_per_epoch + 4  # resume mid-epoch, run past its end

    stream = ShuffledStream(rows, seed=SEED)
    global_batches = [stream.get(np.arange(s * G, (s + 1) * G)).numpy() for s in range(end_step)]
    reader = StreamingReader(
        str(prepared["mds"]),
        "train",
        local=str(tmp_path / "ref"),
        expect_tokenizer=TOK,
        expect_seq_len=SEQ,
        global_batch_size=G,
        seed=SEED,
        num_canonical_nodes=2,
    )
    assert reader.steps_per_epoch == steps_per_epoch
    streamed, state = [], None
    for step in range(end_step):
        if step == resume_step:
            state = json.loads(json.dumps(reader.state_dict()))  # what a checkpoint stores
        streamed.append(reader.next_batch())
    assert state["consumed_samples"] == resume_step * G and reader.epoch == 1

    args = {
        "mds": str(prepared["mds"]),
        "wds": str(prepared["wds"]),
        "tok": TOK,
        "seq": SEQ,
        "seed": SEED,
        "G": G,
        "resume_step": resume_step,
        "end_step": end_step,
        "state": state,
        "local": str(tmp_path / "restart"),
        "out": str(tmp_path / "resumed.npz"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RESTART, json.dumps(args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(resumed["mds"], np.stack(global_batches[resume_step:]))
    np.testing.assert_array_equal(resumed["wds"], np.stack(global_batches[resume_step:]))
    np.testing.assert_array_equal(resumed["streaming"], np.stack(streamed[resume_step:]))
    assert not np.array_equal(streamed[0], streamed[steps_per_epoch])  # each epoch is reshuffled


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


def test_streaming_reader_dp2_union_equals_dp1_and_resumes_elastically(
    prepared: dict[str, Path], tmp_path: Path, clean_shm: None
) -> None:
    kw = dict(expect_tokenizer=TOK, expect_seq_len=SEQ, global_batch_size=G, seed=SEED, num_canonical_nodes=2)
    path = str(prepared["mds"])
    one = StreamingReader(path, "val", local=str(tmp_path / "one"), **kw)
    steps = one.steps_per_epoch + 5  # val is small: this crosses an epoch
    ref = [one.next_batch() for _ in range(steps)]
    two = [StreamingReader(path, "val", local=str(tmp_path / f"two{r}"), dp_rank=r, dp=2, **kw) for r in range(2)]
    for step in range(steps):
        a, b = two[0].next_batch(), two[1].next_batch()
        assert a.shape == (G // 2, SEQ)
        assert _as_set(np.concatenate([a, b])) == _as_set(ref[step]), step
    assert two[0].state_dict()["consumed_samples"] == one.state_dict()["consumed_samples"] == steps * G

    # A DP=1 checkpoint taken mid-epoch, resumed with DP=2: the next global batches are unchanged.
    src = StreamingReader(path, "val", local=str(tmp_path / "src"), **kw)
    for _ in range(4):
        src.next_batch()
    state = src.state_dict()
    resumed = [StreamingReader(path, "val", local=str(tmp_path / f"res{r}"), dp_rank=r, dp=2, **kw) for r in range(2)]
    for reader in resumed:
        reader.load_state_dict(state)
    for step in range(4, 10):
        assert _as_set(np.concatenate([r.next_batch() for r in resumed])) == _as_set(ref[step]), step

    with pytest.raises(ValueError, match="global_batch_size=8 but this reader has 16"):
        StreamingReader(path, "val", local=str(tmp_path / "bad"), **{**kw, "global_batch_size": 16}).load_state_dict(
            state
        )
    val = open_rows(path, "val", TOK, SEQ)
    assert set(map(tuple, np.concatenate(ref).tolist())) <= set(map(tuple, val.rows(np.arange(len(val))).tolist()))


def test_webdataset_stream_resume_policy(prepared: dict[str, Path]) -> None:
    path = str(prepared["wds"])
    kw = dict(expect_tokenizer=TOK, expect_seq_len=SEQ, seed=SEED, shuffle_buffer=64)
    split_rows = open_rows(path, "val", TOK, SEQ)
    known = set(map(tuple, split_rows.rows(np.arange(len(split_rows))).tolist()))

    first = WebDatasetStream(path, "val", **kw)
    before = first.next_batch(3 * len(split_rows))  # resampled: no epoch edge, it just keeps going
    assert set(map(tuple, before.tolist())) <= known
    state = first.state_dict()
    assert state["consumed"] == 3 * len(split_rows)

    restarts = []
    for _ in range(2):  # two restarts from the same checkpoint read the same rows
        stream = WebDatasetStream(path, "val", **kw)
        stream.load_state_dict(state)
        restarts.append(stream.next_batch(40))
    np.testing.assert_array_equal(restarts[0], restarts[1])
    assert set(map(tuple, restarts[0].tolist())) <= known
    np.testing.assert_array_equal(WebDatasetStream(path, "val", **kw).next_batch(40), before[:40])  # seeded start
    other_rank = WebDatasetStream(path, "val", dp_rank=1, dp=2, **kw).next_batch(40)
    assert not np.array_equal(other_rank, before[:40])
    with pytest.raises(ValueError, match="seed/dp_rank/dp"):
        WebDatasetStream(path, "val", dp_rank=1, dp=2, **kw).load_state_dict(state)
