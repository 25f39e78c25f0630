"""What the placement builders share: size checks, EPLB's replica counts, balanced packing."""

from __future__ import annotations

import heapq
import math

import numpy as np


def check_sizes(num_gpus: int, num_experts: int, slots_per_gpu: int) -> tuple[int, int, int]:
    for label, value in (
        ("num_gpus", num_gpus),
        ("num_experts", num_experts),
        ("slots_per_gpu", slots_per_gpu),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    G, E, s = int(num_gpus), int(num_experts), int(slots_per_gpu)
    if G * s < E:
        raise ValueError(
            f"{G} GPUs x {s} slots = {G * s} slots cannot hold {E} experts once each"
        )
    return G, E, s


def uniform_replicas(G: int, E: int, s: int, builder: str) -> int:
    if (G * s) % E:
        raise ValueError(
            f"{builder} placement gives every expert the same number of replicas, so "
            f"num_gpus * slots_per_gpu ({G} * {s} = {G * s}) must be a multiple of "
            f"num_experts ({E})"
        )
    r = G * s // E
    if r > G:
        raise ValueError(
            f"{builder} placement would need {r} replicas per expert but there are only {G} GPUs"
        )
    return r


def replica_counts(total_E: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """EPLB ``replicate_experts``: start at 1 each, next replica to the largest load/count.

    Ties go to the lower expert id; an expert never gets more than ``max_replicas``.
    Exact integer comparisons (load_a * count_b vs load_b * count_a).
    """
    E = len(total_E)
    counts = np.ones(E, dtype=np.int64)
    spare = num_slots - E

    class _Key:
        __slots__ = ("e",)

        def __init__(self, e: int) -> None:
            self.e = e

        def __lt__(self, other: "_Key") -> bool:  # larger load per replica first
            a = int(total_E[self.e]) * int(counts[other.e])
            b = int(total_E[other.e]) * int(counts[self.e])
            return a > b or (a == b and self.e < other.e)

    heap = [_Key(e) for e in range(E)]
    heapq.heapify(heap)
    while spare > 0 and heap:
        top = heapq.heappop(heap)
        counts[top.e] += 1
        spare -= 1
        if counts[top.e] < max_replicas:
            heapq.heappush(heap, top)
    return counts


def pack(
    weight_E: np.ndarray,
    counts_E: np.ndarray,
    G: int,
    s: int,
    priority_G: np.ndarray,
) -> np.ndarray:
    """Balanced packing of replicas (heaviest first onto the lightest GPU with room).

    ``weight_E``: integer weight of each replica of expert e; ``counts_E``: replicas of e.
    A GPU never takes a second replica of one expert. Weights are compared exactly
    (integers); ties go to the GPU with the lower ``priority_G``. If the only free slots sit
    on GPUs that already hold the expert, a replica of another expert is moved to a free slot
    to make room. Returns bool [E, G].
    """
    E = len(weight_E)
    holds = np.zeros((E, G), dtype=bool)
    weight_G = np.zeros(G, dtype=np.int64)
    used_G = np.zeros(G, dtype=np.int64)
    experts_R = np.repeat(np.arange(E, dtype=np.int64), counts_E)
    order = np.lexsort((experts_R, -weight_E[experts_R]))
    for e in experts_R[order].tolist():
        ok = (used_G < s) & ~holds[e]
        if ok.any():
            cand = np.flatnonzero(ok)
            w = weight_G[cand]
            cand = cand[w == w.min()]
            g = int(cand[np.argmin(priority_G[cand])])
        else:  # every free slot sits on a GPU holding e: move another expert there
            g = -1
            for free in np.flatnonzero(used_G < s).tolist():
                for h in np.flatnonzero(~holds[e]).tolist():
                    movable = np.flatnonzero(holds[:, h] & ~holds[:, free])
                    if movable.size:
                        f = int(movable[0])
                        holds[f, h], holds[f, free] = False, True
                        used_G[free] += 1
                        used_G[h] -= 1
                        weight_G[free] += weight_E[f]
                        weight_G[h] -= weight_E[f]
                        g = h
                        break
                if g >= 0:
                    break
            if g < 0:  # cannot happen while every expert has at most G replicas
                raise ValueError(f"cannot place another replica of expert {e}")
        holds[e, g] = True
        used_G[g] += 1
        weight_G[g] += weight_E[e]
    return holds


def replica_weights(total_E: np.ndarray, counts_E: np.ndarray) -> np.ndarray:
    """Load per replica of each expert, scaled by the lcm of the counts to stay an integer."""
    lcm = 1
    for c in np.unique(counts_E).tolist():
        lcm = lcm * c // math.gcd(lcm, c)
    if lcm * int(total_E.max(initial=0)) >= 2**40:  # huge histories: a rounded share
        share = total_E.astype(np.float64) / counts_E
        return np.floor(share / max(share.max(initial=1.0), 1.0) * 2**38).astype(np.int64)
    return total_E * (lcm // counts_E)
