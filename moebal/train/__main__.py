"""``python -m moebal.train ...``: the same as ``moebal train ...`` (for launchers: torchrun)."""

import sys

from moebal.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
