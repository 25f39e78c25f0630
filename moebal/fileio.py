"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

Every file moebal writes into a run folder goes through here, so a reader (or a resumed run)
sees either the old file or the whole new one, never a half-written file, and a write that
fails or is interrupted leaves no temporary file behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"


def temp_name_prefix(path: PathLike) -> str:
    """The prefix of the temporary files an atomic write of ``path`` creates beside it."""
    return f".{Path(path).name}."


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see the old file or the whole new one. The file gets the usual permissions
    (0666 less the umask), not mkstemp's private 0600. On any error (KeyboardInterrupt
    included) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(path: PathLike) -> list[Path]:
    """Delete temporary files that an interrupted atomic write of ``path`` left (a killed
    process cannot clean up after itself); returns what was removed."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for p in path.parent.glob(temp_name_prefix(path) + "*" + TMP_SUFFIX):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, without importing numpy here
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_clean(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON accepts: NaN and infinities become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return json_clean(obj.tolist())
    return obj


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Strict JSON (NaN written as null), written atomically."""
    text = json.dumps(json_clean(obj), indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")
