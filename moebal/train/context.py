"""Where and how a run computes, and what it changes in the process while it trains.

- :func:`resolve_device` / :func:`resolve_amp_dtype`: "auto" made concrete;
- :func:`run_settings`: deterministic algorithms on CPU and torch's thread count, set for
  the run and restored afterwards;
- :class:`StopSignals`: SIGINT/SIGTERM as a request to stop after the current step (and
  checkpoint), not a kill. The first one sets :attr:`StopSignals.signum`; the training loop
  finishes the step it is in, writes a checkpoint and raises
  :class:`moebal.train.RunInterrupted`. A second one abandons the step at once
  (KeyboardInterrupt); the last checkpoint stays whole, since checkpoints are written
  atomically.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional

import torch

from moebal.train.config import TrainConfig

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bf16" else None


@contextlib.contextmanager
def run_settings(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on CPU and the thread count, restored afterwards."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic and device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(was_threads)
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
