"""What one model forward's routers leave for its end: the :class:`RoutingLog`.

A model makes one log per forward and hands it to every router. The log keeps, until
:meth:`RoutingLog.commit`:

- each layer's :class:`~moebal.routing.Routing` and its pending balancer update;
- with the deferred finite check (the default on accelerators), a device-side flag per
  layer saying whether its logits summed to a finite value: ``commit`` reads them all at
  once, so routing never waits for the device, and raises :class:`NonFiniteLogits` (the
  message names the first bad entry) before any balancer update is applied;
- with ``timed``, the gate + router time (:class:`RouterTimer`): CUDA timing events
  recorded on the stream, resolved when ``router_seconds`` is read (at the end of the step,
  where the training loop synchronises anyway); on CPU ``time.perf_counter``.

The finite checks (``Router.finite_check``): ``"sync"`` checks each layer's logits before
routing (one sum read on the host; a full scan only when it is not finite);
``"deferred"`` stages the flag on the log as above (without a log, or in ``eval()``, the
check is synchronous); ``"off"`` checks nothing; ``"auto"`` is ``"sync"`` on CPU tensors
and ``"deferred"`` on others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from moebal.routing.balancers import RoutingContext

if TYPE_CHECKING:  # pragma: no cover
    from moebal.routing.router import Router, Routing

FINITE_CHECKS = ("auto", "sync", "deferred", "off")


class NonFiniteLogits(ValueError):
    """The router was given logits with a NaN or inf entry (a diverged model)."""


def check_finite_mode(value: object) -> str:
    """``value`` if it is one of :data:`FINITE_CHECKS`; else a one-line ValueError."""
    if not isinstance(value, str) or value not in FINITE_CHECKS:
        raise ValueError(f"finite_check must be one of {', '.join(FINITE_CHECKS)}, got {value!r}")
    return value


def logits_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """The 0-d sum of all logits (float64 for float64 logits, else float32), on their device:
    finite whenever every entry is, unless it overflows."""
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    return logits_TE.detach().sum(dtype=acc)


def raise_if_nonfinite(logits_TE: torch.Tensor) -> None:
    """Scan every entry; raise :class:`NonFiniteLogits` naming the count and the first bad
    entry if one is NaN or inf (synchronises: for the error path)."""
    bad = ~torch.isfinite(logits_TE.detach())
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteLogits(
            f"logits contain NaN or inf ({int(bad.sum())} entries, first at "
            f"{where}: {logits_TE[where].item()!r})"
        )


def check_finite_now(logits_TE: torch.Tensor) -> None:
    """The synchronous check: one sum read on the host, the full scan only if it is not
    finite. Raises :class:`NonFiniteLogits`; returns None."""
    if logits_TE.numel() and not math.isfinite(float(logits_sum(logits_TE))):
        raise_if_nonfinite(logits_TE)


def raise_first_nonfinite(staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``staged``: (logits, 0-d bool "their sum is finite") pairs in layer order. Reads the
    flags with one host read per device; raises :class:`NonFiniteLogits` for the first
    logits with a NaN or inf entry (a sum that merely overflowed is not an error)."""
    if not staged:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, ok in staged:
        by_device.setdefault(ok.device, []).append(ok)
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return
    for logits_TE, ok in staged:
        if not bool(ok):
            raise_if_nonfinite(logits_TE)


@dataclass
class PendingUpdate:
    """One router's balancer update of one forward, applied by :meth:`Router.commit`.

    ``ctx.updates`` holds the new values of buffers that ``select``/``loss`` computed;
    ``loads_E`` goes to ``observe``; ``replay`` tells whether to keep the state from before
    the update for an activation-checkpointing recompute.
    """

    ctx: RoutingContext
    loads_E: torch.Tensor
    replay: bool


class RouterTimer:
    """Gate + router time, added up over the intervals of one forward (or more).

    ``start(device)`` then ``stop(device, token)`` around each interval. On CUDA an interval
    is a pair of ``torch.cuda.Event(enable_timing=True)`` recorded on the device's current
    stream (no host synchronisation); elsewhere ``time.perf_counter``. :attr:`seconds`
    resolves the events (waiting for the last ones to complete) and returns the total.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> Union[float, torch.cuda.Event]:
        """Open an interval on ``device``; returns the token for :meth:`stop`."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            return event
        return time.perf_counter()

    def stop(self, device: torch.device, token: Union[float, torch.cuda.Event]) -> None:
        """Close the interval ``start`` opened with ``token``."""
        if isinstance(token, float):
            self._seconds += time.perf_counter() - token
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(device))
        self._events.append((token, end))

    @property
    def unresolved(self) -> int:
        """CUDA intervals recorded but not yet read."""
        return len(self._events)

    @property
    def seconds(self) -> float:
        """Total seconds of the closed intervals (on CUDA, waits for their end events)."""
        if self._events:
            events, self._events = self._events, []
            for start, end in events:
                end.synchronize()
                self._seconds += start.elapsed_time(end) / 1e3
        return self._seconds


class RoutingLog:
    """The routings of one model forward, layer by layer, and their pending balancer updates.

    A model makes one per forward and hands it to every MoE layer; each router appends its
    :class:`Routing` to ``routings`` and, in training mode, its balancer update to the
    pending list instead of applying it (and, with the deferred finite check, the flag of
    its logits). ``commit()`` — once the whole forward succeeded — checks the staged flags
    and applies the updates; a forward that raises (say :class:`NonFiniteLogits` in a later
    layer) drops the log and no balancer state has changed. ``timed``: layers add the time
    of gate + router to ``timer``, read as ``router_seconds``.
    """

    def __init__(self, timed: bool = False) -> None:
        self.routings: list["Routing"] = []
        self.timed = timed
        self.timer = RouterTimer()
        self._pending: list[tuple["Router", PendingUpdate]] = []
        self._staged: set[int] = set()
        self._finite: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def router_seconds(self) -> float:
        """Seconds of gate + router so far (on CUDA, reading waits for the timed kernels)."""
        return self.timer.seconds

    def stage(self, router: "Router", update: PendingUpdate) -> None:
        """Keep ``router``'s update of this forward until :meth:`commit`."""
        if id(router) in self._staged:
            raise ValueError(
                "a router routed twice in one RoutingLog; its second update would overwrite "
                "the first (use one log per forward, one call per router)"
            )
        self._staged.add(id(router))
        self._pending.append((router, update))

    def stage_finite(self, logits_TE: torch.Tensor) -> None:
        """Keep a device-side "the sum of ``logits_TE`` is finite" flag for :meth:`commit`."""
        if logits_TE.numel():
            self._finite.append((logits_TE.detach(), torch.isfinite(logits_sum(logits_TE))))

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLogits` if logits staged so far had a NaN or inf entry."""
        raise_first_nonfinite(self._finite)

    def commit(self) -> None:
        """Check the staged logits, then apply every staged balancer update in layer order;
        the log is then empty of both. Raises :class:`NonFiniteLogits` (applying nothing)."""
        pending, self._pending, self._staged = self._pending, [], set()
        finite, self._finite = self._finite, []
        raise_first_nonfinite(finite)
        for router, update in pending:
            router.commit(update)
