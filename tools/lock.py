"""Write or compare requirements.lock, the pip constraints file `make` installs from.

    python tools/lock.py --write requirements.lock --venv .venv-latest   # (make lock)
    python tools/lock.py --diff  requirements.lock --venv .venv-latest   # (make test-latest)

The lock is ``pip freeze`` of a virtual environment in which the whole suite passed, less the
project itself, with torch written without its local build label (``torch==2.13.0`` takes the
machine's CPU build, as the Makefile's first install step does). ``--diff`` prints each package
whose version differs from the lock, so a failing ``make test-latest`` names its suspects.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = """\
# Exact versions the whole suite passed with: a pip constraints file (pip install -c).
# Written by `make lock` (tools/lock.py) on {date} with Python {python}; do not edit by hand.
# `make test-latest` tries the newest versions pyproject.toml allows; `make lock` adopts them
# once the suite passes.
"""


def frozen(venv: Path) -> dict[str, str]:
    """name (lower case) -> "name==version" of every distribution installed in ``venv``."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout
    pins = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if not m:
            continue  # editable or direct-URL lines: not pinnable by version
        name, version = m.groups()
        if name.lower() == "moebal":
            continue
        if name.lower() == "torch":
            version = version.split("+", 1)[0]
        pins[name.lower()] = f"{name}=={version}"
    return pins


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[line.split("==", 1)[0].lower()] = line
    return pins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="LOCK")
    mode.add_argument("--diff", type=Path, metavar="LOCK")
    ap.add_argument("--venv", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.venv / "bin" / "python").is_file():
        print(f"lock: {str(args.venv)!r} is not a virtual environment", file=sys.stderr)
        return 2
    pins = frozen(args.venv)
    if args.write is not None:
        text = HEADER.format(date=dt.date.today().isoformat(),
                             python=".".join(map(str, sys.version_info[:3])))
        text += "".join(pins[k] + "\n" for k in sorted(pins))
        fd, tmp = tempfile.mkstemp(dir=args.write.parent or ".", prefix=f".{args.write.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.write)
        print(f"lock: wrote {len(pins)} pins to {args.write}")
        return 0
    locked = read_lock(args.diff) if args.diff.is_file() else {}
    changed = [(k, locked.get(k, "(not in lock)"), pins.get(k, "(not installed)"))
               for k in sorted(set(locked) | set(pins)) if locked.get(k) != pins.get(k)]
    if not changed:
        print(f"lock: the newest allowed versions are those of {args.diff}")
    for name, old, new in changed:
        print(f"lock: drift {name}: {old} -> {new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
