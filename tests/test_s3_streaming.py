"""Training from object storage: a real S3-compatible server (moto's standalone server) on 127.0.0.1, a prepared
folder uploaded with boto3, rows streamed through mosaicml-streaming (data_pipeline.remote) under a cache limit.

The server runs in this process (moto.server.ThreadedMotoServer, a werkzeug HTTP server on a free loopback port);
training runs are subprocesses that reach it through S3_ENDPOINT_URL, as a cluster job reaches a bucket.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards as shard_files
from data_pipeline.corpus import source_files
from data_pipeline.dataset import ShuffledStream
from data_pipeline.readers import open_rows
from data_pipeline.remote import StreamedDataError, open_streamed
from tests.test_train_e2e import kill_after_checkpoint, metrics, tiny_args

ROOT = Path(__file__).resolve().parents[1]
TOK, SEQ, VOCAB = "bert-base-uncased", 32, 30522
BUCKET = "bd3-data"
SHARD_BYTES = 1 << 14  # 16 KiB shards of ~250 rows of 32 tokens
LIMIT = 8 * SHARD_BYTES  # the cache limit of the tests: 128 KiB, under a third of the 476 KB train split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket holding a prepared folder at s3://bd3-data/sotu; yields
    (endpoint, local prepared folder, boto3 client). The AWS_* / S3_ENDPOINT_URL variables are set for the module."""
    import boto3
    from moto.server import ThreadedMotoServer

    from data_pipeline.prepare import PrepareSettings, prepare

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    texts = tmp_path_factory.mktemp("texts")
    for path in source_files("embedded:sotu")[150:190]:  # 40 speeches: 6,916 rows of 32 tokens in 30 train shards
        shutil.copy(path, texts / path.name)
    folder = tmp_path_factory.mktemp("prepared") / "sotu"
    settings = dict(input=str(texts), tokenizer=TOK, seq_len=SEQ, val_docs=8, workers=1, progress=False)
    prepare(PrepareSettings(output=str(folder), shard_bytes=SHARD_BYTES, **settings))
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    upload(client, folder, "sotu")
    try:
        yield env["S3_ENDPOINT_URL"], folder, client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(client, folder: Path, prefix: str, skip: str | None = None, truncate: str | None = None) -> str:
    """Upload a prepared folder to s3://BUCKET/prefix (optionally without one file, or with one file cut in half)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.startswith(".") or rel == skip:
            continue
        body = path.read_bytes()
        if rel == truncate:
            body = body[: len(body) // 2]
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)
    return f"s3://{BUCKET}/{prefix}"


def _open(tmp: Path, url: str, rank: int = 0, limit: int | None = LIMIT, retry: int = 1):
    return open_streamed(
        url, TOK, SEQ, VOCAB, cache=str(tmp), rank=rank, cache_limit=limit, download_timeout=10, download_retry=retry
    )


def _cached_shards(rows) -> set[str]:
    folder = Path(rows._ds.streams[0].local) / rows.split
    return {p.name for p in folder.glob("shard.*.mds")}


def test_streamed_rows_equal_the_local_rows_under_a_cache_limit_with_eviction(s3, tmp_path):
    """Rows streamed from S3 under a 128 KiB cache limit (under a third of the train split) are the rows the
    memory-mapped local folder holds, step after step through the windowed shuffle; the cache never exceeds the limit,
    shards are evicted."""
    _, folder, _ = s3
    train, val, info = _open(tmp_path, f"s3://{BUCKET}/sotu")
    local = open_rows(str(folder), "train", TOK, SEQ)
    assert len(train) == len(local) and train.num_shards == local.num_shards > 20
    assert info["streamed_from"] == f"s3://{BUCKET}/sotu" and info["documents_sha256"]
    remote_stream = ShuffledStream(train, seed=1, shuffle="feistel", window_shards=2)
    local_stream = ShuffledStream(local, seed=1, shuffle="feistel", window_shards=2)
    G = 64
    usage = []
    for step in range(0, 120, 3):  # ~2.7 epochs of windows sampled: every shard is fetched, most more than once
        idx = np.arange(step * G, (step + 1) * G) * 7  # spread over the epoch
        np.testing.assert_array_equal(remote_stream.get(idx).numpy(), local_stream.get(idx).numpy())
        usage.append(train.cache_usage())
    assert max(usage) <= LIMIT
    assert train.downloads > train.num_shards  # evicted shards were fetched again
    assert len(_cached_shards(train)) < train.num_shards
    np.testing.assert_array_equal(val.rows(np.arange(50)), open_rows(str(folder), "val", TOK, SEQ).rows(np.arange(50)))
    train.close()
    val.close()


def test_the_next_window_is_prefetched_before_it_is_read(s3, tmp_path):
    """Reading the first rows of a window queues the shards of that window and of the next one: they arrive on the
    prefetch threads without being read. A fresh cache, so the check is about the prefetch alone (the cache-limit
    test above exercises eviction; with both at once, a shard prefetched early can be the LRU victim of a later one)."""
    train, val, _ = _open(tmp_path, f"s3://{BUCKET}/sotu")
    stream = ShuffledStream(train, seed=1, shuffle="feistel", window_shards=2)
    first, second = stream._keyed.window_shard_ids(*stream._keyed.locate(0)), stream.upcoming_shards(0)
    unread = np.setdiff1d(second, first)
    assert unread.size and not any(train.is_local(int(s)) for s in second)
    stream.get(np.arange(4))
    deadline = time.time() + 60
    while not all(train.is_local(int(s)) for s in second) and time.time() < deadline:
        time.sleep(0.05)
    assert all(train.is_local(int(s)) for s in unread), "the next window's shards were not prefetched"
    train.close()
    val.close()


def test_dp_layouts_and_a_resume_read_the_same_sample_stream(s3, tmp_path):
    """Global sample indices are the contract: DP=2 ranks (each its own reader and cache) together read the DP=1
    batch of every step, and a reader opened fresh at step 5 (a resumed run, another DP size) continues it."""
    from bd3_megatron.training.batches import sample_indices

    url = f"s3://{BUCKET}/sotu"
    one = ShuffledStream(_open(tmp_path / "dp1", url)[0], seed=3, shuffle="feistel", window_shards=3)
    ranks = [ShuffledStream(_open(tmp_path / "dp2", url, rank=r)[0], 3, "feistel", 3) for r in range(2)]
    mb, G = 4, 16
    for step in range(3):
        want = np.concatenate([one.get(sample_indices(step, m, 0, 1, mb, G)).numpy() for m in range(G // mb)])
        got = {}
        for r, stream in enumerate(ranks):
            for m in range(G // (mb * 2)):
                idx = sample_indices(step, m, r, 2, mb, G)
                got[int(idx[0])] = stream.get(idx).numpy()
        np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(got)]), want)
    resumed = ShuffledStream(_open(tmp_path / "resumed", url, rank=1)[0], seed=3, shuffle="feistel", window_shards=3)
    idx = np.arange(5 * G, 9 * G)
    np.testing.assert_array_equal(resumed.get(idx).numpy(), one.get(idx).numpy())


def test_truncated_or_missing_remote_shard_is_one_clear_error_and_leaves_no_bytes(s3, tmp_path):
    _, folder, client = s3
    entry = shard_files.load_manifest(folder)["splits"]["train"]["shards"][3]
    name = f"train/{entry['file']}"
    cut = upload(client, folder, "cut", truncate=name)
    train = _open(tmp_path / "cut", cut)[0]
    row = int(train._ds.sample_offset_per_shard[3])
    with pytest.raises(StreamedDataError) as err:
        train.rows(np.array([row]))
    msg = str(err.value)
    assert f"shard {entry['file']} of the train split ({cut}/{name})" in msg and "xxh64" in msg
    assert entry["file"] not in _cached_shards(train) and not train.is_local(3)
    assert train.rows(np.array([0])).shape == (1, SEQ)  # the other shards still read
    gone = upload(client, folder, "gone", skip=name)
    train = _open(tmp_path / "gone", gone)[0]
    with pytest.raises(StreamedDataError, match=f"{entry['file']} .*missing on the remote"):
        train.rows(np.array([row]))
    assert not list((Path(train._ds.streams[0].local) / "train").glob(f"{entry['file']}*"))


def test_cache_limit_checks(s3, tmp_path):
    """Limits that cannot work are refused at start: below six shards (streaming's four plus two in flight), below
    the train split with a global shuffle, below two shuffle windows."""
    from types import SimpleNamespace

    from data_pipeline.tokenizers import get_tokenizer
    from data_pipeline.training_data import open_training_data

    with pytest.raises(StreamedDataError, match=r"data.cache_limit=.*too small.* >= \d+; raise data.cache_limit"):
        _open(tmp_path, f"s3://{BUCKET}/sotu", limit=5 * SHARD_BYTES)
    d = SimpleNamespace(
        path=f"s3://{BUCKET}/sotu",
        stream_cache=str(tmp_path),
        cache_dir=None,
        cache_limit="128kib",
        shuffle="feistel",
        shuffle_window=0,
        download_timeout=10.0,
        download_retry=0,
    )
    with pytest.raises(ValueError, match="data.shuffle_window=0 shuffles over all 30 shards"):
        open_training_data(d, get_tokenizer(TOK), SEQ, seed=1)
    d.shuffle_window = 4
    with pytest.raises(ValueError, match="cannot hold two shuffle windows of data.shuffle_window=4 shards"):
        open_training_data(d, get_tokenizer(TOK), SEQ, seed=1)
    d.shuffle_window = 2
    assert open_training_data(d, get_tokenizer(TOK), SEQ, seed=1)[2]["shuffle_window"] == 2


# ---------------------------------------------------------------- training runs (subprocesses)


def _run(args: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full)


def _stream_args(tmp: Path, cache: str, url: str, *extra: str) -> list[str]:
    return tiny_args(
        tmp,
        cache,
        f"data.path={url}",
        f"data.stream_cache={tmp / 'stream'}",
        f"data.cache_limit={LIMIT}",
        "data.shuffle_window=2",
        "data.download_timeout=10",
        "data.download_retry=1",
        "train.eval_interval=0",
        "sample.after_train=false",
        *extra,
    )


@pytest.mark.slow
def test_training_from_s3_with_eviction_equals_local_and_resumes_bit_identical_after_sigkill(s3, tmp_path, data_cache):
    """Training from s3:// under a cache limit under a third of the data gives the same losses as training on the local
    prepared folder (eviction does not change the run); SIGKILL at step 5 and resume gives the same steps 6..10."""
    _, folder, _ = s3
    url = f"s3://{BUCKET}/sotu"
    common = ("train.max_steps=10", "checkpoint.interval=5", "model.dropout=0.1", "train.global_batch_size=64")
    ref = _run(_stream_args(tmp_path / "ref", data_cache, url, *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = metrics(tmp_path / "ref/log")
    cache = tmp_path / "ref/stream"
    assert sum(p.stat().st_size for p in cache.rglob("shard.*.mds")) <= 2 * LIMIT  # train + val caches
    local = _run(
        tiny_args(
            tmp_path / "local",
            data_cache,
            f"data.path={folder}",
            "data.shuffle_window=2",
            "train.eval_interval=0",
            "sample.after_train=false",
            *common,
        )
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert [metrics(tmp_path / "local/log")[s]["loss"] for s in range(1, 11)] == [want[s]["loss"] for s in range(1, 11)]
    killed = tmp_path / "killed"
    kill_after_checkpoint(_stream_args(killed, data_cache, url, *common), step=5)
    resumed = _run(_stream_args(killed, data_cache, url, *common))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    got = metrics(killed / "log")
    assert [got[s]["loss"] for s in range(6, 11)] == [want[s]["loss"] for s in range(6, 11)]
    # the resumed run may not switch the data order
    other = _run(_stream_args(killed, data_cache, url, *common, "data.shuffle_window=3", "train.max_steps=12"))
    assert other.returncode == 2
    assert "data.shuffle_window=2 but this run has data.shuffle_window=3" in other.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_training_stops_with_one_error_for_a_missing_shard_or_an_unreachable_server(s3, tmp_path, data_cache):
    _, folder, client = s3
    # the shard holding the first row step 0 reads (seed 1, feistel, windows of 2 shards)
    local = open_rows(str(folder), "train", TOK, SEQ)
    row = int(ShuffledStream(local, seed=1, shuffle="feistel", window_shards=2).row_indices(np.array([0]))[0])
    shard = int(np.searchsorted(np.cumsum(local.shard_rows), row, side="right"))
    entry = shard_files.load_manifest(folder)["splits"]["train"]["shards"][shard]
    url = upload(client, folder, "holey", skip=f"train/{entry['file']}")
    proc = _run(_stream_args(tmp_path / "holey", data_cache, url, "train.max_steps=3", "checkpoint.interval=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: shard {entry['file']} of the train split ({url}/train/{entry['file']})"), last
    assert "missing on the remote" in last
    assert not (tmp_path / "holey/ckpt").exists() or not any((tmp_path / "holey/ckpt").glob("step_*"))
    # nothing answers on the endpoint: retries, then one error naming the manifest URL
    start = time.time()
    down = _run(
        _stream_args(tmp_path / "down", data_cache, f"s3://{BUCKET}/sotu", "train.max_steps=1"),
        S3_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}",
    )
    assert down.returncode == 2
    last = down.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot read the prepared dataset's manifest s3://{BUCKET}/sotu/manifest.json "), (
        last
    )
    assert "after 2 attempts" in last and "S3_ENDPOINT_URL" in last
    assert time.time() - start < 120


@pytest.mark.slow
def test_two_ranks_stream_and_resume_a_one_rank_run_at_dp2(s3, tmp_path, data_cache):
    """torchrun with 2 ranks (DP=2) on one machine: each rank registers its own stream cache with mosaicml-streaming
    (no clash of their shared memory), and the job resumes the DP=1 run's step-4 checkpoint (checkpoint.reshard) and
    continues its sample stream at sample 4 x G (the rows themselves: test_dp_layouts_and_a_resume_...)."""
    url = f"s3://{BUCKET}/sotu"
    common = ("checkpoint.interval=4", "train.global_batch_size=16")
    one = _run(_stream_args(tmp_path, data_cache, url, "train.max_steps=4", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    args = _stream_args(tmp_path, data_cache, url, "train.max_steps=6", "checkpoint.reshard=true", *common)
    two = _run([*torchrun, str(_free_port()), "-m", "launcher.train", *args[3:]], timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resumed from" in two.stdout and "dp=2" in two.stdout
    recs = metrics(tmp_path / "log")
    assert {5, 6} <= set(recs)
    assert sorted(p.name for p in (tmp_path / "stream").glob("*/rank*")) == ["rank0", "rank1"]
