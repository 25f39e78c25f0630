"""Named model + training configurations (see docs/training.md for sizes and timings).

- ``micro``: the tests' preset, a couple of seconds on a CPU.
- ``tiny``: the demo, about a minute on 2 CPU cores.
  Both run torch on one thread: their matrices are too small to gain from a second one,
  and on a busy machine a second thread makes every product wait for the slower one.
- ``small``: the evening comparison on a CPU (also fine on a GPU).
- ``paper-16e`` / ``paper-64e``: shaped after the BIP paper's 16-expert (0.3B) and
  64-expert (1.1B) MiniMind-based models, for GPU users.

``get_preset(name)`` returns fresh copies; ``apply_overrides`` applies ``key=value``
strings (``--set``) to either config.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from moebal.model import ModelConfig
from moebal.train.config import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig


def _preset(name: str, description: str, model: dict[str, Any], train: dict[str, Any]) -> Preset:
    return Preset(name, description, ModelConfig(**model), TrainConfig(**train))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(
            "micro", "tests: 2 layers, d 32, 4 experts top-2; seconds on a CPU",
            dict(vocab_size=512, seq_len=32, d_model=32, n_layers=2, n_heads=2,
                 num_experts=4, top_k=2, expert_hidden=32),
            dict(steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=5, eval_every=10,
                 eval_batches=2, threads=1),
        ),
        _preset(
            "tiny", "demo: 4 layers, d 128, 8 experts top-2; about a minute on 2 CPU cores",
            dict(vocab_size=4096, seq_len=128, d_model=128, n_layers=4, n_heads=4,
                 num_experts=8, top_k=2, expert_hidden=128),
            dict(steps=200, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=20, eval_every=50,
                 eval_batches=8, threads=1),
        ),
        _preset(
            "small", "evening comparison: 4 layers, d 256, 16 experts top-2, 4.1M tokens",
            dict(vocab_size=8192, seq_len=256, d_model=256, n_layers=4, n_heads=4,
                 num_experts=16, top_k=2, expert_hidden=256),
            dict(steps=1000, batch_size=16, lr=1.5e-3, min_lr=1.5e-4, warmup=50,
                 eval_every=200, eval_batches=32, checkpoint_every=200),
        ),
        _preset(
            "paper-16e", "after the BIP paper's 16-expert 0.3B MiniMind model (GPU)",
            dict(vocab_size=6400, seq_len=512, d_model=512, n_layers=8, n_heads=8,
                 num_experts=16, top_k=2, expert_hidden=1408, num_shared_experts=1,
                 router_options={"norm_topk_prob": True}),
            dict(steps=10000, batch_size=32, grad_accum=2, lr=5e-4, min_lr=5e-5, warmup=500,
                 eval_every=500, eval_batches=32, checkpoint_every=1000),
        ),
        _preset(
            "paper-64e", "after the BIP paper's 64-expert 1.1B MiniMind model (GPU)",
            dict(vocab_size=6400, seq_len=512, d_model=512, n_layers=8, n_heads=8,
                 num_experts=64, top_k=2, expert_hidden=1408, num_shared_experts=1,
                 router_options={"norm_topk_prob": True}),
            dict(steps=10000, batch_size=32, grad_accum=2, lr=5e-4, min_lr=5e-5, warmup=500,
                 eval_every=500, eval_batches=32, checkpoint_every=1000),
        ),
    )
}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Fresh copies of the preset's (ModelConfig, TrainConfig)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    return copy.deepcopy(p.model), copy.deepcopy(p.train)


def parse_value(text: str) -> Any:
    """A Python literal (int, float, bool, None, list, dict, quoted str), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def apply_overrides(
    model_cfg: ModelConfig, train_cfg: TrainConfig, overrides: Iterable[str]
) -> tuple[ModelConfig, TrainConfig]:
    """New configs with each ``key=value`` applied to whichever config has the field.

    ``router.<option>=value`` (or ``router_options.<option>``) sets one router option,
    e.g. ``router.aux_loss_coeff=0.01``. Unknown keys and invalid values raise ValueError.
    """
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    router_options = copy.deepcopy(model_cfg.router_options)
    overrides = list(overrides)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        value = parse_value(raw)
        if key.startswith(("router.", "router_options.")):
            router_options[key.split(".", 1)[1]] = value
        elif key in model_fields:
            model_changes[key] = value
        elif key in train_fields:
            train_changes[key] = value
        else:
            raise ValueError(
                f"unknown setting {key!r} in {item!r}; model fields: {sorted(model_fields)}; "
                f"train fields: {sorted(train_fields)}; router options as router.<name>"
            )
    if router_options != model_cfg.router_options and "router_options" not in model_changes:
        model_changes["router_options"] = router_options
    try:
        return (dataclasses.replace(model_cfg, **model_changes),
                dataclasses.replace(train_cfg, **train_changes))
    except (TypeError, ValueError) as exc:
        if len(overrides) > 1:  # name the one refused on its own
            for item in overrides:
                apply_overrides(model_cfg, train_cfg, [item])
        key, _, raw = overrides[0].partition("=") if len(overrides) == 1 else ("", "", "")
        what = f"--set {key.strip()}={raw.strip()}" if key else "--set " + " ".join(overrides)
        raise ValueError(f"{what}: {exc}") from None
