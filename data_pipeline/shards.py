"""Shard writers (mosaicml-streaming MDS and webdataset tar) and the manifest that describes a prepared dataset.

A prepared dataset is a folder:

    manifest.json          what was prepared: tokenizer, seq_len, dtype, packing, token counts, skipped
                           inputs, source hash, and every shard with its row count, size and xxh64
    train/ val/            one folder per split: MDS (index.json + shard.NNNNN.mds[.zstd]) or
                           webdataset (shard-NNNNNN.tar + shard-NNNNNN.idx.npy member offsets)

Every sample is one fixed-length token row (uint16 when the vocabulary fits, else uint32), stored raw:
an MDS column ``ndarray:<dtype>:<seq_len>``, a webdataset member ``<key>.tokens.npy``. Both layouts can
then be read with zero copies through np.memmap (data_pipeline.readers) as well as by the stock
StreamingDataset / webdataset loaders. Writers are byte-deterministic (fixed tar mtime/owner, no clocks).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bd3_megatron.io import atomic_write, atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "bd3-megatron-token-shards"
MANIFEST_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val")
FORMATS: tuple[str, ...] = ("mds", "wds")
COMPRESSIONS: tuple[str, ...] = ("zstd",)
TOKENS_COLUMN = "tokens"
WDS_MEMBER_SUFFIX = f".{TOKENS_COLUMN}.npy"
WDS_INDEX_SUFFIX = ".idx.npy"
_HASH_CHUNK = 1 << 24


def row_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies below 65,536 ids (GPT-2, BERT), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def file_xxh64(path: Path) -> str:
    """xxh64 hex digest of a file (the hash mosaicml-streaming also writes into index.json)."""
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class RowWriter(Protocol):
    """Appends fixed-length token rows to one split folder and reports its shards on close."""

    def write(self, rows: np.ndarray) -> None: ...

    def close(self) -> list[dict[str, Any]]:
        """Finish the split; one dict per shard: file, rows, bytes, xxh64 (+ raw_file/raw_bytes for MDS)."""
        ...


def _check_rows(rows: np.ndarray, seq_len: int, dtype: np.dtype) -> np.ndarray:
    if rows.ndim != 2 or rows.shape[1] != seq_len:
        raise ValueError(f"expected token rows [n, {seq_len}], got shape {rows.shape}")
    return np.ascontiguousarray(rows, dtype=dtype)


class MDSRowWriter:
    """Token rows -> mosaicml-streaming MDS shards via MDSWriter (index.json carries xxh64 per shard)."""

    def __init__(self, folder: Path, seq_len: int, dtype: np.dtype, compression: str | None, shard_bytes: int) -> None:
        from streaming import MDSWriter

        self.folder, self.seq_len, self.dtype = Path(folder), seq_len, np.dtype(dtype)
        self._writer = MDSWriter(
            out=str(self.folder),
            columns={TOKENS_COLUMN: f"ndarray:{self.dtype.name}:{seq_len}"},
            compression=compression,
            hashes=["xxh64"],
            size_limit=shard_bytes,
        )

    def write(self, rows: np.ndarray) -> None:
        for row in _check_rows(rows, self.seq_len, self.dtype):
            self._writer.write({TOKENS_COLUMN: row})

    def close(self) -> list[dict[str, Any]]:
        self._writer.finish()
        index = json.loads((self.folder / "index.json").read_text())
        shards = []
        for entry in index["shards"]:
            raw, zipped = entry["raw_data"], entry["zip_data"]
            stored = zipped or raw
            shards.append(
                {
                    "file": stored["basename"],
                    "rows": int(entry["samples"]),
                    "bytes": int(stored["bytes"]),
                    "xxh64": stored["hashes"]["xxh64"],
                    "raw_file": raw["basename"],
                    "raw_bytes": int(raw["bytes"]),
                    "raw_xxh64": raw["hashes"].get("xxh64"),
                }
            )
        return shards


class WDSRowWriter:
    """Token rows -> webdataset tar shards (``<key>.tokens.npy`` members) plus a member-offset index per shard.

    Keys are the row's index within the split (zero-padded), so a reader can check it found the right
    member. Shards roll over at shard_bytes; the index is written next to each shard as it closes.
    """

    def __init__(self, folder: Path, seq_len: int, dtype: np.dtype, shard_bytes: int) -> None:
        self.folder, self.seq_len, self.dtype = Path(folder), seq_len, np.dtype(dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        # A member is a 512-byte header, the .npy (128-byte header + data) and padding to 512.
        self._member_bytes = 512 + -(-(128 + seq_len * self.dtype.itemsize) // 512) * 512
        self._rows_total = 0
        self._shards: list[dict[str, Any]] = []
        self._tar: Any = None
        self._shard_rows = 0

    def _open_next(self) -> None:
        import webdataset as wds

        name = f"shard-{len(self._shards):06d}.tar"
        # Fixed owner and mtime make the tar bytes a function of the rows only.
        self._tar = wds.TarWriter(str(self.folder / name), mtime=0.0, user="bd3", group="bd3", encoder=True)
        self._shards.append({"file": name})
        self._shard_rows = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        entry = self._shards[-1]
        path = self.folder / entry["file"]
        offsets = build_wds_index(path, self.seq_len, self.dtype)
        write_wds_index(path, offsets)
        entry.update(rows=self._shard_rows, bytes=path.stat().st_size, xxh64=file_xxh64(path))

    def write(self, rows: np.ndarray) -> None:
        for row in _check_rows(rows, self.seq_len, self.dtype):
            if self._tar is None:
                self._open_next()
            elif (self._shard_rows + 1) * self._member_bytes > self.shard_bytes:
                self._close_current()
                self._open_next()
            self._tar.write({"__key__": f"{self._rows_total:010d}", TOKENS_COLUMN + ".npy": row})
            self._rows_total += 1
            self._shard_rows += 1

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return list(self._shards)


def wds_index_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + WDS_INDEX_SUFFIX)


def build_wds_index(shard: Path, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Byte offset of each row's token data inside a tar shard (int64 [rows]), by scanning member headers.

    Every member must be ``<key>.tokens.npy`` holding a [seq_len] array of `dtype`; anything else means
    the shard is not one of ours or is damaged, and raises ValueError naming the shard.
    """
    dtype = np.dtype(dtype)
    offsets: list[int] = []
    try:
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(WDS_MEMBER_SUFFIX)):
                    raise ValueError(f"unexpected member {member.name!r}")
                raw.seek(member.offset_data)
                version = np.lib.format.read_magic(raw)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, got = read_header(raw)
                if shape != (seq_len,) or got != dtype or fortran:
                    raise ValueError(f"member {member.name!r} holds {got}{list(shape)}, expected {dtype}[{seq_len}]")
                data_at = raw.tell()
                if data_at + seq_len * dtype.itemsize != member.offset_data + member.size:
                    raise ValueError(f"member {member.name!r} has trailing bytes")
                offsets.append(data_at)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"webdataset shard {shard} is corrupt ({e}); re-run data_pipeline.prepare") from None
    except ValueError as e:
        raise ValueError(f"webdataset shard {shard} is corrupt: {e}; re-run data_pipeline.prepare") from None
    return np.asarray(offsets, dtype=np.int64)


