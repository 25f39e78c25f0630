"""The run folder: its files, its lock, its checkpoints and what ``--resume``/``--force`` do.

One :class:`RunDir` serves every runner (``train()``, ``train_parallel`` on each rank, the
balancer comparison for its folder of runs), so the rules below hold everywhere:

- **files** ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (``checkpoint.rank<r>.pt``
  per rank of a parallel run), ``trace.npz``, ``result.json`` (+ runner-specific extras);
  every one but the append-only ``metrics.jsonl`` is written atomically (:mod:`moebal.fileio`);
- **lock**: a run holds ``fcntl.flock`` on ``.moebal.lock`` (holding its pid, host and start
  time) while it works on the folder; a second run into it is refused while the first
  lives; the kernel drops the lock of a dead process, so a stale lock is simply taken over;
- **checkpoints** carry a header with the sha256 and length of their payload, checked
  before ``torch.load``: a truncated or altered file is a one-line :class:`CheckpointError`
  naming it, never a different run;
- **start**: a folder that holds a run is refused unless ``resume`` or ``force``;
  ``resume`` continues from the checkpoint (dropping the ``metrics.jsonl`` records after
  it), returns a finished run's result, and refuses (deleting nothing) when steps were
  logged but no checkpoint covers them; ``force`` deletes the run's files and starts over;
- **temporary files** a killed process left beside the run's files are deleted on start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from moebal.fileio import atomic_write, atomic_write_json, remove_stale_temp_files
from moebal.train.config import RESUME_FREE_FIELDS
from moebal.train.errors import CheckpointError, ResumeError, RunFolderBusy

PathLike = Union[str, os.PathLike]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "trace.npz", "result.json")
LOCK_FILE = ".moebal.lock"
CHECKPOINT_MAGIC = b"moebal-checkpoint/2 sha256="
HEADER_LIMIT = 256  # bytes: the header line is shorter

# what RunDir.decide() answers
FRESH, CONTINUE, FINISHED = "fresh", "continue", "finished"


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` behind a header line ``moebal-checkpoint/2 sha256=<hex>
    bytes=<n>``, written atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = (CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode()
              + b" bytes=%d\n" % len(payload))

    def write(f) -> None:
        f.write(header)
        f.write(payload)

    return atomic_write(path, write)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The state a :func:`save_checkpoint` file holds; CheckpointError (naming the file)
    when it is missing, truncated, altered or no moebal checkpoint."""
    import torch

    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {name} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {name} cannot be read: {exc.strerror}") from None
    end = data.find(b"\n", 0, HEADER_LIMIT)
    if not data.startswith(CHECKPOINT_MAGIC) or end < 0:
        raise CheckpointError(f"checkpoint {name} is not a moebal checkpoint with a checksum "
                              "(damaged, or written by an older moebal)")
    try:
        digest, size = data[len(CHECKPOINT_MAGIC):end].decode("ascii").split(" bytes=")
        size = int(size)
    except ValueError:
        raise CheckpointError(f"checkpoint {name} has a damaged header") from None
    payload = memoryview(data)[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {name} is truncated ({len(payload):,} of "
                              f"{size:,} bytes)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {name} is damaged (its sha256 does not match)")
    try:
        # our own file (checksum verified): it holds RNG states, hence weights_only=False
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"checkpoint {name} cannot be loaded: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name} holds {type(state).__name__}, not a state")
    return state


