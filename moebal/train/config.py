"""The training loop's one configuration dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moebal.model.config import ModelConfig, dataclass_from_dict

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """How to train.

    steps           optimizer steps.
    batch_size      sequences per micro-batch (each ``ModelConfig.seq_len`` tokens long).
    grad_accum      micro-batches per optimizer step; the global batch is
                    ``batch_size * grad_accum`` sequences.
    lr, min_lr      peak learning rate and the floor of the cosine decay.
    warmup          steps of linear warmup from lr/warmup to lr.
    weight_decay    AdamW decay of matrices (never of norms, biases or the embedding).
    beta1, beta2    AdamW betas.
    clip            max global gradient norm (0 = no clipping; the norm is logged anyway).
    eval_every      evaluate every N steps (and after the last step); 0 = only at the end.
    eval_batches    batches of the fixed validation windows per evaluation.
    seed            seeds the initial weights and the order of the training windows.
    device          "auto" (cuda when available), "cpu" or "cuda".
    dtype           "auto" (fp32 on CPU, bf16 autocast on CUDA), "fp32" or "bf16".
    log_every       write a train record to metrics.jsonl every N steps (1 = every step).
    checkpoint_every
                    write checkpoint.pt every N steps (0 = no step count; a checkpoint is
                    also written after the last step, on SIGINT/SIGTERM and on the clock).
    checkpoint_interval_s
                    also write checkpoint.pt when this many seconds of wall time have
                    passed since the last one (0 = never on the clock).
    trace           record the routing trace (trace.npz, see docs/traces.md).
    trace_shards    groups the global batch's sequences are split into in the trace, as if
                    they came from that many data-parallel ranks.
    deterministic   torch.use_deterministic_algorithms on CPU while training.
    router_timing   measure the gate + router share of the step time.
    optimal_gap     at step 1 and every ``eval_every`` steps, measure each MoE layer's
                    routing-score gap to the exact balanced optimum of the first
                    micro-batch (``moebal.metrics.optimal_score_gap``).
    threads         CPU threads torch uses while training (0 = leave torch's setting).
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    log_every: int = 1
    checkpoint_every: int = 0
    checkpoint_interval_s: float = 600.0
    trace: bool = False
    trace_shards: int = 8
    deterministic: bool = True
    router_timing: bool = True
    optimal_gap: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        ints = {
            "steps": 1, "batch_size": 1, "grad_accum": 1, "warmup": 0, "eval_every": 0,
            "eval_batches": 1, "seed": 0, "log_every": 1, "checkpoint_every": 0,
            "trace_shards": 1, "threads": 0,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        floats = {"lr": False, "min_lr": True, "weight_decay": True, "clip": True,
                  "checkpoint_interval_s": True}
        for name, zero_ok in floats.items():
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok)):
                raise ValueError(
                    f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value!r}"
                )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr!r} exceeds lr={self.lr!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("trace", "deterministic", "router_timing", "optimal_gap"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.trace and self.global_batch % self.trace_shards:
            raise ValueError(
                f"trace_shards={self.trace_shards} must divide the global batch of "
                f"batch_size * grad_accum = {self.global_batch} sequences"
            )

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, d)


# Fields that may differ between a checkpoint and the run resuming it (and between an
# interrupted comparison and the one continuing it): they change what is written and how
# often, never a number the run reports. (The device can change the numbers' last digits; a
# comparison records and checks its device separately.)
RESUME_FREE_FIELDS = ("log_every", "checkpoint_every", "checkpoint_interval_s", "device",
                      "router_timing", "threads")


def check_configs(model_cfg: Any, train_cfg: Any) -> None:
    """TypeError unless a ModelConfig and a TrainConfig; ValueError unless both are valid."""
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    model_cfg.validate()
    train_cfg.validate()