def write_wds_index(shard: Path, offsets: np.ndarray) -> Path:
    """Cache member offsets next to the shard (atomic), so readers skip the header scan."""
    return atomic_write(wds_index_path(shard), lambda f: np.save(f, np.asarray(offsets, np.int64), allow_pickle=False))


def split_folder(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return Path(root) / split


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """manifest.json via temp file + rename: its presence marks a complete prepared dataset."""
    return atomic_write_text(Path(root) / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def is_prepared_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding a prepared-dataset manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, checked for kind and version."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no {MANIFEST_NAME}); create it with "
            "`python -m data_pipeline.prepare --input ... --output DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run data_pipeline.prepare") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{path} is not a bd3-megatron shard manifest; re-run data_pipeline.prepare")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has manifest version {manifest.get('version')}, this code reads {MANIFEST_VERSION}; "
            "re-run data_pipeline.prepare"
        )
    return manifest


class IncompatibleData(ValueError):
    """Prepared shards made for another tokenizer, row length or vocabulary than the caller's.

    The message tells a training run what to change (its config keys); tools without those options (eval_ppl)
    catch this and word the fix in their own terms from ``field`` ("tokenizer", "seq_len" or "vocab_size"),
    ``got`` (the shards' value), ``want`` (the caller's) and ``where`` (the dataset).
    """

    def __init__(self, message: str, *, field: str, got: Any, want: Any, where: str) -> None:
        super().__init__(message)
        self.field, self.got, self.want, self.where = field, got, want, where


def check_compatible(
    manifest: dict[str, Any],
    expect_tokenizer: str,
    expect_seq_len: int,
    expect_vocab_size: int | None = None,
    where: str = "prepared dataset",
) -> None:
    """Refuse shards made for another tokenizer, row length or vocabulary (IncompatibleData naming both values
    and the fix for a training run)."""
    got_tok, got_len = manifest["tokenizer"]["name"], int(manifest["seq_len"])
    if got_tok != expect_tokenizer:
        raise IncompatibleData(
            f"{where} was prepared with tokenizer {got_tok!r} but the config asks for {expect_tokenizer!r}; "
            f"set data.tokenizer={got_tok} or re-run prepare with --tokenizer {expect_tokenizer}",
            field="tokenizer",
            got=got_tok,
            want=expect_tokenizer,
            where=where,
        )
    if got_len != expect_seq_len:
        raise IncompatibleData(
            f"{where} has rows of seq_len {got_len} but the config asks for {expect_seq_len}; "
            f"set model.seq_len={got_len} or re-run prepare with --seq-len {expect_seq_len}",
            field="seq_len",
            got=got_len,
            want=expect_seq_len,
            where=where,
        )
    got_vocab = int(manifest["tokenizer"]["vocab_size"])
    if expect_vocab_size is not None and got_vocab != expect_vocab_size:
        raise IncompatibleData(
            f"{where} was tokenized with a {got_tok} vocabulary of {got_vocab} ids but this tokenizer has "
            f"{expect_vocab_size}; use the same tokenizer files (BD3_TOKENIZER_DIR) or re-run prepare",
            field="vocab_size",
            got=got_vocab,
            want=expect_vocab_size,
            where=where,
        )
