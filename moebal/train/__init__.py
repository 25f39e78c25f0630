"""The training loop: ``train(model_cfg, train_cfg, out_dir, data=...) -> TrainResult``.

Modules: :mod:`~moebal.train.trainer` (the loop), :mod:`~moebal.train.run` (``train()``),
:mod:`~moebal.train.rundir` (the run folder: lock, checkpoints, resume rules),
:mod:`~moebal.train.results`, :mod:`~moebal.train.optim`, :mod:`~moebal.train.state`,
:mod:`~moebal.train.context`, :mod:`~moebal.train.errors`, :mod:`~moebal.train.config`,
:mod:`~moebal.train.presets`, :mod:`~moebal.train.trace`.
"""

from moebal.data import resolve_corpus
from moebal.train.config import RESUME_FREE_FIELDS, TrainConfig
from moebal.train.errors import (
    CheckpointError,
    NonFiniteLoss,
    ResumeError,
    RunFolderBusy,
    RunInterrupted,
)
from moebal.train.optim import WarmupCosine, param_groups
from moebal.train.presets import PRESETS, Preset, apply_overrides, get_preset
from moebal.train.results import History, StepStats, TrainResult, load_result
from moebal.train.rundir import RunDir, load_checkpoint, read_metrics, save_checkpoint
from moebal.train.run import train
from moebal.train.trace import RoutingTrace, load_trace, save_trace
from moebal.train.trainer import Trainer

__all__ = [
    "PRESETS",
    "RESUME_FREE_FIELDS",
    "CheckpointError",
    "History",
    "NonFiniteLoss",
    "Preset",
    "ResumeError",
    "RoutingTrace",
    "RunDir",
    "RunFolderBusy",
    "RunInterrupted",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "apply_overrides",
    "get_preset",
    "load_checkpoint",
    "load_result",
    "load_trace",
    "param_groups",
    "read_metrics",
    "resolve_corpus",
    "save_checkpoint",
    "save_trace",
    "train",
]
