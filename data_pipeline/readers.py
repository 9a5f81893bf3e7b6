"""Readers for prepared shards: random access for the trainer, streaming for remote data.

1. ``open_rows`` / ``build_datasets`` (the trainer's path). ``ShardRows`` is a ``TokenRows`` over the MDS or
   webdataset shards of one split, read zero-copy through np.memmap: the trainer keeps asking
   ``ShuffledStream(rows, seed).get(global_indices)``, so every parallel layout sees the same data and a
   resume at consumed sample i is exact by construction. Zstd MDS shards are decompressed once into a
   content-addressed cache; webdataset shards are addressed through a cached member-offset index.
2. ``StreamingReader``: mosaicml-streaming's StreamingDataset over a local or remote (s3://, gs://, ...)
   copy of the MDS shards, for when the data cannot sit on a local/shared disk. Deterministic shuffle,
   ``state_dict``/``load_state_dict`` that continue with exactly the next samples, elastic over the
   data-parallel size (the union of the ranks' samples at each global step equals the DP=1 batch).
3. ``WebDatasetStream``: webdataset tar shards resampled with replacement (``resampled=True`` style); its
   resume policy is documented on the class: deterministic, but a fresh draw, not a replay.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_pipeline import shards
from data_pipeline.dataset import InMemoryRows, build_text_datasets
from data_pipeline.tokenizers import Tokenizer

_MDS_HEADER = np.dtype("<u4")


# ---------------------------------------------------------------- random access (trainer path)


class _Shard(Protocol):
    rows: int
    name: str  # for messages: "shard FILE of the SPLIT split (PATH)"

    def take(self, local: np.ndarray) -> np.ndarray:
        """Rows at these in-shard indices, [n, seq_len] in the stored dtype."""
        ...


class _MemmapShard:
    """An MDS shard: header (count, offsets, config), then fixed-size rows back to back."""

    def __init__(self, path: Path, rows: int, seq_len: int, dtype: np.dtype, name: str) -> None:
        self.name = name
        row_bytes = seq_len * dtype.itemsize
        size = path.stat().st_size
        header = np.memmap(path, dtype=_MDS_HEADER, mode="r", shape=(rows + 2,)) if size >= 4 * (rows + 2) else None
        if header is None or int(header[0]) != rows:
            raise ValueError(
                f"MDS shard {path} is corrupt: its header does not hold {rows} samples; "
                "re-copy the prepared dataset or re-run data_pipeline.prepare"
            )
        offsets = np.asarray(header[1 : rows + 2], dtype=np.int64)
        expect = offsets[0] + row_bytes * np.arange(rows + 1, dtype=np.int64)
        if not np.array_equal(offsets, expect) or offsets[-1] != size:
            raise ValueError(
                f"MDS shard {path} is corrupt: sample offsets are not {row_bytes}-byte rows; "
                "re-copy the prepared dataset or re-run data_pipeline.prepare"
            )
        self.rows = rows
        self._data = np.memmap(path, dtype=dtype, mode="r", offset=int(offsets[0]), shape=(rows, seq_len))

    def take(self, local: np.ndarray) -> np.ndarray:
        return self._data[local]


class _TarShard:
    """A webdataset tar shard: rows at the byte offsets of its member index.

    The tars data_pipeline.prepare writes have equal-size members, so the rows sit at a fixed stride: they are then
    read as one strided [rows, seq_len] view of the memory map (a vectorised gather; any other member layout is
    copied row by row in Python, which made the vocabulary scan at open the slow part)."""

    def __init__(self, path: Path, offsets: np.ndarray, seq_len: int, dtype: np.dtype, name: str) -> None:
        self.name = name
        self.rows = len(offsets)
        self._bytes = np.memmap(path, dtype=np.uint8, mode="r")
        self._offsets = offsets
        self._seq_len, self._dtype = seq_len, dtype
        self._row_bytes = seq_len * dtype.itemsize
        stride = int(offsets[1] - offsets[0]) if self.rows > 1 else self._row_bytes
        self._strided = None
        if (
            self.rows
            and stride >= self._row_bytes
            and np.array_equal(offsets, offsets[0] + stride * np.arange(self.rows))
        ):
            self._strided = np.ndarray(
                (self.rows, seq_len),
                dtype=dtype,
                buffer=self._bytes,
                offset=int(offsets[0]),
                strides=(stride, dtype.itemsize),
            )

    def take(self, local: np.ndarray) -> np.ndarray:
        if self._strided is not None:
            return self._strided[local]
        out = np.empty((len(local), self._seq_len), dtype=self._dtype)
        flat = out.view(np.uint8).reshape(len(local), self._row_bytes)
        for i, at in enumerate(self._offsets[local]):
            flat[i] = self._bytes[at : at + self._row_bytes]
        return out


class ShardRows:
    """TokenRows over one split of a prepared dataset (any mix of shard sizes), int64 rows by global index."""

    def __init__(
        self,
        shard_list: list[_Shard],
        seq_len: int,
        name: str,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self._shards = shard_list
        self.seq_len: int = seq_len
        self.name = name
        self.pad_token_id = pad_token_id  # set for --pad data (see data_pipeline.dataset.padding_mask)
        self.vocab_size = vocab_size  # rows holding an id outside [0, vocab_size) are refused (None: not checked)
        self._starts = np.cumsum([0] + [s.rows for s in shard_list], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def shard_rows(self) -> np.ndarray:
        """Rows of each shard in stored order, int64 [num_shards] (the shuffle windows group whole shards)."""
        return np.diff(self._starts)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"row indices must lie in [0, {len(self)}); got min {idx.min()}, max {idx.max()}")
        out = np.empty((idx.size, self.seq_len), dtype=np.int64)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            local = idx[sel] - self._starts[s]
            got = self._shards[s].take(local)
            # The last guard before the model: a few microseconds per micro-batch (min/max of the rows just copied),
            # so it stays on when data.verify_shards=false skips the whole-shard checks at open.
            check_token_range(got, local, self.vocab_size, self._shards[s].name)
            out[sel] = got
        return out


_SCAN_BYTES = 1 << 24  # bytes per chunk of the vocabulary scan at open: bounded memory for any shard size


def check_token_range(rows: np.ndarray, local: np.ndarray, vocab_size: int | None, where: str) -> None:
    """Refuse token ids outside [0, vocab_size): ValueError naming the shard, the first bad row and its id.

    rows: [n, seq_len] integer, the rows at in-shard indices local [n]; where: "shard FILE of the SPLIT split (PATH)".
    Such an id is garbage, never a token: left in, it would index the embedding table's padding rows or past it.
    """
    if vocab_size is None or rows.size == 0 or (int(rows.min()) >= 0 and int(rows.max()) < vocab_size):
        return
    bad = (rows < 0) | (rows >= vocab_size)
    r, c = np.argwhere(bad)[0]
    raise ValueError(
        f"{where} row {int(local[r])} holds token id {int(rows[r, c])} at position {int(c)}, outside the vocabulary "
        f"[0, {vocab_size}); the shard is damaged or was not made by data_pipeline.prepare for this tokenizer: "
        "re-copy (re-download) the prepared dataset or re-run data_pipeline.prepare"
    )


def _scan_token_range(shard: _Shard, seq_len: int, itemsize: int, vocab_size: int) -> None:
    """check_token_range over every row of a shard, in chunks of about 16 MiB (one read of the mapped rows)."""
    step = max(1, _SCAN_BYTES // (seq_len * itemsize))
    for start in range(0, shard.rows, step):
        local = np.arange(start, min(start + step, shard.rows))
        check_token_range(shard.take(local), local, vocab_size, shard.name)


def _shard_name(path: Path, entry: dict[str, Any], split: str) -> str:
    return f"shard {entry['file']} of the {split} split ({path})"


def _check_shard_file(path: Path, entry: dict[str, Any], split: str, verify: bool) -> None:
    """Missing shard -> FileNotFoundError; wrong size, or (verify) an xxh64 other than the manifest's -> ValueError.
    Each names the shard; verify reads every byte of the file (about 1 GiB/s for xxh64)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"shard {entry['file']} of the {split} split is missing ({path}); "
            "re-copy the prepared dataset or re-run data_pipeline.prepare"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(
            f"shard {entry['file']} of the {split} split is corrupt: {size} bytes, the manifest says "
            f"{entry['bytes']} ({path}); re-copy the prepared dataset or re-run data_pipeline.prepare"
        )
    if verify:
        actual = shards.file_xxh64(path)
        if actual != entry["xxh64"]:
            raise ValueError(
                f"shard {entry['file']} of the {split} split is corrupt: its xxh64 is {actual}, the manifest says "
                f"{entry['xxh64']} ({path}); re-copy (re-download) the prepared dataset or re-run "
                "data_pipeline.prepare"
            )


