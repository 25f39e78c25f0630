"""Suite-wide pytest settings.

The suite runs in a random order (pytest-randomly, which also reseeds ``random``, NumPy and
torch's generators before each test). The seed is printed at the end of every run so that an
order-dependent failure can be replayed with ``pytest --randomly-seed=N``;
``pytest -p no:randomly`` runs in file order.
"""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    seed = getattr(config.option, "randomly_seed", None)
    if seed is None or not config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line("test order: file order (pytest-randomly not active)")
    else:
        terminalreporter.write_line(
            f"test order: random, seed {seed} (replay with --randomly-seed={seed})"
        )


@pytest.fixture
def small_corpus(tmp_path):
    """A random 512-token corpus for trainer tests that need no real text."""
    import numpy as np
    from pathlib import Path

    from moebal.data import Corpus

    rng = np.random.default_rng(0)
    return Corpus(train=rng.integers(0, 512, 4000).astype(np.uint16),
                  val=rng.integers(0, 512, 1000).astype(np.uint16), tokenizer=None,
                  vocab_size=512, eos_id=None, directory=Path(tmp_path), key="test")
