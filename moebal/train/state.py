"""A trainer's (:class:`moebal.train.Trainer`) checkpoint state: what :meth:`Trainer.state_dict` holds and how it is put back.

The state is everything a resumed run needs to continue exactly: the model (balancer state
lives in its buffers), optimizer, scheduler, the batch sampler's generator, the
BalanceTracker, the Python/NumPy/torch(/CUDA) RNG states, the running totals, the
evaluations so far, and the identity (both configurations and the corpus) that
:func:`check_compatible` compares before anything is loaded.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from moebal.train.rundir import compatibility_problems

CHECKPOINT_VERSION = 1
TOTALS = ("tokens_seen", "train_seconds", "router_seconds", "wall_seconds", "last_loss")


def rng_state() -> dict[str, Any]:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def capture(trainer: Any) -> dict[str, Any]:
    """The trainer's state (see the module docstring)."""
    identity = trainer.identity()
    return {
        "format": CHECKPOINT_VERSION,
        "step": trainer.step,
        "preset": trainer.preset,
        "model_config": identity["model"],
        "train_config": identity["train"],
        "data": identity["data"],
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "sampler": trainer.sampler.state_dict(),
        "tracker": trainer.tracker.state_dict() if trainer.tracker is not None else None,
        "rng": rng_state(),
        "totals": {name: getattr(trainer, name) for name in TOTALS},
        "evals": list(trainer.evals),
        "optimal_gaps": list(trainer.optimal_gaps),
    }


def check_compatible(trainer: Any, state: dict[str, Any], source: str) -> None:
    """ValueError unless ``state`` comes from a run with this model, training config (up
    to RESUME_FREE_FIELDS) and corpus."""
    if state.get("format") != CHECKPOINT_VERSION:
        raise ValueError(f"{source} has format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_VERSION}")
    saved = {"model": state.get("model_config"), "train": state.get("train_config"),
             "data": state.get("data")}
    problems = compatibility_problems(saved, trainer.identity())
    if problems:
        raise ValueError(
            f"{source} is from another configuration (saved != now): " + "; ".join(problems)
        )


def restore(trainer: Any, state: dict[str, Any], source: str) -> None:
    """Put ``state`` back into ``trainer`` (after :func:`check_compatible`)."""
    check_compatible(trainer, state, source)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.sampler.load_state_dict(state["sampler"])
    if trainer.tracker is not None:
        trainer.tracker.load_state_dict(state["tracker"])
    trainer.step = int(state["step"])
    totals = state["totals"]
    trainer.tokens_seen = int(totals["tokens_seen"])
    for name in TOTALS[1:]:
        setattr(trainer, name, float(totals[name]))
    trainer.evals = list(state["evals"])
    trainer.optimal_gaps = list(state.get("optimal_gaps", []))
    set_rng_state(state["rng"])
    trainer.model.set_auto_step(False)  # routers keep stepping explicitly (see Trainer.__init__)
