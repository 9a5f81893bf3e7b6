"""The trainer's one entry to its data: ``open_training_data(cfg.data, ...)`` -> (train, val, info, stream).

Three sources, one contract (``ShuffledStream.get_with_padding(global sample indices)``):
- raw text (embedded:sotu, .txt, .jsonl[.gz], a folder): tokenized and packed in memory, cached in data.cache_dir;
- a local prepared folder: shards memory-mapped in place (data_pipeline.readers.open_rows);
- a prepared folder in object storage (data.path = s3://..., gs://..., or a local folder with data.stream_cache set):
  streamed through mosaicml-streaming into a local cache with data.cache_limit (data_pipeline.remote).
The row order is data.shuffle (feistel | permutation) with data.shuffle_window; info records both, and the
resume check refuses a checkpoint whose order differs (see bd3_megatron.training.resume_check).
"""

from __future__ import annotations

from typing import Any

from data_pipeline import shards
from data_pipeline.dataset import ShuffledStream
from data_pipeline.tokenizers import Tokenizer


def is_streamed(d: Any) -> bool:
    """Whether data.path is read through the stream cache: a URL always, a local prepared folder with stream_cache."""
    from data_pipeline.remote import is_url

    return is_url(d.path) or (d.stream_cache is not None and shards.is_prepared_dir(d.path))


def open_training_data(
    d: Any, tokenizer: Tokenizer, seq_len: int, *, seed: int, rank: int = 0
) -> tuple[Any, Any, dict[str, Any], ShuffledStream]:
    """(train rows, val rows, data info, the training stream) for a DataConfig ``d``.

    rank: this process's global rank (names its stream cache folder). Raises FileNotFoundError / ValueError (the
    launcher's one ``error:`` line) for a missing or incompatible dataset, an unreachable or damaged remote, a
    stream cache that cannot be placed, or a cache limit below the train split with a global shuffle.
    """
    from bd3_megatron.config import parse_bytes

    if is_streamed(d):
        from data_pipeline.remote import open_streamed

        cache = d.stream_cache or (f"{d.cache_dir}/stream" if d.cache_dir else None)
        if cache is None:
            raise ValueError(f"data.path {d.path} is streamed and needs a local cache folder: set data.stream_cache")
        limit = parse_bytes(d.cache_limit) if d.cache_limit is not None else None
        train, val, info = open_streamed(
            d.path,
            tokenizer.name,
            seq_len,
            tokenizer.vocab_size,
            cache=cache,
            rank=rank,
            cache_limit=limit,
            download_timeout=d.download_timeout,
            download_retry=d.download_retry,
        )
        try:
            _check_limit(d, limit, train)
        except ValueError:
            train.close()
            val.close()
            raise
    else:
        from data_pipeline.readers import build_datasets

        train, val, info = build_datasets(d.path, tokenizer, seq_len, d.val_docs, d.cache_dir, verify=d.verify_shards)
    stream = ShuffledStream(train, seed=seed, shuffle=d.shuffle, window_shards=d.shuffle_window)
    return train, val, {**info, "shuffle": d.shuffle, "shuffle_window": d.shuffle_window}, stream


def _check_limit(d: Any, limit: int | None, train: Any) -> None:
    """Refuse a cache limit under which the shuffle would download shards again and again (ValueError, one line)."""
    train_bytes = int(sum(int(n) for n in train.shard_bytes))
    if limit is None or limit >= train_bytes:
        return
    if d.shuffle_window == 0:
        raise ValueError(
            f"data.cache_limit={d.cache_limit} is below the train split's {train_bytes} bytes, and "
            f"data.shuffle_window=0 shuffles over all {train.num_shards} shards (every step would download "
            "shards anew); set data.shuffle_window to a number of shards whose two windows fit the limit"
        )
    two_windows = (2 * d.shuffle_window + 2) * train.largest_shard  # current + prefetched + in flight
    if limit < two_windows:
        raise ValueError(
            f"data.cache_limit={d.cache_limit} cannot hold two shuffle windows of data.shuffle_window="
            f"{d.shuffle_window} shards of up to {train.largest_shard} bytes ({two_windows} bytes with the "
            "downloads in flight), so shards would be downloaded again within a window; raise "
            "data.cache_limit or lower data.shuffle_window"
        )
