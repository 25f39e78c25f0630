"""Subset densities: the lower bounds on the makespan, and the exact worst subset.

For loads ``load_e`` and a GPU set S, ``density(S) = sum_{e: G_e within S} load_e / |S|``:
the experts whose every replica lies in S must be computed inside S, so no plan finishes
before ``ceil(density(S))``. By max-flow min-cut the largest density is the optimal
fractional makespan (see :mod:`moebal.schedule.solve`).

Plans here are slot vectors ``x_N`` (tokens of slot n's expert computed on slot n's GPU, in
the order of :class:`moebal.schedule.placement.SlotIndex`).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import numpy as np

from moebal.schedule.loads import expert_loads
from moebal.schedule.placement import Placement, SlotIndex


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def gpu_loads(idx: SlotIndex, x_N: np.ndarray, G: int) -> np.ndarray:
    """int64 [G]: tokens each GPU computes under the slot plan ``x_N``."""
    # float64 weights are exact here: every partial sum is an integer below 2^53
    return np.bincount(idx.gpu_N, weights=x_N, minlength=G).astype(np.int64)


def even_plan(idx: SlotIndex, loads_E: np.ndarray) -> np.ndarray:
    """x_N: each expert's tokens split as evenly as possible over its replicas."""
    load_N = loads_E[idx.expert_N]
    q_N = load_N // idx.rep_N
    return q_N + (idx.rot_N < load_N - q_N * idx.rep_N)


def covered_load(idx: SlotIndex, loads_E: np.ndarray, mask_G: np.ndarray) -> int:
    """sum of load_e over experts whose every replica lies in the GPU set ``mask_G`` [G]."""
    covered_E = np.logical_and.reduceat(mask_G[idx.gpu_N], idx.start_E)
    return int(loads_E[covered_E].sum())


def simple_bound(idx: SlotIndex, loads_E: np.ndarray, G: int) -> tuple[int, np.ndarray]:
    """(max(ceil(total/G), max_e ceil(load_e/|G_e|)), bool [G]: a GPU set attaining it)."""
    total = int(loads_E.sum())
    per_E = -(-loads_E // idx.replicas_E)
    e = int(np.argmax(per_E))
    if int(per_E[e]) > ceil_div(total, G):
        mask = np.zeros(G, dtype=bool)
        mask[idx.gpu_N[idx.start_E[e] : idx.start_E[e] + idx.replicas_E[e]]] = True
        return int(per_E[e]), mask
    return ceil_div(total, G), np.ones(G, dtype=bool)


def prefix_bound(
    idx: SlotIndex, loads_E: np.ndarray, load_G: np.ndarray, G: int
) -> tuple[int, np.ndarray]:
    """Best ceil-density over the prefixes of the GPUs sorted by decreasing ``load_G`` [G]."""
    order_G = np.argsort(-load_G, kind="stable")
    rank_G = np.empty(G, dtype=np.int64)
    rank_G[order_G] = np.arange(G)
    last_E = np.maximum.reduceat(rank_G[idx.gpu_N], idx.start_E)
    cover_K = np.cumsum(np.bincount(last_E, weights=loads_E, minlength=G)).astype(np.int64)
    k_K = np.arange(1, G + 1)
    bound_K = -(-cover_K // k_K)
    k = int(np.argmax(bound_K))
    return int(bound_K[k]), rank_G <= k


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
    loads = expert_loads(placement.num_experts, loads_E)
    idx = placement.slots
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
