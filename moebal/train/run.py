"""``train(model_cfg, train_cfg, out_dir, data=...) -> TrainResult``: one whole run.

The run folder (see :mod:`moebal.train.rundir` and docs/training.md): ``config.json``,
``metrics.jsonl`` (one JSON record per line: ``type`` "train", "eval", "diverged"),
``checkpoint.pt``, ``trace.npz`` (with ``TrainConfig.trace``) and ``result.json`` (the
:class:`TrainResult`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional, Union

from moebal.data import Corpus, DataConfig, resolve_corpus
from moebal.model import ModelConfig
from moebal.train.config import TrainConfig, check_configs
from moebal.train.errors import ResumeError
from moebal.train.results import History, TrainResult, load_result
from moebal.train.rundir import CONTINUE, FINISHED, RunDir, compatibility_problems
from moebal.train.trace import load_trace
from moebal.train.trainer import Trainer

DataLike = Union[Corpus, DataConfig, str, os.PathLike, None]


def finished_result(trainer: Trainer) -> TrainResult:
    """The result of the finished run in ``trainer.run`` (its checkpoint deleted), after
    checking that its config.json is this run's configuration."""
    run = trainer.run
    if not (run / "config.json").is_file():
        raise ResumeError(f"cannot resume {str(run.path)!r}: result.json without config.json")
    saved = run.read_json("config.json")
    problems = compatibility_problems(saved, trainer.identity())
    if problems:
        raise ValueError(f"{str(run.path)!r} holds a finished run of another configuration "
                         f"(saved != now): " + "; ".join(problems))
    return load_result(run.path)


def continue_from_checkpoint(trainer: Trainer) -> Optional[TrainResult]:
    """Load the run's checkpoint, drop the records after it, take the history and trace
    it covers; returns the result when the checkpoint is of the finished run."""
    run = trainer.run
    trainer.load_checkpoint(trainer.checkpoint_file)
    if trainer.step >= trainer.train_cfg.steps and run.result_file.is_file():
        return load_result(run.path)  # finished already
    if trainer.is_main:
        trainer.history = History.from_records(run.keep_records_until(trainer.step))
        trace_file = run / "trace.npz"
        if trainer.tracer is not None and trace_file.is_file():
            trainer.tracer.load(load_trace(trace_file).truncate(trainer.step))
    return None


def write_config(trainer: Trainer, **extra: Any) -> None:
    """config.json: preset, both configurations, the data, parameter counts (+ ``extra``)."""
    corpus = trainer.corpus
    meta = corpus.meta
    data = {**trainer.data_identity(), "directory": str(corpus.directory),
            "source": meta.get("data"), "tokenizer": meta.get("tokenizer")}
    if meta.get("vocab_size_asked") not in (None, corpus.vocab_size):
        data["vocab_size_asked"] = meta["vocab_size_asked"]
    trainer.run.write_json("config.json", {
        "preset": trainer.preset,
        "model": trainer.model_cfg.to_dict(),
        "train": trainer.train_cfg.to_dict(),
        "data": data,
        "params": trainer.model.num_params(),
        "active_params": trainer.model.num_params(active=True),
        **extra,
    })


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Union[str, os.PathLike, None] = None,
    data: DataLike = None,
    *,
    preset: str = "",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one model and return its :class:`TrainResult`.

    model_cfg   the model; its ``vocab_size`` is replaced by the tokenizer's.
    train_cfg   the training run.
    out_dir     run folder (None: write nothing), locked while the run works in it. A
                folder holding a run is refused unless ``resume`` (continue from its
                checkpoint.pt; a finished run returns at once; steps logged but no
                checkpoint: ResumeError, nothing deleted) or ``force`` (start afresh,
                deleting it).
    data        a loaded :class:`Corpus` (reuse it across runs), a :class:`DataConfig`,
                a path (file, folder of .txt, JSONL), or None for the default corpus; for a
                path or None the BPE vocabulary is ``model_cfg.vocab_size``.

    All bad input (configs, data, the folder, a checkpoint that is damaged or from another
    configuration) raises ValueError/TypeError before the first step. SIGINT/SIGTERM
    checkpoint and raise :class:`moebal.train.RunInterrupted`.
    """
    check_configs(model_cfg, train_cfg)
    run = RunDir(out_dir) if out_dir is not None else None
    with run.locked() if run is not None else contextlib.nullcontext():
        if run is not None:
            run.remove_temp_files()
            run.check_request(resume, force)  # before the corpus is tokenised
        corpus = resolve_corpus(data, vocab_size=model_cfg.vocab_size, progress=progress)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=corpus.vocab_size)
        trainer = Trainer(model_cfg, train_cfg, corpus, run, preset=preset)
        if run is not None:
            decision = run.decide(resume, force, trainer.checkpoint_file)
            if decision == FINISHED:
                return finished_result(trainer)
            if decision == CONTINUE:
                done = continue_from_checkpoint(trainer)
                if done is not None:
                    return done
            else:
                run.clear()
            write_config(trainer)
        return trainer.fit(progress=progress)
