"""Placement of expert replicas on GPUs, its builders, and the subset density.

A :class:`Placement` says which GPUs hold a replica of which expert; every GPU has room for
``slots_per_gpu`` experts (memory). The builders, all registered in ``PLACEMENTS`` with one
signature ``build(num_gpus, num_experts, slots_per_gpu, *, loads_E=None, seed=0)``:

- ``standard``: Megatron-style EP x EDP. The GPUs form ``G / EP`` expert-parallel groups of
  ``EP = E / slots_per_gpu`` GPUs; expert ``e`` sits on GPU ``e mod EP`` of every group, so the
  replica sets of two experts are equal or disjoint.
- ``symmetric``: for unknown loads. A Cayley (translation) design on the cyclic group
  ``Z_G``: replica sets are the translates of a few base blocks by the subgroup ``d Z_G``, so
  every GPU sees the same structure; the base blocks are drawn at random (seeded) and the draw
  whose GPU co-occurrence graph has the most distinct neighbours per GPU (then the smallest
  largest pair multiplicity) is kept, a Sidon-type criterion that makes that graph a good
  expander. GPU and expert labels are then shuffled.
- ``asymmetric``: from a load history. Replica counts by the greedy rule "next replica to the
  expert with the largest load per replica"; GPU sets by balanced packing that never puts two
  replicas of one expert on one GPU, with seeded random tie-breaks; several such candidates are
  drawn and the one with the lowest worst subset density (the optimal makespan, computed
  exactly by the scheduler) on the history is kept.
- ``eplb``: DeepSeek EPLB's global policy as a baseline: the same greedy replica counts, then
  ``balanced_packing`` (heaviest replica first onto the lightest GPU with a free slot),
  except that a GPU never takes a second replica of an expert it already holds.

The subset density of a placement under loads is
``max over GPU subsets S of sum_{e: G_e within S} load_e / |S|``; by LP duality it equals
the optimal fractional makespan of the token-scheduling LP (see :mod:`moebal.schedule.solve`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class _SlotIndex:
    """Flat replica-slot arrays of a placement (one slot = one (expert, GPU) replica).

    Slots are sorted by expert, then GPU. ``expert_N``/``gpu_N`` [N]; ``start_E`` [E] first slot
    of each expert; ``replicas_E`` [E]; ``by_gpu_N`` [N] slot ids sorted by (GPU, expert);
    ``key_N`` = expert * G + GPU (ascending, for ``searchsorted``); ``rep_N`` replicas of the
    slot's expert; ``rot_N`` the slot's position within its expert rotated by the expert id
    (so that rounding remainders spread over the GPUs).
    """

    expert_N: np.ndarray
    gpu_N: np.ndarray
    start_E: np.ndarray
    replicas_E: np.ndarray
    by_gpu_N: np.ndarray
    key_N: np.ndarray
    rep_N: np.ndarray
    rot_N: np.ndarray


@dataclass(frozen=True)
class Placement:
    """Which GPUs hold a replica of which expert.

    num_gpus          G.
    slots_per_gpu     experts one GPU can hold (memory); no GPU may hold more.
    gpus_of_expert    ``gpus_of_expert[e]``: the sorted GPU ids holding expert e (``G_e``).
    name              the builder that made it (informational, not compared).

    Derived, read-only: ``holds_EG`` bool [E, G]; ``replicas_E`` int64 [E]; ``num_experts``.
    Construction validates everything and raises ``ValueError`` naming the offending expert
    or GPU: an expert with no replica, a GPU id out of range or listed twice for one expert,
    a GPU holding more experts than it has slots.
    """

    num_gpus: int
    slots_per_gpu: int
    gpus_of_expert: tuple[tuple[int, ...], ...]
    name: str = field(default="", compare=False)
    holds_EG: np.ndarray = field(init=False, repr=False, compare=False)
    replicas_E: np.ndarray = field(init=False, repr=False, compare=False)
    _index: _SlotIndex = field(init=False, repr=False, compare=False)
    _cache: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        G, slots = self.num_gpus, self.slots_per_gpu
        for label, value in (("num_gpus", G), ("slots_per_gpu", slots)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        G, slots = int(G), int(slots)
        raw = self.gpus_of_expert
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
        E = len(sets)
        replicas_E = np.array([len(s) for s in sets], dtype=np.int64)
        expert_N = np.repeat(np.arange(E, dtype=np.int64), replicas_E)
        gpu_N = np.fromiter((g for s in sets for g in s), dtype=np.int64, count=len(expert_N))
        per_gpu = np.bincount(gpu_N, minlength=G)
        over = np.flatnonzero(per_gpu > slots)
        if over.size:
            g = int(over[0])
            raise ValueError(
                f"GPU {g} holds {int(per_gpu[g])} experts but has only {slots} slots"
            )
        holds_EG = np.zeros((E, G), dtype=bool)
        holds_EG[expert_N, gpu_N] = True
        holds_EG.flags.writeable = False
        start_E = np.zeros(E, dtype=np.int64)
        np.cumsum(replicas_E[:-1], out=start_E[1:])
        by_gpu_N = np.lexsort((expert_N, gpu_N)).astype(np.int64)
        rep_N = replicas_E[expert_N]
        index = _SlotIndex(
            expert_N=expert_N,
            gpu_N=gpu_N,
            start_E=start_E,
            replicas_E=replicas_E,
            by_gpu_N=by_gpu_N,
            key_N=expert_N * G + gpu_N,
            rep_N=rep_N,
            rot_N=(np.arange(len(expert_N)) - start_E[expert_N] + expert_N) % rep_N,
        )
        for arr in vars(index).values():
            arr.flags.writeable = False
        object.__setattr__(self, "num_gpus", G)
        object.__setattr__(self, "slots_per_gpu", slots)
        object.__setattr__(self, "gpus_of_expert", tuple(sets))
        object.__setattr__(self, "holds_EG", holds_EG)
        object.__setattr__(self, "replicas_E", replicas_E)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_cache", {})  # derived solver structures, built on demand

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


# ----------------------------------------------------------------------------- builders

PlacementBuilder = Callable[..., Placement]
PLACEMENTS: dict[str, PlacementBuilder] = {}


def register_placement(name: str) -> Callable[[PlacementBuilder], PlacementBuilder]:
    """Decorator: make a builder available as ``PLACEMENTS[name]`` / ``--placement name``."""

    def wrap(fn: PlacementBuilder) -> PlacementBuilder:
        if name in PLACEMENTS:
            raise ValueError(f"placement {name!r} is already registered")
        PLACEMENTS[name] = fn
        return fn

    return wrap


def build_placement(
    name: str,
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Placement:
    """``PLACEMENTS[name](num_gpus, num_experts, slots_per_gpu, loads_E=..., seed=...)``."""
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {name!r}; choose from {sorted(PLACEMENTS)}")
    return PLACEMENTS[name](num_gpus, num_experts, slots_per_gpu, loads_E=loads_E, seed=seed)


def _check_sizes(num_gpus: int, num_experts: int, slots_per_gpu: int) -> tuple[int, int, int]:
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


def _uniform_replicas(G: int, E: int, s: int, builder: str) -> int:
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


def _history(loads_E: Optional[np.ndarray], E: int, builder: str) -> np.ndarray:
    """A load history as int64 [steps, E] (a single [E] vector is one step)."""
    if loads_E is None:
        raise ValueError(
            f"{builder} placement needs a load history: pass loads_E ([E] or [steps, E])"
        )
    arr = np.asarray(loads_E)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != E:
        raise ValueError(
            f"{builder} placement: loads_E must have shape [{E}] or [steps, {E}], got {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{builder} placement: loads_E must be numeric, got {arr.dtype}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.floor(arr)):
        bad = arr[~(np.isfinite(arr) & (arr >= 0) & (arr == np.floor(arr)))][0]
        raise ValueError(f"{builder} placement: loads must be non-negative integers, got {bad!r}")
    if float(arr.sum(dtype=np.float64)) >= 2**62:  # float64: no int64 wrap-around
        total = sum(int(v) for v in arr.ravel().tolist())
        raise ValueError(f"{builder} placement: total load {total} of the history is too large")
    return arr.astype(np.int64)


@register_placement("standard")
def standard(
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Placement:
    """Megatron EP x EDP: expert e on GPU ``k * EP + (e mod EP)`` for every group k.

    ``EP = num_experts / slots_per_gpu`` GPUs per expert-parallel group, ``num_gpus / EP``
    groups (= replicas per expert). Ignores ``loads_E`` and ``seed``.
    """
    G, E, s = _check_sizes(num_gpus, num_experts, slots_per_gpu)
    if E % s:
        raise ValueError(
            f"standard placement needs num_experts ({E}) to be a multiple of slots_per_gpu ({s})"
        )
    ep = E // s
    if G % ep:
        raise ValueError(
            f"standard placement: expert-parallel size {ep} = num_experts / slots_per_gpu "
            f"must divide num_gpus ({G})"
        )
    groups = G // ep
    sets = tuple(tuple(k * ep + e % ep for k in range(groups)) for e in range(E))
    return Placement(G, s, sets, name="standard")


def _block_score(holds_EG: np.ndarray) -> tuple[int, int]:
    """Integer expansion proxy: (fewest distinct neighbours of a GPU, -largest pair count)."""
    E, G = holds_EG.shape
    gpus_ER = np.nonzero(holds_EG)[1].reshape(E, -1)  # every expert has r replicas here
    pairs = (gpus_ER[:, :, None] * G + gpus_ER[:, None, :]).ravel()
    co_GG = np.bincount(pairs, minlength=G * G).reshape(G, G)
    np.fill_diagonal(co_GG, 0)
    neighbours = int((co_GG > 0).sum(1).min())
    return neighbours, -int(co_GG.max(initial=0))


@register_placement("symmetric")
def symmetric(
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
    candidates: int = 16,
) -> Placement:
    """Cayley (translation) design on ``Z_G`` with ``r = G * slots / E`` replicas per expert.

    With ``g0 = gcd(E, G)``, ``m = E / g0`` base blocks and ``d = G / g0``: block ``B_i`` holds
    ``r / d`` residues from every class mod ``d``, and expert ``(i, j)`` sits on
    ``{(b + j d) mod G : b in B_i}`` for ``j < g0``. Every GPU then holds exactly
    ``m r / d = slots_per_gpu`` experts. Of ``candidates`` seeded draws of the blocks, the one
    whose co-occurrence graph gives every GPU the most distinct neighbours (then the smallest
    largest pair multiplicity) is kept; GPU and expert labels are shuffled with the same seed.
    Ignores ``loads_E``.
    """
    G, E, s = _check_sizes(num_gpus, num_experts, slots_per_gpu)
    r = _uniform_replicas(G, E, s, "symmetric")
    g0 = math.gcd(E, G)
    m, d = E // g0, G // g0
    per_class = r // d  # r is a multiple of d because m divides s (see the docstring)
    rng = np.random.default_rng(seed)
    best: Optional[tuple[tuple[int, int], np.ndarray]] = None
    for _ in range(max(1, int(candidates))):
        holds = np.zeros((E, G), dtype=bool)
        for i in range(m):
            block = np.concatenate(
                [c + d * rng.choice(G // d, per_class, replace=False) for c in range(d)]
            )
            for j in range(g0):
                holds[i * g0 + j, (block + j * d) % G] = True
        score = _block_score(holds)
        if best is None or score > best[0]:
            best = (score, holds)
    assert best is not None
    gpu_perm = rng.permutation(G)
    expert_perm = rng.permutation(E)
    holds = best[1][expert_perm][:, gpu_perm]
    return Placement.from_holds(holds, s, name="symmetric")


def _replica_counts(total_E: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
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


def _pack(
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


def _replica_weights(total_E: np.ndarray, counts_E: np.ndarray) -> np.ndarray:
    """Load per replica of each expert, scaled by the lcm of the counts to stay an integer."""
    lcm = 1
    for c in np.unique(counts_E).tolist():
        lcm = lcm * c // math.gcd(lcm, c)
    if lcm * int(total_E.max(initial=0)) >= 2**40:  # huge histories: a rounded share
        share = total_E.astype(np.float64) / counts_E
        return np.floor(share / max(share.max(initial=1.0), 1.0) * 2**38).astype(np.int64)
    return total_E * (lcm // counts_E)


@register_placement("eplb")
def eplb(
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Placement:
    """DeepSeek EPLB, global policy: ``replicate_experts`` then ``balanced_packing``.

    ``loads_E``: the load history, [E] or [steps, E] (summed over steps). All
    ``num_gpus * slots_per_gpu`` slots are filled. Deterministic; ``seed`` is unused.
    """
    G, E, s = _check_sizes(num_gpus, num_experts, slots_per_gpu)
    total_E = _history(loads_E, E, "eplb").sum(0)
    counts_E = _replica_counts(total_E, G * s, G)
    holds = _pack(_replica_weights(total_E, counts_E), counts_E, G, s, np.arange(G))
    return Placement.from_holds(holds, s, name="eplb")


@register_placement("asymmetric")
def asymmetric(
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
    candidates: int = 8,
    max_steps: int = 64,
) -> Placement:
    """Replica counts from the load history, GPU sets chosen for a low worst subset density.

    ``loads_E``: [E] or [steps, E]. Counts: greedy (next replica to the largest load per
    replica). Candidates: EPLB's balanced packing first, then packings with seeded random
    tie-breaks and replica weights perturbed by up to 10%; the candidate with the
    lowest mean optimal makespan over the history steps (= the worst subset density, rounded up;
    at most ``max_steps`` evenly spaced steps are used) wins, ties to the earlier candidate.
    """
    from moebal.schedule.solve import solve_schedule

    G, E, s = _check_sizes(num_gpus, num_experts, slots_per_gpu)
    history_SE = _history(loads_E, E, "asymmetric")
    total_E = history_SE.sum(0)
    counts_E = _replica_counts(total_E, G * s, G)
    weight_E = _replica_weights(total_E, counts_E)
    if len(history_SE) > max_steps:  # evaluate on evenly spaced steps
        history_SE = history_SE[np.linspace(0, len(history_SE) - 1, max_steps).astype(np.int64)]
    rng = np.random.default_rng(seed)
    best: Optional[tuple[int, Placement]] = None
    for c in range(max(1, int(candidates))):
        if c == 0:  # EPLB's own packing, so the result is never worse than eplb here
            w, priority_G = weight_E, np.arange(G)
        else:  # seeded tie-breaks and weights perturbed by up to +10%
            priority_G = rng.permutation(G)
            w = weight_E * 10240 + weight_E * rng.integers(0, 1024, size=E)
        holds = _pack(w, counts_E, G, s, priority_G)
        cand = Placement.from_holds(holds, s, name="asymmetric")
        score = sum(solve_schedule(cand, row).makespan for row in history_SE)
        if best is None or score < best[0]:
            best = (score, cand)
    assert best is not None
    return best[1]


# ------------------------------------------------------------------------ subset density


def _loads_vector(placement: Placement, loads_E: np.ndarray) -> np.ndarray:
    arr = np.asarray(loads_E)
    if arr.shape != (placement.num_experts,):
        raise ValueError(
            f"loads_E must have shape [{placement.num_experts}] (one count per expert), "
            f"got {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"loads_E must be numeric, got {arr.dtype}")
    ok = np.isfinite(arr) & (arr >= 0) & (arr == np.floor(arr))
    if not ok.all():
        e = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"loads must be non-negative integers; expert {e} has {arr[e]!r}")
    if float(arr.sum(dtype=np.float64)) >= 2**53:  # float64: no int64 wrap-around
        total = sum(int(v) for v in arr.tolist())
        raise ValueError(f"densest_subset: total load {total} must stay below 2^53")
    return arr.astype(np.int64)


def densest_subset(
    placement: Placement, loads_E: np.ndarray, *, max_gpus: int = 20
) -> tuple[Fraction, tuple[int, ...]]:
    """Exact ``max_S sum_{e: G_e within S} load_e / |S|`` by enumerating all GPU subsets.

    Returns ``(density, S)`` with ``density`` an exact Fraction and ``S`` the sorted GPU ids of
    a maximising subset (the smallest such, then the lowest bitmask). Time O(E r + G 2^G) with
    a subset-sum (zeta) transform over bitmasks, memory O(2^G); refused above ``max_gpus``
    GPUs (use :func:`moebal.schedule.lp_optimum`, equal by LP duality, for large G).
    """
    G = placement.num_gpus
    if G > max_gpus:
        raise ValueError(
            f"densest_subset enumerates 2^G subsets; G = {G} exceeds max_gpus = {max_gpus}"
        )
    loads = _loads_vector(placement, loads_E)
    idx = placement._index
    bit_N = np.left_shift(np.int64(1), idx.gpu_N)
    mask_E = np.bitwise_or.reduceat(bit_N, idx.start_E)
    f = np.bincount(mask_E, weights=loads, minlength=1 << G)  # exact: integer sums < 2^53
    for i in range(G):  # f[S] <- sum over subsets of S
        view = f.reshape(-1, 2, 1 << i)
        view[:, 1, :] += view[:, 0, :]
    sums = f.astype(np.int64)
    sizes = np.zeros(1 << G, dtype=np.int64)
    for i in range(G):
        sizes.reshape(-1, 2, 1 << i)[:, 1, :] += 1
    best: Optional[tuple[Fraction, int]] = None
    for k in range(1, G + 1):
        members = np.flatnonzero(sizes == k)
        j = int(members[np.argmax(sums[members])])  # first (lowest mask) maximiser
        value = Fraction(int(sums[j]), k)
        if best is None or value > best[0]:
            best = (value, j)
    assert best is not None
    density, mask = best
    return density, tuple(g for g in range(G) if mask >> g & 1)


def subset_density(placement: Placement, loads_E: np.ndarray, *, max_gpus: int = 20) -> Fraction:
    """The worst subset density (exact Fraction); see :func:`densest_subset`."""
    return densest_subset(placement, loads_E, max_gpus=max_gpus)[0]
