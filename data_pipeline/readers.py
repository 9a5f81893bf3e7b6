"""Readers for prepared shards: random access by global row index for the trainer.

``open_rows`` / ``build_datasets``: ``ShardRows`` is a ``TokenRows`` over the MDS or webdataset shards of one split of
a local (or shared-file-system) prepared folder, read zero-copy through np.memmap: the trainer keeps asking
``ShuffledStream(rows, seed).get(global_indices)``, so every parallel layout sees the same data and a resume at
consumed sample i is exact by construction. Zstd MDS shards are decompressed once into a content-addressed cache;
webdataset shards are addressed through a cached member-offset index. A prepared folder in object storage is read
behind the same contract by data_pipeline.remote (mosaicml-streaming, a local cache, eviction, prefetch);
data_pipeline.training_data picks the reader from the config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bd3_megatron.io import atomic_write_bytes
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
    return atomic_write_bytes(raw, data)


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