def _decompressed(path: Path, entry: dict[str, Any], compression: str, cache: Path, verify: bool = False) -> Path:
    """Raw MDS shard for a compressed one, cached by content hash (safe to share between runs and ranks).

    A cached copy is reused when its size matches (and, with verify, its xxh64); otherwise it is rebuilt from the
    compressed shard, whose decompressed bytes are always checked against the manifest."""
    import xxhash
    import zstd  # the codec MDSWriter used (a mosaicml-streaming dependency); importing streaming costs seconds

    raw = cache / f"{entry['raw_xxh64']}-{entry['raw_file']}"
    if (
        raw.is_file()
        and raw.stat().st_size == entry["raw_bytes"]
        and (not verify or shards.file_xxh64(raw) == entry["raw_xxh64"])
    ):
        return raw
    if compression != "zstd":
        raise ValueError(f"shard {entry['file']} uses compression {compression!r}; this reader knows zstd only")
    try:
        data = zstd.decompress(path.read_bytes())
    except zstd.Error as e:
        raise ValueError(
            f"shard {entry['file']} is corrupt: {compression} decompression failed ({e}); "
            "re-copy the prepared dataset or re-run data_pipeline.prepare"
        ) from None
    if len(data) != entry["raw_bytes"] or xxhash.xxh64(data).hexdigest() != entry["raw_xxh64"]:
        raise ValueError(
            f"shard {entry['file']} is corrupt: its decompressed bytes differ from the manifest; "
            "re-copy the prepared dataset or re-run data_pipeline.prepare"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, raw)
    return raw


