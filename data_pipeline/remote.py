"""Prepared shards streamed from object storage through mosaicml-streaming, behind the trainer's global-index contract.

A prepared folder (``python -m data_pipeline.prepare --format mds``: manifest.json, train/ and val/ each an MDS
folder with its index.json) is a valid mosaicml-streaming remote as it is. ``StreamedRows`` is a ``TokenRows`` over
one split of such a remote: ``rows(indices)`` reads rows by global row index from memory maps of the cached raw
shards; a shard not in the cache is first fetched with ``StreamingDataset.prepare_shard``: streaming's own
downloaders (s3:// with the endpoint from ``S3_ENDPOINT_URL``, gs://, oci://, azure, hf://, a local path, ...), its
xxh64 check against index.json, its decompression, and under a ``cache_limit`` its eviction of the least recently
used shards. ``prefetch(shard_ids)`` fetches shards on a small thread pool ahead of need (``ShuffledStream`` hands it
the shards of the current and the next shuffle window).

The trainer's contract is untouched: step s reads global samples [s*G, (s+1)*G), ``ShuffledStream`` maps each to a
row by (seed, index) alone, so every TP/PP/DP layout reads the same rows and a resume (at any DP size) continues the
same sample stream; the cache only decides whether a row is read from local disk or downloaded first.

Each process streams into its own cache folder ``<stream_cache>/<dataset key>/rank<R>/`` as a one-process
streaming world (streaming's cross-process cache sharing needs LOCAL_WORLD_SIZE, which srun does not set), so the
cache limit is per process and split. Errors are one line naming the shard, its URL and the fix (StreamedDataError,
a ValueError: the launcher prints ``error: ...`` and exits 2; no checkpoint is written by a run that stops there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import shards
from data_pipeline.readers import check_token_range

PREFETCH_WORKERS = 2  # concurrent shard downloads ahead of the steps, per process and split


class StreamedDataError(ValueError):
    """A streamed shard or manifest could not be fetched or is damaged (message: what, where, the fix)."""


def is_url(path: str) -> bool:
    return "://" in path


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """Build a StreamingDataset as a world of one process, whatever the job's world is.

    StreamingDataset reads its world from RANK/WORLD_SIZE/LOCAL_*, and with torch.distributed initialised it
    synchronises its shared-memory registration with world barriers, in which every rank of a node then registers the
    same first free prefix at once (a FileExistsError for all but one). So: the variables say "rank 0 of 1",
    torch.distributed looks uninitialised to it for the duration (no barriers: each rank registers its own cache
    folder alone), and an exclusive file lock in the temp folder (where streaming keeps its own locks) serialises the
    registrations of the processes of a machine."""
    import fcntl
    import tempfile

    import torch.distributed as dist

    keys = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in keys}
    with open(Path(tempfile.gettempdir()) / "bd3_streaming_register.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        is_initialized = dist.is_initialized
        dist.is_initialized = lambda: False
        os.environ.update(keys)
        try:
            yield
        finally:
            dist.is_initialized = is_initialized
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _unreachable_hint(remote: str) -> str:
    if remote.startswith("s3://"):
        return "check the bucket and prefix, the credentials (AWS_*) and the endpoint (S3_ENDPOINT_URL)"
    return "check the URL, the credentials and the network"


def fetch_remote_manifest(remote: str, local: Path, timeout: float, retry: int) -> dict[str, Any]:
    """The manifest of the prepared folder at `remote` (a URL or a local path), downloaded into `local`.

    Tries 1 + retry times with backoff (streaming's retry); then StreamedDataError naming the URL and the fix."""
    if not is_url(remote):
        return shards.load_manifest(remote)
    from streaming.base.storage import CloudDownloader
    from streaming.base.util import retry as with_retry

    local.mkdir(parents=True, exist_ok=True)
    target = local / shards.MANIFEST_NAME
    target.unlink(missing_ok=True)  # never trust a stale copy
    url = f"{remote.rstrip('/')}/{shards.MANIFEST_NAME}"
    try:
        with_retry(num_attempts=1 + retry, initial_backoff=0.5)(
            lambda: CloudDownloader.direct_download(url, str(target), timeout)
        )()
    except Exception as exc:  # botocore/gcs/... raise their own types; all end the same way
        target.unlink(missing_ok=True)
        raise StreamedDataError(
            f"cannot read the prepared dataset's manifest {url} after {1 + retry} attempts "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {_unreachable_hint(remote)}, "
            "or upload the folder data_pipeline.prepare wrote"
        ) from None
    return shards.load_manifest(local)


class StreamedRows:
    """TokenRows over one split of a streamed prepared MDS folder: int64 rows by global row index.

    remote: the prepared folder's URL (or local path read as a remote); local: this reader's own cache folder;
    manifest: the folder's manifest (fetch_remote_manifest); cache_limit: bytes (None: no limit; streaming requires
    >= 4 x the largest shard). Raises StreamedDataError at open when the split's index.json is unreachable or
    disagrees with the manifest, or when the cache limit is too small; ``rows`` raises it for a shard that is
    missing, truncated or damaged on the remote (after streaming's retries), naming the shard and its URL, and
    removes the shard's bytes from the cache.
    """

    def __init__(
        self,
        remote: str,
        split: str,
        *,
        local: str,
        manifest: dict[str, Any],
        cache_limit: int | None = None,
        download_timeout: float = 60.0,
        download_retry: int = 2,
    ) -> None:
        from streaming import StreamingDataset

        if manifest["format"] != "mds":
            raise StreamedDataError(
                f"{remote} holds {manifest['format']} shards; streaming reads MDS: re-run data_pipeline.prepare "
                "with --format mds, or copy the folder to a local/shared disk and read it in place"
            )
        self.remote, self.split = remote.rstrip("/"), split
        self.seq_len: int = int(manifest["seq_len"])
        self.pad_token_id = manifest.get("pad_token_id") if manifest.get("pack") == "pad" else None
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self._entries = manifest["splits"][split]["shards"]
        Path(local).mkdir(parents=True, exist_ok=True)
        # streaming makes room for a download before it starts and counts its bytes when it ends, so downloads in
        # flight at once (the prefetch pool and the step's own) can each find the same room: keep room for the pool's
        # so that the bytes on disk stay within the user's limit
        largest = max(int(e["raw_bytes"]) + (int(e["bytes"]) if manifest["compression"] else 0) for e in self._entries)
        if cache_limit is not None:
            need = (4 + PREFETCH_WORKERS) * largest
            if cache_limit < need:
                raise StreamedDataError(
                    f"data.cache_limit={cache_limit} bytes is too small for {self.remote} ({split} split): it must "
                    f"hold {4 + PREFETCH_WORKERS} of its largest shards ({largest} bytes each, mosaicml-streaming's "
                    f"4 plus {PREFETCH_WORKERS} downloads in flight), i.e. >= {need}; raise data.cache_limit or "
                    "re-run data_pipeline.prepare with a smaller --shard-size-mb"
                )
            cache_limit -= PREFETCH_WORKERS * largest
        try:
            with _single_process_world():
                self._ds = StreamingDataset(
                    remote=self.remote,
                    local=local,
                    split=split,
                    shuffle=False,
                    batch_size=1,
                    cache_limit=cache_limit,
                    download_timeout=download_timeout,
                    download_retry=1 + download_retry,  # streaming counts attempts
                    validate_hash="xxh64",
                )
        except ValueError as exc:
            if "ache limit" in str(exc):
                raise StreamedDataError(
                    f"data.cache_limit={cache_limit} bytes is too small for {self.remote} ({split} split): {exc}"
                ) from None
            raise StreamedDataError(f"cannot open the {split} split of {self.remote}: {exc}") from None
        except Exception as exc:
            raise StreamedDataError(
                f"cannot read {self.remote}/{split}/index.json ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); {_unreachable_hint(self.remote)}"
            ) from None
        got = [(s.get_raw_size(), s.samples) for s in self._ds.shards]
        want = [(int(e["raw_bytes"]), int(e["rows"])) for e in self._entries]
        if got != want:
            raise StreamedDataError(
                f"{self.remote}/{split}/index.json does not match the manifest's {split} shards; upload the whole "
                "folder data_pipeline.prepare wrote (manifest.json, train/, val/) again"
            )
        self.shard_rows = np.asarray(self._ds.samples_per_shard, dtype=np.int64)
        self.shard_bytes = np.asarray([int(e["raw_bytes"]) for e in self._entries], dtype=np.int64)
        self.largest_shard = largest  # bytes a shard may occupy in the cache (raw + compressed)
        # Prefetch workers are daemon threads on a plain queue (not a ThreadPoolExecutor, whose queued work Python
        # runs to the end at exit): a run that stops, or is preempted with 300 s to save, never waits for downloads.
        self._todo: queue.Queue[int | None] = queue.Queue()
        # The workers hold the reader weakly, so a reader nobody uses is collected (its __del__ stops them).
        self._workers = [
            threading.Thread(
                target=_prefetch_loop, args=(weakref.ref(self), self._todo), name=f"prefetch-{split}-{i}", daemon=True
            )
            for i in range(PREFETCH_WORKERS)
        ]
        self._closed = False
        for worker in self._workers:
            worker.start()
        self._queued: set[int] = set()
        self._inflight: dict[int, threading.Event] = {}  # shard -> set when the thread fetching it is done
        self._dtype = np.dtype(manifest["dtype"])
        # shard -> (its open _MemmapShard, the fetch generation it maps) while the shard is local (main thread only);
        # every download goes through _fetch, which bumps the shard's generation, so a map of an evicted and
        # re-downloaded file (a deleted inode holding disk space) is never reused
        self._maps: dict[int, tuple[Any, int]] = {}
        self._generation = np.zeros(len(self._entries), dtype=np.int64)
        self._lock = threading.Lock()
        self.downloads = 0  # shards this reader fetched (prefetch and on demand): for logs, tests and benches

    def __len__(self) -> int:
        return int(self._ds.num_samples)

    @property
    def num_shards(self) -> int:
        return int(self._ds.num_shards)

    def shard_url(self, shard_id: int) -> str:
        return f"{self.remote}/{self.split}/{self._entries[shard_id]['file']}"

    def is_local(self, shard_id: int) -> bool:
        from streaming.base.dataset import _ShardState

        return int(self._ds._shard_states[shard_id]) == int(_ShardState.LOCAL)

    def cache_usage(self) -> int:
        """Bytes streaming accounts to this reader's cache (index + shards present)."""
        return int(self._ds.cache_usage)

    def _forget(self, shard_id: int) -> None:
        """After a failed fetch: drop the shard's bytes and mark it remote again (streaming leaves it PREPARING)."""
        from streaming.base.dataset import _ShardState

        with contextlib.suppress(Exception):
            self._ds.shards[shard_id].evict()
        for name in (self._entries[shard_id]["file"], self._entries[shard_id]["raw_file"]):
            path = Path(self._ds.streams[0].local) / self.split / name
            path.unlink(missing_ok=True)
            for tmp in path.parent.glob(f"{name}.*"):  # downloader / decompression temporaries
                tmp.unlink(missing_ok=True)
        self._ds._shard_states[shard_id] = _ShardState.REMOTE

    def _fetch(self, shard_id: int) -> None:
        """Make the shard local (download, xxh64 check, decompress: streaming's prepare_shard, which evicts under the
        cache limit) or wait for the thread already fetching it; a local shard is only marked as just used (LRU)."""
        with self._lock:
            done = self._inflight.get(shard_id)
            if done is None:
                if self.is_local(shard_id):
                    self._ds._shard_access_times[shard_id] = time.time_ns()
                    return
                done = self._inflight[shard_id] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            done.wait()  # if that fetch failed, the caller finds no file and fetches (and reports) itself
            return
        try:
            self._ds.prepare_shard(shard_id, blocking=True)
            with self._lock:
                self.downloads += 1
                self._generation[shard_id] += 1
        except BaseException:
            self._forget(shard_id)  # before waiters wake: they must find the shard remote, not half-fetched
            raise
        finally:
            with self._lock:
                del self._inflight[shard_id]
            done.set()

    def _prefetch_one(self, shard_id: int) -> None:
        try:
            self._fetch(shard_id)
        except Exception:
            pass  # _fetch left the shard remote; the step that needs it fetches it again and reports the error
        finally:
            with self._lock:
                self._queued.discard(shard_id)

    def prefetch(self, shard_ids: np.ndarray) -> None:
        """Queue downloads of these shards (those not local and not queued), in this order; returns at once."""
        for s in np.asarray(shard_ids, dtype=np.int64).reshape(-1):
            s = int(s)
            with self._lock:
                if s in self._queued or self.is_local(s):
                    continue
                self._queued.add(s)
            self._todo.put(s)

    def _error(self, shard_id: int, exc: Exception) -> StreamedDataError:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Checksum failure" in text:
            why = "its bytes differ from index.json's xxh64 (truncated or damaged upload)"
        elif "not found" in text.lower() or isinstance(exc, FileNotFoundError):
            why = "it is missing on the remote"
        else:
            why = f"download failed after retries ({type(exc).__name__}: {text})"
        return StreamedDataError(
            f"shard {self._entries[shard_id]['file']} of the {self.split} split ({self.shard_url(shard_id)}) cannot "
            f"be read: {why}; upload the prepared folder again (or re-run data_pipeline.prepare), and "
            f"{_unreachable_hint(self.remote)}"
        )

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """int64 [len(indices), seq_len]: the rows at these global row indices (downloading shards as needed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"row indices must lie in [0, {len(self)}); got min {idx.min()}, max {idx.max()}")
        self._drop_evicted_maps()
        out = np.empty((idx.size, self.seq_len), dtype=np.int64)
        starts = self._ds.sample_offset_per_shard
        which = np.searchsorted(starts, idx, side="right") - 1
        for s in np.unique(which):
            s = int(s)
            sel = np.flatnonzero(which == s)
            local = idx[sel] - starts[s]
            out[sel] = self._take(s, local)
        return out

    def _drop_evicted_maps(self) -> None:
        """Forget the memory maps of shards streaming evicted, so their disk space is freed (a map of a deleted file
        would still read correct rows, but would hold the bytes the cache limit released)."""
        from streaming.base.dataset import _ShardState

        if self._maps:
            states = self._ds._shard_states.numpy()
            local = int(_ShardState.LOCAL)
            gone = [s for s, (_, gen) in self._maps.items() if states[s] != local or gen != self._generation[s]]
            for s in gone:
                del self._maps[s]

    def _take(self, shard_id: int, local: np.ndarray, attempts: int = 4) -> np.ndarray:
        """Rows at in-shard indices of one shard, read through a memory map of its cached raw MDS file (the same
        zero-copy reader as a local folder's; a map stays valid if the file is evicted while it is read)."""
        from data_pipeline.readers import _MemmapShard

        entry = self._entries[shard_id]
        mapped = self._maps.get(shard_id)
        if mapped is not None and mapped[1] == self._generation[shard_id] and self.is_local(shard_id):
            # the warm path: no lock, no open; marked used for streaming's LRU as its get_item does
            self._ds._shard_access_times[shard_id] = time.time_ns()
            got = mapped[0].take(local)
            check_token_range(got, local, self.vocab_size, f"shard {self.shard_url(shard_id)}")
            return got
        path = Path(self._ds.streams[0].local) / self.split / entry["raw_file"]
        for attempt in range(attempts):
            try:
                self._fetch(shard_id)
            except Exception as exc:
                raise self._error(shard_id, exc) from None
            try:
                shard = _MemmapShard(path, int(entry["rows"]), self.seq_len, self._dtype, self.shard_url(shard_id))
                got = shard.take(local)
            except FileNotFoundError:  # evicted (or a failed prefetch) between fetch and open: fetch again
                continue
            except Exception as exc:  # a damaged cached copy (found at start, never hashed): download it once more
                self._forget(shard_id)
                if attempt == 0:
                    continue
                raise self._error(shard_id, exc) from None
            check_token_range(got, local, self.vocab_size, f"shard {self.shard_url(shard_id)}")
            self._maps[shard_id] = (shard, int(self._generation[shard_id]))
            return got
        raise StreamedDataError(
            f"shard {entry['file']} of the {self.split} split ({self.shard_url(shard_id)}) was evicted {attempts} "
            "times before it could be read: the cache thrashes; raise data.cache_limit or lower data.shuffle_window"
        )

    def close(self) -> None:
        """Stop the prefetch workers (queued downloads are dropped, running ones finish: waited for) and release the
        cache folder's registration with mosaicml-streaming, so the same folder can be opened again in this process.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._todo.get_nowait()
        for _ in self._workers:
            self._todo.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
        with contextlib.suppress(Exception):  # what StreamingDataset.__del__ does
            self._ds._locals_shm.buf[:4] = np.int32(0).tobytes()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._closed:
                for _ in self._workers:
                    self._todo.put(None)


def _prefetch_loop(reader_ref: weakref.ref, todo: queue.Queue) -> None:
    """A prefetch worker: fetch the reader's queued shards while it exists; None (or a collected reader) ends it."""
    while (shard_id := todo.get()) is not None:
        reader = reader_ref()
        if reader is None:
            return
        reader._prefetch_one(shard_id)
        del reader


def stream_cache_folder(base: str, remote: str, manifest: dict[str, Any], rank: int) -> Path:
    """<base>/<key>/rank<rank>: the key hashes the remote and the manifest's document hash, so two datasets (or a
    re-prepared one) never share a cache folder and a resumed run finds the shards it had."""
    key = hashlib.sha256(f"{remote.rstrip('/')}\n{manifest['source']['documents_sha256']}".encode()).hexdigest()
    return Path(base) / key[:16] / f"rank{rank}"


def open_streamed(
    remote: str,
    tokenizer_name: str,
    seq_len: int,
    vocab_size: int,
    *,
    cache: str,
    rank: int,
    cache_limit: int | None,
    download_timeout: float,
    download_retry: int,
) -> tuple[StreamedRows, StreamedRows, dict[str, Any]]:
    """(train, val, info) of a streamed prepared folder; info has the keys readers.build_datasets reports plus
    ``streamed_from`` and ``stream_cache``. Refuses shards made for another tokenizer, seq_len or vocabulary."""
    from data_pipeline.readers import _prepared_info

    probe = Path(cache) / "manifests" / hashlib.sha256(remote.encode()).hexdigest()[:16] / f"rank{rank}"
    manifest = fetch_remote_manifest(remote, probe, download_timeout, download_retry)
    shards.check_compatible(manifest, tokenizer_name, seq_len, vocab_size, where=remote)
    local = stream_cache_folder(cache, remote, manifest, rank)
    kw = {
        "local": str(local),
        "manifest": manifest,
        "cache_limit": cache_limit,
        "download_timeout": download_timeout,
        "download_retry": download_retry,
    }
    train = StreamedRows(remote, "train", **kw)
    val = StreamedRows(remote, "val", **kw)
    for rows in (train, val):
        if len(rows) != manifest["splits"][rows.split]["rows"]:
            raise StreamedDataError(
                f"{remote}: the {rows.split} index holds {len(rows)} rows, the manifest says "
                f"{manifest['splits'][rows.split]['rows']}; upload the prepared folder again"
            )
    info = {**_prepared_info(remote, manifest), "streamed_from": remote, "stream_cache": str(local)}
    return train, val, info
