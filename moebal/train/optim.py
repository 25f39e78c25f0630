"""The optimizer and its schedule: AdamW with decay on matrices only, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any

import torch

from moebal.train.config import TrainConfig


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to min_lr/lr."""

    def __init__(self, steps: int, warmup: int, lr: float, min_lr: float) -> None:
        self.steps, self.warmup, self.floor = steps, warmup, min_lr / lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and expert tensors; not norms, biases or embeddings
    (the output layer is tied to the embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` (fused on CUDA) and its :class:`WarmupCosine`."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=(device.type == "cuda") or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
    )
    return optimizer, scheduler
