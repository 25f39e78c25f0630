"""Suite-wide pytest settings.

The suite runs in a random order (pytest-randomly, which also reseeds ``random``, NumPy and
torch's generators before each test). The seed is printed at the end of every run so that an
order-dependent failure can be replayed with ``pytest --randomly-seed=N``;
``pytest -p no:randomly`` runs in file order.
"""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    seed = getattr(config.option, "randomly_seed", None)
    if seed is None or not config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line("test order: file order (pytest-randomly not active)")
    else:
        terminalreporter.write_line(
            f"test order: random, seed {seed} (replay with --randomly-seed={seed})"
        )