def compatibility_problems(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why a run saved as ``saved`` cannot be continued as ``now``: both are dicts with
    ``model``, ``train`` (config dicts) and ``data`` (corpus identity); training fields
    in RESUME_FREE_FIELDS may differ."""
    problems = []
    for part in ("model", "train"):
        old, new = saved.get(part) or {}, now[part]
        for k in sorted(set(old) | set(new)):
            if part == "train" and k in RESUME_FREE_FIELDS:
                continue
            if old.get(k) != new.get(k):
                problems.append(f"{part} {k}: {old.get(k)!r} != {new.get(k)!r}")
    old_data = {k: (saved.get("data") or {}).get(k) for k in now["data"]}
    if old_data != now["data"]:
        problems.append(f"data: {old_data} != {now['data']}")
    return problems


# --------------------------------------------------------------------------- metrics
def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------- the lock
class RunLock:
    """``fcntl.flock`` on ``<folder>/.moebal.lock``; the file says who holds it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.fd: Optional[int] = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"

    def acquire(self) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileExistsError:
            raise ValueError(f"run folder {str(folder)!r} is not a folder") from None
        except OSError as exc:
            raise ValueError(f"run folder {str(folder)!r} is not writable ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {str(folder)!r} is in use by {self.holder()}; wait for that run "
                "or choose another --out"
            ) from None
        # a lock left by a dead process is free again (the kernel drops flocks): take it
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- the folder
class RunDir:
    """A run folder (see the module docstring). ``extra_files`` are the runner's own files
    (``parallel.json``); ``checkpoint_glob`` matches per-rank checkpoints."""

    def __init__(self, path: PathLike, extra_files: Sequence[str] = (),
                 checkpoint_glob: str = "checkpoint.rank*.pt") -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run folder {str(self.path)!r} exists and is not a folder")
        self.files = tuple(RUN_FILES) + tuple(extra_files)
        self.checkpoint_glob = checkpoint_glob
        self._lock: Optional[RunLock] = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    def checkpoint(self, rank: Optional[int] = None) -> Path:
        """``checkpoint.pt``, or ``checkpoint.rank<r>.pt`` of rank ``rank``."""
        return self.path / ("checkpoint.pt" if rank is None else f"checkpoint.rank{rank}.pt")

    # ---------------------------------------------------------------- lock
    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold the folder's lock (creating the folder); RunFolderBusy while another
        live process holds it, ValueError when it cannot be written."""
        lock = RunLock(self.path)
        lock.acquire()
        self._lock = lock
        try:
            yield self
        finally:
            self._lock = None
            lock.release()

    # ---------------------------------------------------------------- state of the folder
    def existing(self) -> list[str]:
        """The run's files present in the folder."""
        if not self.path.is_dir():
            return []
        names = [n for n in self.files if (self.path / n).exists()]
        return names + sorted(p.name for p in self.path.glob(self.checkpoint_glob))

    def remove_temp_files(self) -> list[Path]:
        """Delete the temporary files of interrupted atomic writes of the run's files."""
        removed = []
        for name in self.existing() + list(self.files):
            removed += remove_stale_temp_files(self.path / name)
        for p in self.path.glob("." + self.checkpoint_glob + ".*"):  # never renamed into place
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def last_logged_step(self) -> int:
        """The highest step with a record in metrics.jsonl (0: none)."""
        if not self.metrics_file.is_file():
            return 0
        return max((int(r.get("step", 0)) for r in read_metrics(self.metrics_file)), default=0)

    def check_request(self, resume: bool, force: bool) -> list[str]:
        """Refuse contradictory flags and a folder holding a run without either; returns
        the run's files present."""
        if resume and force:
            raise ValueError("--resume and --force contradict each other: pick one")
        existing = self.existing()
        if existing and not (resume or force):
            raise ValueError(
                f"{str(self.path)!r} already holds a run ({', '.join(existing)}); "
                f"resume it with --resume or start over with --force"
            )
        return existing

    def decide(self, resume: bool, force: bool, checkpoint: Path) -> str:
        """FRESH (start at step 0; call :meth:`clear`), CONTINUE (load ``checkpoint``) or
        FINISHED (result.json and no checkpoint: the caller checks config.json and
        returns the result). ResumeError when ``resume`` cannot continue."""
        existing = self.check_request(resume, force)
        if not existing or force:
            return FRESH
        if checkpoint.is_file():
            return CONTINUE
        if self.result_file.is_file():
            return FINISHED
        last = self.last_logged_step()
        if last > 0 or (self.path / "trace.npz").exists():
            raise ResumeError(
                f"cannot resume {str(self.path)!r}: metrics.jsonl goes to step {last} but there "
                f"is no {checkpoint.name} to continue from; nothing was deleted. Start over "
                "with --force (or keep the folder and choose another --out)"
            )
        return FRESH  # only a config.json: nothing was trained yet

    def clear(self) -> None:
        """Delete the run's files (starting over)."""
        for name in self.existing():
            (self.path / name).unlink(missing_ok=True)

    def keep_records_until(self, step: int) -> list[dict[str, Any]]:
        """Drop the metrics.jsonl records after ``step`` (what a checkpoint covers);
        returns the records kept."""
        if not self.metrics_file.is_file():
            return []
        kept = [r for r in read_metrics(self.metrics_file) if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics_file, lambda f: f.write(text.encode("utf-8")))
        return kept

    # ---------------------------------------------------------------- files
    def open_metrics(self):
        """metrics.jsonl for appending, one JSON record per line."""
        self.path.mkdir(parents=True, exist_ok=True)
        return open(self.metrics_file, "a", encoding="utf-8")

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> dict[str, Any]:
        file = self.path / name
        try:
            value = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{str(file)!r} cannot be read ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{str(file)!r} holds {type(value).__name__}, not an object")
        return value
