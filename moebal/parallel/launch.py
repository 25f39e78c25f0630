"""Starting processes: ``spawn`` runs a function on N local ranks (tests, notebooks),
``torchrun_command`` builds the command line ``moebal train --nproc N`` runs, and
``reported_once`` makes bad input on the ranks of a launch one message, not one per rank.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue as queue_mod
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from moebal.fileio import atomic_write_text
from moebal.parallel.comm import DEFAULT_TIMEOUT_S, world_from_env

# set by `moebal train --nproc N` for its ranks: the folder where a rank that stops on bad
# input leaves its message, for the launching process to print once
ERRORS_ENV = "MOEBAL_LAUNCH_ERRORS"


@dataclass
class WorkerResult:
    """What one rank of :func:`spawn` ended with: its return value, or its error."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""  # message, then the traceback


class WorkerError(RuntimeError):
    """Raised by :func:`spawn` when a rank failed; ``results`` holds every rank's outcome."""

    def __init__(self, results: list[WorkerResult]):
        self.results = results
        lines = [
            f"rank {r.rank}: {r.error_type}: {r.error.splitlines()[0] if r.error else ''}"
            for r in results
            if not r.ok
        ]
        super().__init__("distributed run failed on some ranks:\n" + "\n".join(lines))


def _worker(rank, world_size, init_file, backend, timeout_s, threads, fn, args, results):
    import torch
    import torch.distributed as dist

    from moebal.parallel.comm import init_distributed

    torch.set_num_threads(threads)
    try:
        init_distributed(backend, timeout_s, init_method=f"file://{init_file}", rank=rank,
                         world_size=world_size)
        # plain pickle: tensors travel as bytes, not as shared memory the exiting worker owns
        value = pickle.dumps(fn(rank, world_size, *args))
        results.put((rank, True, value, "", ""))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        text = f"{exc}\n{traceback.format_exc()}"
        results.put((rank, False, None, type(exc).__name__, text))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer can make tear-down fail; the result is in
                pass


def _loads(value: Optional[bytes]) -> Any:
    return None if value is None else pickle.loads(value)


def _context():
    """forkserver where there is one: its server imports torch once, and every worker is a
    cheap fork of it (no OpenMP state inherited, as no tensor op ran there); else spawn."""
    import torch.multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # what the workers would each import otherwise: grouped_mm's first call pulls in
        # symbolic_shapes (and sympy), the first optimizer torch._dynamo; seconds per
        # process on a small CPU
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.optim",
                                    "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                                    "numpy", "moebal.parallel", "moebal.model",
                                    "moebal.parallel.train"])
        return ctx
    return mp.get_context("spawn")


def _collect(procs: list, results_q: Any, timeout_s: float) -> dict[int, WorkerResult]:
    """Every rank's result off the queue: what it sent, else ProcessDied (it exited without
    a result) or Timeout (still running after ``timeout_s``)."""
    got: dict[int, WorkerResult] = {}

    def drain() -> None:
        try:
            while True:
                rank, ok, value, etype, text = results_q.get_nowait()
                got[rank] = WorkerResult(rank, ok, _loads(value), etype, text)
        except queue_mod.Empty:
            pass

    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, value, etype, text = results_q.get(timeout=0.2)
            got[rank] = WorkerResult(rank, ok, _loads(value), etype, text)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
            for r in dead:  # exited without a result (killed, segfault): say so
                time.sleep(0.2)  # its result may still be in flight
                drain()
                if r not in got:
                    got[r] = WorkerResult(
                        r, False, error_type="ProcessDied",
                        error=f"process exited with code {procs[r].exitcode} without a result",
                    )
    for r in range(len(procs)):
        if r not in got:
            got[r] = WorkerResult(r, False, error_type="Timeout",
                                  error=f"rank {r} did not finish within {timeout_s:g} s")
    return got


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 1,
    raise_on_error: bool = True,
) -> list[WorkerResult]:
    """Run ``fn(rank, world_size, *args)`` on ``nprocs`` fresh processes with a process group.

    The processes rendezvous through a file (no port to pick) and each returns
    ``fn``'s (picklable) value. ``collective_timeout_s`` bounds every collective;
    ``timeout_s`` bounds the whole run, after which ranks still running are killed and
    reported as failed. Raises :class:`WorkerError` when any rank failed unless
    ``raise_on_error`` is False; returns the results in rank order.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    ctx = _context()
    results_q = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="moebal-dist-")
    init_file = os.path.join(tmp, "rendezvous")
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nprocs, init_file, backend, collective_timeout_s, threads, fn,
                  tuple(args), results_q),
            daemon=True,
        )
        for r in range(nprocs)
    ]
    try:
        for p in procs:
            p.start()
        got = _collect(procs, results_q, timeout_s)
    finally:
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
    results = [got[r] for r in range(nprocs)]
    if raise_on_error and not all(r.ok for r in results):
        raise WorkerError(results)
    return results


def torchrun_command(nproc: int, module: str, argv: Sequence[str],
                     python: Optional[str] = None) -> list[str]:
    """The command that runs ``python -m module argv`` on ``nproc`` local ranks via torchrun.

    ``--standalone`` picks a free local rendezvous port; see docs/distributed.md for the
    multi-node form.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive int, got {nproc!r}")
    return [
        python or sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", module, *argv,
    ]


@contextlib.contextmanager
def reported_once() -> Iterator[None]:
    """Bad input (ValueError) on the ranks of a launch, reported once.

    Every rank checks the same things and raises the same error. Started by ``moebal train
    --nproc N`` (``MOEBAL_LAUNCH_ERRORS`` set), each rank leaves its message in that folder
    and exits 0, so that torchrun stays quiet, and the launching process prints the lowest
    rank's message and exits 2 (:func:`first_rank_error`). Under a torchrun started by
    hand, rank 0 raises (``moebal`` prints it and exits 2) and the other ranks exit 2
    without a word.
    """
    try:
        yield
    except ValueError as exc:
        rank = world_from_env()[0]
        errors = os.environ.get(ERRORS_ENV)
        if errors:
            atomic_write_text(Path(errors) / f"rank{rank}.txt", str(exc))
            raise SystemExit(0) from None
        if rank == 0:
            raise
        raise SystemExit(2) from None


def first_rank_error(errors: str | os.PathLike) -> Optional[str]:
    """The message the lowest rank left in the folder ``errors`` (see
    :func:`reported_once`), or None when no rank stopped on bad input."""
    found = []
    for path in Path(errors).glob("rank*.txt"):
        try:
            found.append((int(path.stem[len("rank"):]), path.read_text(encoding="utf-8")))
        except ValueError:  # not a file of ours
            continue
    return min(found)[1] if found else None
