"""Sequence packing in "wrap" mode, as BD3-LM trains on OpenWebText.

Every document is followed by one EOS and the resulting stream is cut into fixed-length rows, so no
token is padding and documents may span row boundaries. The final partial row is dropped so every row
has exactly seq_len real tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def pack_wrap(docs_tokens: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Rows [num_rows, seq_len] of the stream doc0 EOS doc1 EOS ...; int32 when ids fit, else int64."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative token id, got {eos_id}")
    eos = np.array([eos_id], dtype=np.int64)
    pieces: list[np.ndarray] = []
    for doc in docs_tokens:
        pieces.append(np.asarray(doc, dtype=np.int64).reshape(-1))
        pieces.append(eos)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if stream.size and stream.min() < 0:
        raise ValueError("token ids must be non-negative; found a negative id in the documents")
    num_rows = stream.size // seq_len
    rows = stream[: num_rows * seq_len].reshape(num_rows, seq_len)
    dtype = np.int32 if (rows.size == 0 or rows.max() <= _INT32_MAX) else np.int64
    return np.ascontiguousarray(rows, dtype=dtype)


def unpack_stream(rows: np.ndarray) -> np.ndarray:
    """The flat token stream of packed rows (inverse of pack_wrap up to the dropped tail)."""
    return np.asarray(rows).reshape(-1)
