"""The training loop: ``train(model_cfg, train_cfg, out_dir, data=...) -> TrainResult``."""

from moebal.train.config import TrainConfig
from moebal.train.presets import PRESETS, Preset, apply_overrides, get_preset
from moebal.train.trace import RoutingTrace, load_trace, save_trace
from moebal.train.trainer import (
    StepStats,
    Trainer,
    TrainResult,
    WarmupCosine,
    load_result,
    read_metrics,
    resolve_corpus,
    train,
)

__all__ = [
    "PRESETS",
    "Preset",
    "RoutingTrace",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "apply_overrides",
    "get_preset",
    "load_result",
    "load_trace",
    "read_metrics",
    "resolve_corpus",
    "save_trace",
    "train",
]
