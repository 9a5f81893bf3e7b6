"""Data pipeline throughput: preparation tokens/s (1 and 2 workers) and reader samples/s, with a 128-GPU estimate.

    python bench/data_prepare.py [--input embedded:sotu] [--tokenizer gpt2] [--seq-len 1024] [--batch 16]

Prepares the input as MDS with 1 and 2 tokenizer workers (and webdataset with the most workers), then
times one reader process on the prepared train split:
  - global-index path (what the trainer uses): ShuffledStream(open_rows(...)).get(batch of indices), MDS and
    webdataset, i.e. a random gather of `--batch` rows per call through np.memmap;
  - mosaicml-streaming's StreamingDataset random access (ds[i]) on the same shards, the alternative to memmap.
Streaming from object storage (a local S3 server, cold and warm cache): bench/data_stream.py.
The estimate: 128 GPUs at 90K tokens/s/GPU (DESIGN.md §8 baseline) need 128*90K/seq_len samples/s; one
reader process per GPU rank (the trainer reads synchronously in each rank) must deliver 90K/seq_len.
Shards sit in the page cache after preparation, so these are CPU-bound figures, not disk or network ones.
"1 worker" is one tokenizer process, but tiktoken and HF tokenizers batch-encode with several threads, so it
already uses more than one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streaming  # noqa: E402,F401  imported up front: its ~2 s import would land in the first timed prepare

from data_pipeline.dataset import ShuffledStream  # noqa: E402
from data_pipeline.prepare import PrepareSettings, prepare  # noqa: E402
from data_pipeline.readers import open_rows  # noqa: E402

GPUS = 128
TOKENS_PER_GPU = 90_000


def _prep(args: argparse.Namespace, out: Path, fmt: str, workers: int) -> dict:
    manifest = prepare(
        PrepareSettings(
            input=args.input,
            output=str(out),
            format=fmt,
            tokenizer=args.tokenizer,
            seq_len=args.seq_len,
            val_docs=args.val_docs,
            workers=workers,
            progress=False,
            overwrite=True,
        )
    )
    b = manifest["build"]
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    print(
        f"prepare {fmt:3s} workers={workers}: {tokens:,} tokens in {b['seconds']:.2f} s = "
        f"{b['tokens_per_second']:,.0f} tokens/s"
    )
    return manifest


def _timed(fn, seconds: float) -> tuple[int, float]:
    """Calls fn() repeatedly for about `seconds`; returns (calls, elapsed)."""
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - start


def _report(name: str, samples: int, elapsed: float, seq_len: int) -> float:
    rate = samples / elapsed
    per_gpu = TOKENS_PER_GPU / seq_len
    print(
        f"read {name:34s}: {rate:10,.0f} samples/s = {rate * seq_len / 1e6:7.2f} M tokens/s; "
        f"one process feeds {rate / per_gpu:6.1f} GPUs at {TOKENS_PER_GPU // 1000}K tokens/s"
    )
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="embedded:sotu")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--val-docs", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="rows per read call (a micro-batch)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per read measurement")
    p.add_argument("--repeats", type=int, default=3, help="preparation runs per worker count")
    args = p.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# {platform.node()} | {os.cpu_count()} CPUs | load average {load} | python {platform.python_version()} | "
        f"input {args.input} | {args.tokenizer} L={args.seq_len}"
    )

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        rates: dict[int, float] = {}
        for _ in range(args.repeats):  # alternate so page cache and machine load hit both alike; keep the best
            for workers in (1, 2):
                m = _prep(args, work / f"mds{workers}", "mds", workers)
                rates[workers] = max(rates.get(workers, 0.0), m["build"]["tokens_per_second"])
        _prep(args, work / "wds", "wds", 2)
        print(
            f"prepare best of {args.repeats}: 1 worker {rates[1]:,.0f} tokens/s, 2 workers {rates[2]:,.0f} "
            f"tokens/s ({rates[2] / rates[1]:.2f}x); 9B tokens (OpenWebText's size) at the better rate: "
            f"{9e9 / max(rates.values()) / 3600:.1f} h on this box"
        )

        L, B = args.seq_len, args.batch
        rng = np.random.default_rng(0)
        results = {}
        for fmt, folder in (("mds", work / "mds2"), ("wds", work / "wds")):
            stream = ShuffledStream(open_rows(str(folder), "train", args.tokenizer, L), seed=1)
            start = [0]

            def read(stream=stream, start=start) -> None:  # bound now: called within this iteration
                stream.get(np.arange(start[0], start[0] + B))
                start[0] += B

            calls, elapsed = _timed(read, args.seconds)
            results[f"global-index {fmt} memmap"] = _report(
                f"global-index {fmt} (memmap, batch {B})", calls * B, elapsed, L
            )

        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = StreamingDataset(local=str(work / "mds2"), split="train", batch_size=B)
        n = ds.num_samples

        def getitem(ds=ds) -> None:
            for i in rng.integers(0, n, B):
                ds[int(i)]

        calls, elapsed = _timed(getitem, args.seconds)
        results["StreamingDataset ds[i]"] = _report("StreamingDataset ds[i] (random)", calls * B, elapsed, L)
        del ds, getitem  # release the dataset's shared memory

        need = GPUS * TOKENS_PER_GPU / L
        print(
            f"128 GPUs x {TOKENS_PER_GPU:,} tokens/s at L={L} need {need:,.0f} samples/s "
            f"({need / GPUS:,.0f} per GPU rank); reader processes needed at the measured rates:"
        )
        for name, rate in results.items():
            print(
                f"  {name:28s}: {int(np.ceil(need / rate)):4d} in total, "
                f"{need / GPUS / rate * 100:6.2f}% of one core per GPU rank"
            )
        print(json.dumps({"prepare_tokens_per_s": rates, "read_samples_per_s": results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
