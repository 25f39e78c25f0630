"""Which rank holds which experts, and the process groups that follow from it. Pure Python.

A run has ``world_size`` ranks (one per GPU, or one per CPU process with gloo). Every rank
is a data-parallel replica of the dense part of the model and a *source* of tokens for
every MoE layer. The routed experts are spread as follows:

- ``ep_size`` (P): ranks per expert-parallel (EP) group; P consecutive ranks
  ``[j*P, (j+1)*P)`` form EP group j. Each rank has ``E / P`` expert slots, so one EP group
  holds E slots in all.
- scheduling group: ``sched_size`` consecutive ranks (a multiple of P, by default the whole
  world) over which the placement is built and inside which tokens travel. The placement
  decides which expert sits in each of their slots; with more than one scheduling group the
  same placement repeats in each.
- replica set of expert e: every rank, in any scheduling group, that holds e; the expert's
  gradients are summed over it (expert data parallelism).

``ParallelLayout`` checks all of it before any process group exists, so that bad input is a
``ValueError`` raised identically on every rank before the first collective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_sizes(world_size: int, ep_size: int, num_experts: int,
                sched_size: int | None = None) -> int:
    """Validate the sizes of a run; returns the scheduling group size.

    Raises ValueError when the world does not split into EP groups, the experts do not split
    over the ranks of an EP group, or the scheduling groups do not tile the world.
    """
    world_size = _positive_int("world_size", world_size)
    ep_size = _positive_int("ep_size", ep_size)
    num_experts = _positive_int("num_experts", num_experts)
    if world_size % ep_size:
        raise ValueError(
            f"world size {world_size} is not a multiple of the EP size {ep_size}"
        )
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} does not divide over the {ep_size} ranks of an EP "
            f"group (EP size {ep_size})"
        )
    sched_size = world_size if sched_size is None else _positive_int("sched_size", sched_size)
    if sched_size % ep_size or world_size % sched_size:
        raise ValueError(
            f"scheduling group size {sched_size} must be a multiple of the EP size {ep_size} "
            f"and divide the world size {world_size}"
        )
    return sched_size


@dataclass(frozen=True)
class ParallelLayout:
    """Expert slots of every rank of the world, with the groups derived from them.

    ``experts_of_rank[r]`` lists the experts held by rank r's slots (E / P slots, distinct
    experts per rank). Build one with :meth:`from_placement`.
    """

    world_size: int
    ep_size: int
    num_experts: int
    sched_size: int
    experts_of_rank: tuple[tuple[int, ...], ...]

    @classmethod
    def from_placement(
        cls,
        world_size: int,
        ep_size: int,
        num_experts: int,
        experts_of_gpu: Sequence[Sequence[int]] | np.ndarray,
        sched_size: int | None = None,
    ) -> "ParallelLayout":
        """Tile a placement over the world.

        ``experts_of_gpu[g]`` are the experts of GPU g of one scheduling group (G = sched_size
        GPUs, num_experts / ep_size slots each). Raises ValueError naming the first thing
        that does not fit: a GPU count other than the scheduling group's, a GPU with the wrong
        number of slots or a repeated expert, an expert id out of range, or an expert without
        a replica in the group.
        """
        sched_size = check_sizes(world_size, ep_size, num_experts, sched_size)
        slots = num_experts // ep_size
        rows = [tuple(int(e) for e in row) for row in experts_of_gpu]
        if len(rows) != sched_size:
            raise ValueError(
                f"the placement covers {len(rows)} GPUs but the scheduling group has "
                f"{sched_size} ranks (world size {world_size})"
            )
        for g, row in enumerate(rows):
            if len(row) != slots:
                raise ValueError(
                    f"GPU {g} of the placement holds {len(row)} experts, but each rank has "
                    f"num_experts/ep_size = {num_experts}/{ep_size} = {slots} slots"
                )
            if len(set(row)) != len(row):
                raise ValueError(f"GPU {g} of the placement holds an expert twice: {row}")
            bad = [e for e in row if not 0 <= e < num_experts]
            if bad:
                raise ValueError(
                    f"GPU {g} of the placement holds expert {bad[0]}, outside 0..{num_experts - 1}"
                )
        held = {e for row in rows for e in row}
        missing = sorted(set(range(num_experts)) - held)
        if missing:
            raise ValueError(f"experts {missing} have no replica in the placement")
        tiled = tuple(rows[r % sched_size] for r in range(world_size))
        return cls(world_size, ep_size, num_experts, sched_size, tiled)

    # -- sizes -------------------------------------------------------------------------
    @property
    def slots_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def num_sched_groups(self) -> int:
        return self.world_size // self.sched_size

    # -- groups of ranks ---------------------------------------------------------------
    def ep_group(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s EP group."""
        start = rank - rank % self.ep_size
        return tuple(range(start, start + self.ep_size))

    def ep_groups(self) -> list[tuple[int, ...]]:
        P = self.ep_size
        return [tuple(range(j * P, (j + 1) * P)) for j in range(self.world_size // P)]

    def sched_group(self, rank: int) -> tuple[int, ...]:
        """The ranks whose tokens ``rank`` may compute, and which may compute its tokens."""
        start = rank - rank % self.sched_size
        return tuple(range(start, start + self.sched_size))

    def sched_groups(self) -> list[tuple[int, ...]]:
        n = self.sched_size
        return [tuple(range(j * n, (j + 1) * n)) for j in range(self.num_sched_groups)]

    @functools.cached_property
    def _replica_sets_E(self) -> tuple[tuple[int, ...], ...]:
        holders: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, row in enumerate(self.experts_of_rank):
            for e in row:
                holders[e].append(r)
        return tuple(tuple(h) for h in holders)

    def replica_set(self, expert: int) -> tuple[int, ...]:
        """Every rank of the world holding ``expert``, ascending."""
        return self._replica_sets_E[expert]

    def replica_sets(self) -> list[tuple[int, ...]]:
        """The distinct replica sets, sorted: one gradient process group each."""
        return sorted(set(self._replica_sets_E))

    def local_experts(self, rank: int) -> tuple[int, ...]:
        return self.experts_of_rank[rank]

    def experts_of_gpu(self) -> np.ndarray:
        """int64 [sched_size, slots]: the placement of one scheduling group."""
        return np.asarray(self.experts_of_rank[: self.sched_size], dtype=np.int64).reshape(
            self.sched_size, self.slots_per_rank
        )

    def holds_GE(self) -> np.ndarray:
        """bool [sched_size, E]: whether GPU g of a scheduling group holds expert e."""
        holds = np.zeros((self.sched_size, self.num_experts), dtype=bool)
        for g, row in enumerate(self.experts_of_rank[: self.sched_size]):
            holds[g, list(row)] = True
        return holds

    def single_replica(self) -> bool:
        """Whether every expert has one replica per scheduling group (EP size = scheduling
        group size, or a placement like it): every token then has one rank to go to."""
        return bool((self.holds_GE().sum(axis=0) == 1).all())

    def is_standard(self) -> bool:
        """Whether every EP group holds every expert exactly once (Megatron EP x EDP)."""
        for group in self.ep_groups():
            held = sorted(e for r in group for e in self.experts_of_rank[r])
            if held != list(range(self.num_experts)):
                return False
        return True

    def describe(self) -> str:
        reps = [len(self.replica_set(e)) for e in range(self.num_experts)]
        return (
            f"world {self.world_size}, EP size {self.ep_size} "
            f"({self.world_size // self.ep_size} EP groups), {self.slots_per_rank} experts "
            f"per rank, scheduling groups of {self.sched_size}, replicas per expert "
            f"{min(reps)}..{max(reps)}, {len(self.replica_sets())} distinct replica sets"
        )
