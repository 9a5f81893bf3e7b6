"""Token-row datasets and the global-index sampler the trainer reads through.

The trainer only sees ``TokenRows`` (length, seq_len, rows by index), so the in-memory reader here can
later be swapped for a sharded streaming one. ``ShuffledStream`` maps a *global sample index* (counting
over the whole run, across epochs) to a row with a permutation keyed only by (seed, epoch): the data a
run sees is then independent of how it is split over ranks, and resuming at sample i is exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from bd3_megatron.io import atomic_write, atomic_write_text
from data_pipeline.corpus import read_documents, source_files
from data_pipeline.packing import pack_wrap
from data_pipeline.shuffle import SHUFFLES, KeyedShuffle
from data_pipeline.tokenizers import Tokenizer

_CACHE_VERSION = 2  # 2: documents that tokenize to nothing are dropped (1 packed a stray EOS for each)
_TOKENIZE_CHUNK = 64  # documents per encode_batch call; bounds the Python-int lists alive at once


def padding_mask(rows: torch.Tensor, pad_token_id: int | None) -> torch.Tensor | None:
    """Where `--pad` rows hold padding: bool [n, L], True at padding; None when there is none to mask.

    A padded row is ``BOS doc EOS`` right-padded with EOS (= pad_token_id; data_pipeline.prepare). Its padding is
    the trailing run of pad ids after the last other token, less the first of them: that one is the document's own
    EOS, which is real, as the reference's attention_mask counts [SEP] in LM1B rows. The rule holds when the text
    itself holds the pad id (BERT encodes a literal "[SEP]" as 102; GPT-2's BOS is its EOS): only a document that
    ends in the pad id's own text loses those trailing copies to the padding. A truncated document fills its row
    and has none.

    rows: int [n, L]. pad_token_id: None for wrapped data (no padding: returns None without looking at the rows).
    Also None for a batch without padding, so such batches take exactly the unpadded path.
    """
    if pad_token_id is None:
        return None
    seq_len = rows.shape[1]
    other = rows != pad_token_id
    other[:, 0] = True  # BOS may equal the pad id (GPT-2); an empty document still keeps BOS EOS
    positions = torch.arange(seq_len, device=rows.device)
    last_other = torch.where(other, positions, 0).amax(dim=1, keepdim=True)
    padding = positions > last_other + 1  # last real token: the EOS right after the text
    return padding if bool(padding.any()) else None


@runtime_checkable
class TokenRows(Protocol):
    """Fixed-length token rows addressable by index: the reader interface the trainer uses.

    pad_token_id: None for wrapped rows (no padding), else the id `--pad` rows are padded with (see padding_mask).
    """

    seq_len: int
    pad_token_id: int | None

    def __len__(self) -> int: ...

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """int64 array [len(indices), seq_len]."""
        ...


class InMemoryRows:
    """TokenRows over a packed [num_rows, seq_len] integer array held in memory."""

    def __init__(self, array: np.ndarray, pad_token_id: int | None = None) -> None:
        array = np.asarray(array)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"expected a 2-D integer array [num_rows, seq_len], got {array.dtype} {array.shape}")
        self._data = array
        self.seq_len: int = int(array.shape[1])
        self.pad_token_id = pad_token_id

    @property
    def data(self) -> np.ndarray:
        """The packed array itself (for saving or inspection; do not modify)."""
        return self._data

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"row indices must lie in [0, {len(self)}); got min {idx.min()}, max {idx.max()}")
        return self._data[idx].astype(np.int64, copy=False)


class ShuffledStream:
    """Global sample index -> row: epoch = i // N, and the row order of each epoch is keyed only by (seed, epoch).

    shuffle (data.shuffle): "feistel" (data_pipeline.shuffle.KeyedShuffle: a keyed Feistel bijection, O(batch)
    memory, with optional shuffle windows of ``window_shards`` shards) or "permutation" (a materialised
    ``PCG64([seed, epoch]).permutation(N)`` per epoch: O(N) memory and time at each epoch boundary; the order of
    checkpoints written before data.shuffle existed, kept so those runs resume with their order).

    Prefetch: when the dataset has ``prefetch(shard_ids)`` (a streamed dataset, data_pipeline.remote), each ``get``
    first hands it the shards of the shuffle window the request falls in and of the next window (the order is a pure
    function of (seed, index), so the future windows are known). They download in the background while the steps
    read the current window, so a step waits only when a download falls behind (or the first window is cold).
    """

    def __init__(self, dataset: TokenRows, seed: int, shuffle: str = "permutation", window_shards: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot sample from an empty dataset; lower seq_len or add documents")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        if shuffle == "permutation" and window_shards:
            raise ValueError("shuffle windows need shuffle=feistel; the permutation shuffle is global")
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.seq_len: int = dataset.seq_len
        self.pad_token_id: int | None = dataset.pad_token_id
        self._perm_cache: dict[int, np.ndarray] = {}
        shard_rows = getattr(dataset, "shard_rows", None)
        self._keyed = KeyedShuffle(
            [len(dataset)] if shard_rows is None else shard_rows,
            self.seed,
            window_shards if shuffle == "feistel" else 0,
        )
        self._prefetched: tuple[int, int] | None = None

    @property
    def epoch_length(self) -> int:
        """Samples per epoch (= rows in the dataset)."""
        return len(self.dataset)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """Row order of one epoch for shuffle="permutation"; depends only on (seed, epoch)."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, int(epoch)]))
            perm = rng.permutation(self.epoch_length)
            # Keep only neighbours of this epoch (a request may straddle a boundary); bounded memory.
            self._perm_cache = {e: p for e, p in self._perm_cache.items() if abs(e - epoch) <= 1}
            self._perm_cache[epoch] = perm
        return perm

    def row_indices(self, sample_indices: np.ndarray) -> np.ndarray:
        """Dataset row for each global sample index."""
        idx = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise ValueError(f"global sample indices must be non-negative, got {idx.min()}")
        if self.shuffle == "feistel":
            return self._keyed.rows(idx)
        n = self.epoch_length
        epochs, positions = np.divmod(idx, n)
        out = np.empty_like(idx)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.epoch_permutation(int(epoch))[positions[sel]]
        return out

    def upcoming_shards(self, sample_index: int) -> np.ndarray:
        """Shards the window of ``sample_index`` and the window after it read (all shards for a global shuffle)."""
        k = self._keyed
        epoch, window = k.locate(sample_index)
        nxt = (epoch, window + 1) if window + 1 < k.num_windows else (epoch + 1, 0)
        return np.unique(np.concatenate([k.window_shard_ids(epoch, window), k.window_shard_ids(*nxt)]))

    def _prefetch(self, idx: np.ndarray) -> None:
        prefetch = getattr(self.dataset, "prefetch", None)
        if prefetch is None or idx.size == 0:
            return
        where = self._keyed.locate(int(idx.max()))
        if where != self._prefetched:  # once per window: the pool skips shards already local or queued
            self._prefetched = where
            prefetch(self.upcoming_shards(int(idx.max())))

    def get(self, sample_indices: np.ndarray) -> torch.Tensor:
        """LongTensor [n, seq_len] of the rows for these global sample indices."""
        self._prefetch(np.asarray(sample_indices, dtype=np.int64).reshape(-1))
        return torch.from_numpy(self.dataset.rows(self.row_indices(sample_indices)))

    def get_with_padding(self, sample_indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows [n, seq_len], padding [n, seq_len] bool or None): the rows of ``get`` and their padding_mask."""
        rows = self.get(sample_indices)
        return rows, padding_mask(rows, self.pad_token_id)


def _tokenize(docs: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(docs), _TOKENIZE_CHUNK):
        batch = tokenizer.encode_batch(list(docs[start : start + _TOKENIZE_CHUNK]))
        out.extend(np.asarray(ids, dtype=np.int32) for ids in batch)
    return out


def _cache_key(source: str, tokenizer: Tokenizer, seq_len: int, val_docs: int) -> str:
    files = []
    for p in source_files(source):
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    payload = {
        "version": _CACHE_VERSION,
        "files": files,
        "tokenizer": tokenizer.name,
        "eos": tokenizer.eos_token_id,
        "seq_len": seq_len,
        "val_docs": val_docs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _cache_paths(cache_dir: str, key: str) -> tuple[Path, Path, Path]:
    base = Path(cache_dir)
    return base / f"rows-{key}.train.npy", base / f"rows-{key}.val.npy", base / f"rows-{key}.json"


def _load_cache(paths: tuple[Path, Path, Path]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    train_p, val_p, info_p = paths
    if not info_p.is_file():  # info is written last: its presence marks a complete entry
        return None
    try:
        info = json.loads(info_p.read_text())
        train = np.load(train_p, allow_pickle=False)
        val = np.load(val_p, allow_pickle=False)
    except (OSError, ValueError):
        return None  # damaged or partly deleted entry: rebuild it
    return train, val, info


def _save_cache(paths: tuple[Path, Path, Path], train: np.ndarray, val: np.ndarray, info: dict[str, Any]) -> None:
    train_p, val_p, info_p = paths
    train_p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(train_p, lambda f: np.save(f, train, allow_pickle=False))
    atomic_write(val_p, lambda f: np.save(f, val, allow_pickle=False))
    atomic_write_text(info_p, json.dumps(info, indent=1, sort_keys=True))


def build_text_datasets(
    source: str, tokenizer: Tokenizer, seq_len: int, val_docs: int, cache_dir: str | None = None
) -> tuple[InMemoryRows, InMemoryRows, dict[str, Any]]:
    """Train/val packed rows from a text source; the last `val_docs` documents are validation only.

    Each split is packed on its own, so no validation token ever reaches a training row. With cache_dir,
    the packed arrays are stored as .npy keyed by the source files (paths, sizes, mtimes), tokenizer,
    seq_len and val_docs, and a second call with the same inputs skips reading and tokenizing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if val_docs < 1:
        raise ValueError(f"val_docs must be at least 1 so there is a held-out split, got {val_docs}")

    paths = _cache_paths(cache_dir, _cache_key(source, tokenizer, seq_len, val_docs)) if cache_dir else None
    if paths is not None:
        cached = _load_cache(paths)
        if cached is not None:
            train, val, info = cached
            return InMemoryRows(train), InMemoryRows(val), {**info, "cache_hit": True}

    start = time.perf_counter()
    tokens = _tokenize(read_documents(source), tokenizer)
    # A document the tokenizer turns into no ids (only zero-width or control characters for BERT) is not a
    # document: packing it would only add a stray EOS.
    docs = [t for t in tokens if t.size]
    if val_docs >= len(docs):
        raise ValueError(
            f"val_docs={val_docs} leaves no training document ({source!r} has {len(docs)} documents); lower val_docs"
        )
    split = len(docs) - val_docs
    train_tokens, val_tokens = docs[:split], docs[split:]
    train = pack_wrap(train_tokens, seq_len, tokenizer.eos_token_id)
    val = pack_wrap(val_tokens, seq_len, tokenizer.eos_token_id)
    if len(val) == 0:
        raise ValueError(
            f"the last {val_docs} documents give no full validation row of {seq_len} tokens; "
            "raise val_docs or lower seq_len"
        )
    if len(train) == 0:
        raise ValueError(f"the training documents give no full row of {seq_len} tokens; lower val_docs or seq_len")

    info: dict[str, Any] = {
        "source": source,
        "tokenizer": tokenizer.name,
        "seq_len": seq_len,
        "num_docs": len(docs),
        "skipped_no_tokens": len(tokens) - len(docs),
        "train_docs": split,
        "val_docs": val_docs,
        # Token counts include one EOS per document; rows drop each split's final partial row.
        "train_tokens": int(sum(t.size + 1 for t in train_tokens)),
        "val_tokens": int(sum(t.size + 1 for t in val_tokens)),
        "train_rows": len(train),
        "val_rows": len(val),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    if paths is not None:
        _save_cache(paths, train, val, info)
    return InMemoryRows(train), InMemoryRows(val), {**info, "cache_hit": False}
