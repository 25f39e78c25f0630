"""The corpus, the tokenizer and the batches the model trains on.

    corpus = load_corpus(DataConfig())           # default corpus, BPE 8192, cached
    sampler = BatchSampler(corpus.train, seq_len=256, seed=0)
    x_BS, y_BS = sampler.next_batch(16)
"""

from moebal.data.batches import BatchSampler, eval_batches, eval_windows, windows_to_batch
from moebal.data.corpus import (
    Corpus,
    DataConfig,
    default_cache_dir,
    find_eos,
    load_corpus,
    resolve_corpus,
    token_dtype,
    train_bpe,
)
from moebal.data.sources import (
    INSTALL_HINT,
    Document,
    cut_into_pieces,
    default_source_files,
    read_default_documents,
    read_user_documents,
    split_documents,
    strip_gutenberg,
)

__all__ = [
    "INSTALL_HINT",
    "BatchSampler",
    "Corpus",
    "DataConfig",
    "Document",
    "cut_into_pieces",
    "default_cache_dir",
    "default_source_files",
    "eval_batches",
    "eval_windows",
    "find_eos",
    "load_corpus",
    "read_default_documents",
    "read_user_documents",
    "resolve_corpus",
    "split_documents",
    "strip_gutenberg",
    "token_dtype",
    "train_bpe",
    "windows_to_batch",
]
