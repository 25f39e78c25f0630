"""The tokenized corpus: byte-level BPE, token streams on disk, a cache keyed by the inputs.

``load_corpus(DataConfig(...))`` reads the documents (:mod:`moebal.data.sources`), splits
off the validation documents, trains a byte-level BPE tokenizer on the training documents
only (HF ``tokenizers``; or loads the user's ``tokenizer.json``), and writes each split as one
flat token stream (documents joined by the end-of-text token) in a ``.bin`` file of
``uint16`` (vocabulary <= 65,536) or ``uint32``, read back with ``np.memmap``.

Everything lands in ``<cache>/corpus-<key>/`` (cache: ``DataConfig.cache_dir``, else
``$MOEBAL_CACHE``, else ``~/.cache/moebal``). The key hashes what the result depends on:
the source files' paths, sizes and modification times (not their contents, so a cache hit
reads no text), the vocabulary size, the user tokenizer's contents, the text field, the
validation fraction and the ``tokenizers`` version. A second run with the same inputs opens
the memory maps and starts at once. The folder is built under a temporary name and renamed
into place, so an interrupted build leaves no half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from moebal.data.sources import (
    Document,
    SourceFile,
    default_source_files,
    read_default_documents,
    read_user_documents,
    split_documents,
    user_source_files,
)

CACHE_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "[SEP]")
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token
ENCODE_CHUNK = 256  # documents per encode_batch call


@dataclass
class DataConfig:
    """What corpus to train on.

    path            None: the default corpus (Shakespeare + Wikipedia summaries); else a text
                    file, a folder of .txt files or a .jsonl file.
    text_field      the JSONL field holding each document's text.
    tokenizer       a user ``tokenizer.json`` (HF tokenizers); None: train byte-level BPE.
    vocab_size      size of the BPE vocabulary to train (ignored with ``tokenizer``).
    val_fraction    share of each source's documents held out for validation.
    cache_dir       None: ``$MOEBAL_CACHE`` or ``~/.cache/moebal``.
    """

    path: Optional[str] = None
    text_field: str = "text"
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    val_fraction: float = 0.05
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {self.vocab_size!r}")
        if self.tokenizer is None and not MIN_VOCAB <= self.vocab_size <= 2**31 - 1:
            raise ValueError(
                f"vocab_size must be at least {MIN_VOCAB} (256 bytes + end-of-text), "
                f"got {self.vocab_size!r}"
            )
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if self.tokenizer is not None and not Path(self.tokenizer).expanduser().is_file():
            raise ValueError(f"tokenizer file {self.tokenizer!r} does not exist")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOEBAL_CACHE") or Path.home() / ".cache" / "moebal")


@dataclass
class Corpus:
    """A tokenized corpus: ``train``/``val`` are 1-D memory-mapped token arrays."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any  # tokenizers.Tokenizer
    vocab_size: int
    eos_id: Optional[int]
    directory: Path
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False
    load_seconds: float = 0.0

    def identity(self) -> dict[str, Any]:
        """What tells this corpus from another: its cache key, vocabulary and sizes."""
        return {"key": self.key, "vocab_size": self.vocab_size,
                "train_tokens": int(len(self.train)), "val_tokens": int(len(self.val))}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return (
            f"Corpus(train={len(self.train):,} tokens, val={len(self.val):,} tokens, "
            f"vocab={self.vocab_size}, dir={str(self.directory)!r})"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sources(config: DataConfig) -> tuple[str, list[SourceFile]]:
    if config.path is None:
        return "default", default_source_files()
    return "user", user_source_files(config.path)


def corpus_key(config: DataConfig, files: Sequence[SourceFile], kind: str) -> str:
    """Hash of everything the tokenized corpus depends on (see the module docstring)."""
    import tokenizers

    jsonl = any(f.path.lower().endswith((".jsonl", ".ndjson")) for f in files)
    spec = {
        "version": CACHE_VERSION,
        "kind": kind,
        "sources": [[f.path, f.size, f.mtime_ns] for f in files],
        "text_field": config.text_field if jsonl else None,
        "tokenizer": (
            "sha256:" + _sha256_file(Path(config.tokenizer).expanduser())
            if config.tokenizer is not None
            else f"bytelevel-bpe:{config.vocab_size}"
        ),
        "val_fraction": float(config.val_fraction),
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def train_bpe(texts: Iterable[str], vocab_size: int, length: Optional[int] = None,
              progress: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) with ``<|endoftext|>`` = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def find_eos(tokenizer) -> Optional[int]:
    for token in EOS_CANDIDATES:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return int(tid)
    return None


def _write_stream(
    path: Path, docs: Sequence[Document], tokenizer, eos_id: Optional[int], dtype: np.dtype,
    progress: bool, desc: str,
) -> int:
    """Encode ``docs`` (each followed by end-of-text) into ``path``; returns the token count."""
    from tqdm.auto import tqdm

    n = 0
    high = np.iinfo(dtype).max
    with open(path, "wb") as fh, tqdm(
        total=len(docs), desc=desc, unit="doc", disable=not progress, leave=False
    ) as bar:
        for i in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[i: i + ENCODE_CHUNK]
            for enc in tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False):
                ids = enc.ids + ([eos_id] if eos_id is not None else [])
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and arr.max() > high:
                    raise ValueError(f"token id {int(arr.max())} does not fit {dtype}")
                fh.write(arr.astype(dtype).tobytes())
                n += arr.size
            bar.update(len(chunk))
    return n


def load_tokenizer(path: Path, what: str):
    """A ``tokenizers`` tokenizer from its JSON file; ValueError naming ``what`` when the
    file is not one (truncated, another format)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what} {str(path)!r} is not a tokenizers JSON file ({first})") from None


def _open(directory: Path, key: str, load_seconds: float, cache_hit: bool) -> Corpus:
    damaged = (f"the corpus cache {str(directory)!r} is damaged; delete that folder and it "
               "is rebuilt")
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        counts = {split: int(meta[f"{split}_tokens"]) for split in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{damaged} (meta.json: {exc})") from None
    streams = {}
    for split, count in counts.items():
        file = directory / f"{split}.bin"
        size = file.stat().st_size if file.is_file() else -1
        if size != count * dtype.itemsize:
            raise ValueError(f"{damaged} ({file.name} holds {max(size, 0):,} bytes, "
                             f"expected {count * dtype.itemsize:,})")
        streams[split] = (np.memmap(file, dtype=dtype, mode="r", shape=(count,))
                          if count else np.zeros(0, dtype=dtype))
    try:
        tokenizer = load_tokenizer(directory / "tokenizer.json", "cached tokenizer")
    except ValueError as exc:
        raise ValueError(f"{damaged} ({exc})") from None
    return Corpus(
        train=streams["train"],
        val=streams["val"],
        tokenizer=tokenizer,
        vocab_size=int(meta["vocab_size"]),
        eos_id=meta["eos_id"],
        directory=directory,
        key=key,
        meta=meta,
        cache_hit=cache_hit,
        load_seconds=load_seconds,
    )


def load_corpus(config: Optional[DataConfig] = None, progress: bool = True) -> Corpus:
    """Tokenized train/validation streams for ``config``, built once and then cached.

    Raises ValueError for a missing or empty data path, a JSONL without the text field, a
    missing default corpus (with the install command) or a bad vocabulary size.
    """
    t0 = time.perf_counter()
    config = config or DataConfig()
    config.validate()
    kind, files = _sources(config)
    key = corpus_key(config, files, kind)
    cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    directory = cache / f"corpus-{key}"
    if (directory / "meta.json").is_file():
        return _open(directory, key, time.perf_counter() - t0, cache_hit=True)

    docs = read_default_documents(files) if kind == "default" else read_user_documents(
        config.path, config.text_field, files
    )
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".corpus-{key}.", dir=cache))
    try:
        if config.tokenizer is not None:
            tokenizer = load_tokenizer(Path(config.tokenizer).expanduser(), "--tokenizer")
        else:
            tokenizer = train_bpe(
                (d.text for d in train_docs), config.vocab_size, len(train_docs), progress
            )
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        eos_id = find_eos(tokenizer)
        dtype = token_dtype(vocab_size)
        counts = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            counts[split] = _write_stream(
                tmp / f"{split}.bin", split_docs, tokenizer, eos_id, dtype, progress,
                f"tokenizing {split}",
            )
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "kind": kind,
            "data": config.path,
            "text_field": config.text_field,
            "tokenizer": config.tokenizer or "bytelevel-bpe",
            "vocab_size": vocab_size,
            "vocab_size_asked": config.vocab_size if config.tokenizer is None else None,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "val_fraction": config.val_fraction,
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_chars": sum(len(d.text) for d in train_docs),
            "val_chars": sum(len(d.text) for d in val_docs),
            "val_names": [d.name for d in val_docs],
            "sources": [[f.path, f.size, f.mtime_ns] for f in files],
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:  # built concurrently by another process: keep theirs
            if not (directory / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(directory, key, time.perf_counter() - t0, cache_hit=False)


def resolve_corpus(data: Any, vocab_size: int = 8192, progress: bool = True) -> Corpus:
    """A loaded corpus from ``data``: a :class:`Corpus` (returned as is), a
    :class:`DataConfig`, a path (file, folder of .txt, JSONL) or None (the default corpus);
    ``vocab_size`` is the BPE vocabulary trained for a path or None."""
    if isinstance(data, Corpus):
        return data
    if isinstance(data, DataConfig):
        return load_corpus(data, progress=progress)
    if data is None:
        return load_corpus(DataConfig(vocab_size=vocab_size), progress=progress)
    if isinstance(data, (str, os.PathLike)):
        return load_corpus(DataConfig(path=str(data), vocab_size=vocab_size), progress=progress)
    raise TypeError(f"data must be a Corpus, DataConfig, path or None, got {type(data).__name__}")