def _tar_offsets(path: Path, entry: dict[str, Any], seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Member offsets from the cached index next to the shard; rebuilt (and re-cached if writable) when stale."""
    index = shards.wds_index_path(path)
    row_bytes = seq_len * dtype.itemsize
    try:
        offsets = np.load(index, allow_pickle=False)
        if (
            offsets.shape == (entry["rows"],)
            and offsets.dtype == np.int64
            and (entry["rows"] == 0 or (offsets.min() >= 0 and offsets.max() + row_bytes <= entry["bytes"]))
        ):
            return offsets
    except (OSError, ValueError):
        pass
    offsets = shards.build_wds_index(path, seq_len, dtype)
    if len(offsets) != entry["rows"]:
        raise ValueError(
            f"shard {entry['file']} is corrupt: it holds {len(offsets)} rows, the manifest says "
            f"{entry['rows']}; re-copy the prepared dataset or re-run data_pipeline.prepare"
        )
    with contextlib.suppress(OSError):  # a read-only copy still works, it just rescans next time
        shards.write_wds_index(path, offsets)
    return offsets


def open_rows(
    path: str,
    split: str,
    expect_tokenizer: str,
    expect_seq_len: int,
    *,
    expect_vocab_size: int | None = None,
    cache_dir: str | None = None,
    verify: bool = True,
) -> ShardRows:
    """Random-access rows of one split of a prepared dataset.

    Refuses shards made for another tokenizer/seq_len/vocabulary (ValueError naming both values and the
    fix) and checks every shard up front: missing -> FileNotFoundError naming it, wrong size or header ->
    ValueError naming it. verify=True (the trainer's data.verify_shards) also reads every shard once here, at
    open, not during steps: its xxh64 must equal the manifest's (ValueError naming the shard, both hashes and the
    fix) and every token id must lie in the manifest's vocabulary (ValueError naming shard and row). Compressed MDS
    shards are decompressed into cache_dir (default: <path>/.decompressed); verify also re-hashes a cached copy.
    Whatever verify says, the rows handed out are checked against the vocabulary (ShardRows.rows).
    """
    root = Path(path)
    manifest = shards.load_manifest(root)
    shards.check_compatible(manifest, expect_tokenizer, expect_seq_len, expect_vocab_size, where=str(root))
    folder = shards.split_folder(root, split)
    seq_len, dtype = int(manifest["seq_len"]), np.dtype(manifest["dtype"])
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    cache = Path(cache_dir) if cache_dir else root / ".decompressed"
    opened: list[_Shard] = []
    for entry in manifest["splits"][split]["shards"]:
        file = folder / entry["file"]
        name = _shard_name(file, entry, split)
        _check_shard_file(file, entry, split, verify)
        if manifest["format"] == "mds":
            if manifest["compression"]:
                file = _decompressed(file, entry, manifest["compression"], cache, verify)
            shard: _Shard = _MemmapShard(file, entry["rows"], seq_len, dtype, name)
        else:
            shard = _TarShard(file, _tar_offsets(file, entry, seq_len, dtype), seq_len, dtype, name)
        if verify:  # the bytes match the manifest; this catches ids a bad prepare or an edited manifest let through
            _scan_token_range(shard, seq_len, dtype.itemsize, vocab_size)
        opened.append(shard)
    pad_id = manifest.get("pad_token_id") if manifest.get("pack") == "pad" else None
    rows = ShardRows(opened, seq_len, name=f"{root}:{split}", pad_token_id=pad_id, vocab_size=vocab_size)
    if len(rows) != manifest["splits"][split]["rows"]:
        raise ValueError(
            f"{root}: the {split} shards hold {len(rows)} rows, the manifest says "
            f"{manifest['splits'][split]['rows']}; re-run data_pipeline.prepare"
        )
    return rows


def _prepared_info(path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The same keys build_text_datasets reports, from the manifest (JSON-serialisable for checkpoints)."""
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    return {
        "source": path,
        "prepared_format": manifest["format"],
        "tokenizer": manifest["tokenizer"]["name"],
        "seq_len": manifest["seq_len"],
        "num_docs": train["docs"] + val["docs"],
        "train_docs": train["docs"],
        "val_docs": val["docs"],
        "train_tokens": train["tokens"],
        "val_tokens": val["tokens"],
        "train_rows": train["rows"],
        "val_rows": val["rows"],
        "documents_sha256": manifest["source"]["documents_sha256"],
        "build_seconds": 0.0,
        "cache_hit": True,
    }


def build_datasets(
    path_or_source: str, tokenizer: Tokenizer, seq_len: int, val_docs: int, cache_dir: str | None, verify: bool = True
) -> tuple[ShardRows | InMemoryRows, ShardRows | InMemoryRows, dict[str, Any]]:
    """(train, val, info) for the trainer: prepared shards when the path holds a manifest, else text.

    For prepared shards the validation split is the one fixed at prepare time and `val_docs` is not
    used (info["val_docs"] reports the prepared value), and `verify` (data.verify_shards) is open_rows'; anything
    else goes to data_pipeline.dataset.build_text_datasets unchanged.
    """
    if shards.is_prepared_dir(path_or_source):
        manifest = shards.load_manifest(path_or_source)
        kw = {"expect_vocab_size": tokenizer.vocab_size, "cache_dir": cache_dir, "verify": verify}
        train = open_rows(path_or_source, "train", tokenizer.name, seq_len, **kw)
        val = open_rows(path_or_source, "val", tokenizer.name, seq_len, **kw)
        return train, val, _prepared_info(path_or_source, manifest)
    return build_text_datasets(path_or_source, tokenizer, seq_len, val_docs, cache_dir)


# ---------------------------------------------------------------- mosaicml-streaming (remote MDS)


def _is_url(path: str) -> bool:
    return "://" in path


def fetch_manifest(remote: str, local: str, timeout: float = 60.0) -> dict[str, Any]:
    """The manifest of a prepared dataset at a local path or an object-store URL (downloaded into `local`)."""
    if not _is_url(remote):
        return shards.load_manifest(remote)
    from streaming.base.storage import CloudDownloader

    Path(local).mkdir(parents=True, exist_ok=True)
    target = Path(local) / shards.MANIFEST_NAME
    target.unlink(missing_ok=True)  # never trust a stale copy
    CloudDownloader.direct_download(f"{remote.rstrip('/')}/{shards.MANIFEST_NAME}", str(target), timeout)
    return shards.load_manifest(local)


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """StreamingDataset reads its world from RANK/WORLD_SIZE; present this process as a world of one."""
    keys = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StreamingReader:
    """Global batches of one split via mosaicml-streaming's StreamingDataset, sliced for one data-parallel rank.

    remote: the prepared folder (local path or s3://, gs://, oci://, hf:// ... URL); local: a cache folder that
    must be distinct for every reader alive on one machine (e.g. f"{cache}/rank{global_rank}").

    The world streaming sees is the data-parallel group, not the process world (tensor/pipeline peers
    must read the same rows): each reader is built as a one-process world, then its iteration position is
    set to DP rank `dp_rank` of `dp` (streaming's "parallel" world, the hook its `replication` option uses).
    Sample order depends only on (seed, num_canonical_nodes, global_batch_size): rank r's batch at step s is
    its share of the DP=1 batch at step s for every dp dividing num_canonical_nodes (the default 128 covers
    the power-of-two layouts up to 128 ranks), and a resumed run continues with the next batch.
    An epoch is the whole steps that fit (epoch_size // global_batch_size); the partial last step is skipped.
    If torch.distributed is initialised, StreamingDataset ends its constructor with a barrier over the
    world group, so build the reader on every rank.
    """

    def __init__(
        self,
        remote: str,
        split: str,
        *,
        local: str,
        expect_tokenizer: str,
        expect_seq_len: int,
        global_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp: int = 1,
        num_canonical_nodes: int = 128,
        shuffle_block_size: int | None = None,
        download_timeout: float = 60.0,
    ) -> None:
        from streaming import StreamingDataset
        from streaming.base.world import World

        if dp < 1 or not 0 <= dp_rank < dp:
            raise ValueError(f"need 0 <= dp_rank < dp, got dp_rank={dp_rank}, dp={dp}")
        if global_batch_size < 1 or global_batch_size % dp:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of dp={dp}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if num_canonical_nodes < 1 or num_canonical_nodes % dp:
            raise ValueError(
                f"num_canonical_nodes={num_canonical_nodes} must be a multiple of dp={dp} (streaming pads "
                "the order otherwise); use a multiple of every dp the run may use, e.g. 128"
            )
        self.manifest = fetch_manifest(remote, local, download_timeout)
        if self.manifest["format"] != "mds":
            raise ValueError(
                f"StreamingReader reads MDS shards; {remote} holds {self.manifest['format']} shards "
                "(use open_rows or WebDatasetStream for webdataset)"
            )
        shards.check_compatible(self.manifest, expect_tokenizer, expect_seq_len, where=remote)
        self.split, self.seed, self.dp_rank, self.dp = split, seed, dp_rank, dp
        self.global_batch_size, self.num_canonical_nodes = global_batch_size, num_canonical_nodes
        self.per_rank = global_batch_size // dp
        with _single_process_world():
            self._ds = StreamingDataset(
                remote=remote,
                local=local,
                split=split,
                shuffle=True,
                shuffle_seed=seed,
                shuffle_algo="py1e",
                shuffle_block_size=shuffle_block_size,
                num_canonical_nodes=num_canonical_nodes,
                batch_size=self.per_rank,
                partition_algo="relaxed",
                download_timeout=download_timeout,
            )
        self._ds._parallel_rank_world = World(num_nodes=dp, ranks_per_node=1, workers_per_rank=1, worker=dp_rank)
        self._ds.length = math.ceil(self._ds.epoch_size / dp)
        self.steps_per_epoch = int(self._ds.epoch_size) // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the {split} split has {self._ds.epoch_size} rows, fewer than one global batch of {global_batch_size}"
            )
        self.epoch, self.step_in_epoch = 0, 0
        self._initial_dp = dp
        self._iter: Iterator[dict[str, Any]] | None = None

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed so far (all ranks, all epochs)."""
        return (self.epoch * self.steps_per_epoch + self.step_in_epoch) * self.global_batch_size

    def _start_epoch(self) -> None:
        self._ds.load_state_dict(
            {
                "epoch": self.epoch,
                "sample_in_epoch": self.step_in_epoch * self.global_batch_size,
                "num_canonical_nodes": self.num_canonical_nodes,
                "shuffle_seed": self.seed,
                "initial_physical_nodes": self._initial_dp,
            }
        )
        self._iter = iter(self._ds)

    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next global step: int64 [global_batch_size // dp, seq_len]."""
        if self._iter is None:
            self._start_epoch()
        rows = [sample[shards.TOKENS_COLUMN] for _, sample in zip(range(self.per_rank), self._iter)]
        if len(rows) != self.per_rank:
            raise RuntimeError(
                f"streaming yielded {len(rows)} of {self.per_rank} rows for step {self.step_in_epoch} "
                f"of epoch {self.epoch}; the shards changed under the reader"
            )
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._iter = self.epoch + 1, 0, None
        return np.stack(rows).astype(np.int64)

    def close(self) -> None:
        """Stop StreamingDataset's download-ahead threads (before deleting its cache or remote folder)."""
        iterator = getattr(self._ds, "_iterator", None)
        if iterator is not None:
            iterator.exit()
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; store it in every checkpoint (identical on all ranks)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "consumed_samples": self.consumed_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "num_canonical_nodes": self.num_canonical_nodes,
            "initial_dp": self._initial_dp,
            "split": self.split,
            "documents_sha256": self.manifest["source"]["documents_sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the position `state` was saved at (any dp dividing the global batch)."""
        for key in ("global_batch_size", "seed", "num_canonical_nodes", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"reader state was saved with {key}={state[key]!r} but this reader has "
                    f"{getattr(self, key)!r}; resume with the same data settings"
                )
        if state["documents_sha256"] != self.manifest["source"]["documents_sha256"]:
            raise ValueError(
                "reader state belongs to a different prepared dataset (documents_sha256 differs); "
                "resume on the data the run started with"
            )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self._initial_dp = int(state["initial_dp"])
        self._iter = None


# ---------------------------------------------------------------- webdataset (resampled)


class WebDatasetStream:
    """An endless stream of rows from webdataset tar shards, shards drawn with replacement (resampled=True).

    Each rank draws shards from its own seeded generator and shuffles rows in a buffer, so ranks see
    independent streams and an epoch has no edges. Resume policy: the state is (seed, rank, rows consumed);
    after load_state_dict the stream is re-seeded from that triple. It is deterministic (two restarts from
    one state read the same rows) and unbiased, but it is a fresh draw, not a replay of what the
    uninterrupted run would have read next. Runs that need exact resumption read the same tar shards through
    open_rows and the trainer's global sample index instead.
    """

    def __init__(
        self,
        path: str,
        split: str,
        *,
        expect_tokenizer: str,
        expect_seq_len: int,
        seed: int,
        dp_rank: int = 0,
        dp: int = 1,
        shuffle_buffer: int = 1000,
    ) -> None:
        if dp < 1 or not 0 <= dp_rank < dp:
            raise ValueError(f"need 0 <= dp_rank < dp, got dp_rank={dp_rank}, dp={dp}")
        if _is_url(path):
            raise ValueError("WebDatasetStream reads a local or mounted prepared folder; give its path")
        manifest = shards.load_manifest(path)
        if manifest["format"] != "wds":
            raise ValueError(f"{path} holds {manifest['format']} shards; WebDatasetStream reads --format wds")
        shards.check_compatible(manifest, expect_tokenizer, expect_seq_len, where=path)
        folder = shards.split_folder(Path(path), split)
        self.urls = [str(folder / e["file"]) for e in manifest["splits"][split]["shards"]]
        for url, entry in zip(self.urls, manifest["splits"][split]["shards"]):
            _check_shard_file(Path(url), entry, split, verify=False)
        self.seq_len = int(manifest["seq_len"])
        self.seed, self.dp_rank, self.dp, self.shuffle_buffer = seed, dp_rank, dp, shuffle_buffer
        self.consumed = 0
        self._iter: Iterator[np.ndarray] | None = None

    def _stream(self) -> Iterator[np.ndarray]:
        import webdataset as wds

        # Integers only: webdataset's make_seed hashes its arguments and str hashes vary per process.
        stream_seed = wds.utils.make_seed(self.seed, self.dp_rank, self.consumed)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=stream_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(stream_seed)),
        )
        for sample in pipeline:
            yield np.load(io.BytesIO(sample[shards.TOKENS_COLUMN + ".npy"]), allow_pickle=False)

    def next_batch(self, n: int) -> np.ndarray:
        """The next n rows of this rank: int64 [n, seq_len]."""
        if self._iter is None:
            self._iter = self._stream()
        rows = [next(self._iter) for _ in range(n)]
        self.consumed += n
        return np.stack(rows).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp": self.dp,
            "consumed": self.consumed,
            "policy": "resampled: reseed from (seed, dp_rank, consumed)",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["dp_rank"], state["dp"]) != (self.seed, self.dp_rank, self.dp):
            raise ValueError(
                f"stream state was saved for seed/dp_rank/dp {state['seed']}/{state['dp_rank']}/"
                f"{state['dp']}, this stream is {self.seed}/{self.dp_rank}/{self.dp}"
            )
        self.consumed = int(state["consumed"])
        self._iter = None
