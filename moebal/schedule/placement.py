"""A placement of expert replicas on GPUs, and its slot index (the arrays the solvers use).

A :class:`Placement` says which GPUs hold a replica of which expert; every GPU has room for
``slots_per_gpu`` experts (memory). Its :class:`SlotIndex` (``placement.slots``) lists the
replica slots, one per (expert, GPU holding it), as flat arrays the scheduling code indexes
without Python loops. The builders (standard, symmetric, eplb, asymmetric) are in
:mod:`moebal.schedule.placements`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class SlotIndex:
    """Flat replica-slot arrays of a placement (one slot = one (expert, GPU) replica).

    Slots are sorted by expert, then GPU; N is the number of slots (``replicas_E.sum()``).

    expert_N     int64 [N]: the slot's expert.
    gpu_N        int64 [N]: the slot's GPU.
    start_E      int64 [E]: the first slot of each expert (``np.add.reduceat`` boundaries).
    replicas_E   int64 [E]: slots of each expert.
    by_gpu_N     int64 [N]: slot ids sorted by (GPU, expert).
    key_N        int64 [N]: ``expert * G + GPU``, ascending (for ``np.searchsorted``).
    rep_N        int64 [N]: replicas of the slot's expert.
    rot_N        int64 [N]: the slot's position within its expert rotated by the expert id
                 (so that rounding remainders spread over the GPUs).

    All arrays are read-only.
    """

    expert_N: np.ndarray
    gpu_N: np.ndarray
    start_E: np.ndarray
    replicas_E: np.ndarray
    by_gpu_N: np.ndarray
    key_N: np.ndarray
    rep_N: np.ndarray
    rot_N: np.ndarray

    @classmethod
    def build(cls, sets: Sequence[Sequence[int]], num_gpus: int) -> "SlotIndex":
        """The index of sorted GPU sets ``sets[e]`` (validated by :class:`Placement`)."""
        E, G = len(sets), num_gpus
        replicas_E = np.array([len(s) for s in sets], dtype=np.int64)
        expert_N = np.repeat(np.arange(E, dtype=np.int64), replicas_E)
        gpu_N = np.fromiter((g for s in sets for g in s), dtype=np.int64, count=len(expert_N))
        start_E = np.zeros(E, dtype=np.int64)
        np.cumsum(replicas_E[:-1], out=start_E[1:])
        rep_N = replicas_E[expert_N]
        index = cls(
            expert_N=expert_N,
            gpu_N=gpu_N,
            start_E=start_E,
            replicas_E=replicas_E,
            by_gpu_N=np.lexsort((expert_N, gpu_N)).astype(np.int64),
            key_N=expert_N * G + gpu_N,
            rep_N=rep_N,
            rot_N=(np.arange(len(expert_N)) - start_E[expert_N] + expert_N) % rep_N,
        )
        for arr in vars(index).values():
            arr.flags.writeable = False
        return index

    @property
    def num_slots(self) -> int:
        """N."""
        return len(self.expert_N)


@dataclass(frozen=True)
class Placement:
    """Which GPUs hold a replica of which expert.

    num_gpus          G.
    slots_per_gpu     experts one GPU can hold (memory); no GPU may hold more.
    gpus_of_expert    ``gpus_of_expert[e]``: the sorted GPU ids holding expert e (``G_e``).
    name              the builder that made it (informational, not compared).

    Derived, read-only: ``holds_EG`` bool [E, G]; ``replicas_E`` int64 [E]; ``num_experts``;
    ``slots`` the :class:`SlotIndex`. Construction validates everything and raises
    ``ValueError`` naming the offending expert or GPU: an expert with no replica, a GPU id
    out of range or listed twice for one expert, a GPU holding more experts than it has slots.
    """

    num_gpus: int
    slots_per_gpu: int
    gpus_of_expert: tuple[tuple[int, ...], ...]
    name: str = field(default="", compare=False)
    holds_EG: np.ndarray = field(init=False, repr=False, compare=False)
    replicas_E: np.ndarray = field(init=False, repr=False, compare=False)
    slots: SlotIndex = field(init=False, repr=False, compare=False)
    _derived: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        G, slots = self.num_gpus, self.slots_per_gpu
        for label, value in (("num_gpus", G), ("slots_per_gpu", slots)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        G, slots = int(G), int(slots)
        sets = _checked_sets(self.gpus_of_expert, G)
        index = SlotIndex.build(sets, G)
        per_gpu = np.bincount(index.gpu_N, minlength=G)
        over = np.flatnonzero(per_gpu > slots)
        if over.size:
            g = int(over[0])
            raise ValueError(
                f"GPU {g} holds {int(per_gpu[g])} experts but has only {slots} slots"
            )
        holds_EG = np.zeros((len(sets), G), dtype=bool)
        holds_EG[index.expert_N, index.gpu_N] = True
        holds_EG.flags.writeable = False
        object.__setattr__(self, "num_gpus", G)
        object.__setattr__(self, "slots_per_gpu", slots)
        object.__setattr__(self, "gpus_of_expert", sets)
        object.__setattr__(self, "holds_EG", holds_EG)
        object.__setattr__(self, "replicas_E", index.replicas_E)
        object.__setattr__(self, "slots", index)
        object.__setattr__(self, "_derived", {})

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.gpus_of_expert)

    @property
    def experts_of_gpu(self) -> tuple[tuple[int, ...], ...]:
        """``experts_of_gpu[g]``: the sorted expert ids GPU g holds."""
        out: list[list[int]] = [[] for _ in range(self.num_gpus)]
        for e, gpus in enumerate(self.gpus_of_expert):
            for g in gpus:
                out[g].append(e)
        return tuple(tuple(x) for x in out)

    def derived(self, key: str, build: Callable[["Placement"], T]) -> T:
        """``build(self)``, computed once per placement and kept under ``key``.

        For structures a solver derives from the placement alone (a flow network's layout,
        say), so that scheduling many micro-batches on one placement builds them once.
        """
        value: Optional[T] = self._derived.get(key)
        if value is None:
            value = build(self)
            self._derived[key] = value
        return value

    @classmethod
    def from_holds(
        cls, holds_EG: np.ndarray, slots_per_gpu: Optional[int] = None, name: str = ""
    ) -> "Placement":
        """A placement from a bool [E, G] matrix; ``slots_per_gpu`` defaults to the fullest GPU."""
        holds = np.asarray(holds_EG)
        if holds.ndim != 2 or holds.dtype != bool:
            raise ValueError(
                f"holds_EG must be a bool [E, G] matrix, got {holds.dtype} {holds.shape}"
            )
        if slots_per_gpu is None:
            slots_per_gpu = max(1, int(holds.sum(0).max(initial=0)))
        sets = tuple(tuple(int(g) for g in np.flatnonzero(row)) for row in holds)
        return cls(int(holds.shape[1]), slots_per_gpu, sets, name=name)


def _checked_sets(raw: object, G: int) -> tuple[tuple[int, ...], ...]:
    """``gpus_of_expert`` as sorted int tuples; ValueError naming the first bad expert."""
    if isinstance(raw, np.ndarray) or not isinstance(raw, Sequence) or len(raw) == 0:
        raise ValueError(
            f"gpus_of_expert must be a non-empty sequence of GPU-id sequences, got {raw!r}"
        )
    sets: list[tuple[int, ...]] = []
    for e, gpus in enumerate(raw):
        try:
            ids = [int(g) for g in gpus]
        except (TypeError, ValueError):
            raise ValueError(f"expert {e}: GPU ids must be integers, got {gpus!r}") from None
        if any(int(g) != g for g in gpus):
            raise ValueError(f"expert {e}: GPU ids must be integers, got {gpus!r}")
        if not ids:
            raise ValueError(f"expert {e} has no replica (empty GPU set)")
        bad = [g for g in ids if not 0 <= g < G]
        if bad:
            raise ValueError(f"expert {e} lists GPU {bad[0]}, outside 0..{G - 1}")
        if len(set(ids)) != len(ids):
            dup = next(g for g in ids if ids.count(g) > 1)
            raise ValueError(f"expert {e} lists GPU {dup} twice")
        sets.append(tuple(sorted(ids)))
    return tuple(sets)
