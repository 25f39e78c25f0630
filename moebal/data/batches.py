"""Fixed-length training and evaluation batches from a flat token stream.

A window is ``seq_len + 1`` consecutive tokens; inputs are its first ``seq_len`` tokens and
targets the last ``seq_len`` (next-token prediction). Windows may cross document
boundaries (documents are separated by the end-of-text token).

- Training: :class:`BatchSampler` draws window starts uniformly from a seeded NumPy
  generator (PCG64). Its ``state_dict`` holds the generator state and the number of batches
  drawn, so a resumed run draws exactly the batches an uninterrupted one would.
- Evaluation: :func:`eval_windows` gives fixed, evenly spaced windows over the whole
  validation stream — the same windows at every evaluation and in every run.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch


def _check(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if tokens.ndim != 1:
        raise ValueError(f"{what} tokens must be a 1-D stream, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} is longer than the {what} data: it has {len(tokens)} tokens "
            f"and a window needs seq_len + 1 = {seq_len + 1}"
        )


def windows_to_batch(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, targets_BS) int64 tensors of the windows beginning at ``starts``."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    win = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    if device is not None:
        win = win.to(device, non_blocking=True)
    return win[:, :-1], win[:, 1:]


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens, reproducible from ``seed``.

    ``next_starts(batch_size)`` advances the generator; ``next_batch`` turns the starts into
    tensors. A distributed runner draws the global batch on every rank and keeps its rows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0) -> None:
        _check(tokens, seq_len, "training")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    @property
    def num_starts(self) -> int:
        return len(self.tokens) - self.seq_len

    def next_starts(self, batch_size: int) -> np.ndarray:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batches_drawn += 1
        return self.rng.integers(0, self.num_starts, size=batch_size, dtype=np.int64)

    def next_batch(
        self, batch_size: int, device: Optional[torch.device] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch(self.tokens, self.next_starts(batch_size), self.seq_len, device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
            "batches_drawn": self.batches_drawn,
            "bit_generator": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_tokens"] != len(self.tokens) or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"sampler state is for {state['num_tokens']} tokens / seq_len "
                f"{state['seq_len']}, this sampler has {len(self.tokens)} / {self.seq_len}"
            )
        self.seed = state["seed"]
        self.batches_drawn = int(state["batches_drawn"])
        self.rng.bit_generator.state = state["bit_generator"]


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: Optional[int] = None) -> np.ndarray:
    """Starts of ``num_windows`` evenly spaced windows over the stream (None: every
    non-overlapping window). Deterministic; windows overlap only when the stream is short."""
    _check(tokens, seq_len, "validation")
    last = len(tokens) - seq_len - 1
    if num_windows is None:
        return np.arange(0, last + 1, seq_len + 1, dtype=np.int64)
    if not isinstance(num_windows, int) or num_windows < 1:
        raise ValueError(f"num_windows must be a positive int, got {num_windows!r}")
    return np.unique(np.linspace(0, last, num_windows).round().astype(np.int64))


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    num_batches: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed evaluation windows (``num_batches * batch_size`` of them) in batches."""
    windows = None if num_batches is None else num_batches * batch_size
    starts = eval_windows(tokens, seq_len, windows)
    for i in range(0, len(starts), batch_size):
        yield windows_to_batch(tokens, starts[i: i + batch_size], seq_len, device)
