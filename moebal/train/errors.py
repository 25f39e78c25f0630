"""The ways a training run stops other than by finishing, as types.

- :class:`NonFiniteLoss`: the loss or the gradient norm of a step was NaN/inf (the run
  diverged; the step was not taken). A result, not a fault: ``train()`` records it in
  ``TrainResult.diverged_step`` and the comparison reports the run as failed for good.
- :class:`RunInterrupted`: SIGINT/SIGTERM; a checkpoint was written first, so the run
  continues with ``--resume``. The CLI exits with 128 + the signal number.
- :class:`ResumeError`: ``--resume`` cannot continue this run folder (no checkpoint for
  the steps already logged); :class:`CheckpointError`: the checkpoint is truncated, damaged
  or not a moebal checkpoint. Both are ValueErrors (bad input), and a comparison retries
  the run from the start instead of counting it as a failure.
- :class:`RunFolderBusy`: another live process holds the run folder's lock.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional


class NonFiniteLoss(ArithmeticError):
    """Step ``step`` had a non-finite loss or gradient norm; nothing was updated."""

    def __init__(self, step: int, loss: float, reason: str) -> None:
        super().__init__(reason)
        self.step, self.loss, self.reason = step, loss, reason


class RunInterrupted(Exception):
    """A signal stopped the run after step ``step``; ``checkpoint`` is where it stands."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name if signum in iter(signal.Signals) else str(signum)
        where = (f"checkpoint written to {str(checkpoint)}" if checkpoint is not None
                 else "no run folder, nothing saved")
        super().__init__(f"interrupted by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class ResumeError(ValueError):
    """``--resume`` cannot continue this run folder."""


class CheckpointError(ResumeError):
    """A checkpoint file that cannot be used (missing, truncated, damaged, foreign)."""


class RunFolderBusy(ValueError):
    """Another live process holds the run folder."""
