"""``symmetric``: a Cayley (translation) design on ``Z_G``, for unknown loads."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from moebal.schedule.placement import Placement
from moebal.schedule.placements.packing import check_sizes, uniform_replicas


def _block_score(holds_EG: np.ndarray) -> tuple[int, int]:
    """Integer expansion proxy: (fewest distinct neighbours of a GPU, -largest pair count)."""
    E, G = holds_EG.shape
    gpus_ER = np.nonzero(holds_EG)[1].reshape(E, -1)  # every expert has r replicas here
    pairs = (gpus_ER[:, :, None] * G + gpus_ER[:, None, :]).ravel()
    co_GG = np.bincount(pairs, minlength=G * G).reshape(G, G)
    np.fill_diagonal(co_GG, 0)
    neighbours = int((co_GG > 0).sum(1).min())
    return neighbours, -int(co_GG.max(initial=0))


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
    G, E, s = check_sizes(num_gpus, num_experts, slots_per_gpu)
    r = uniform_replicas(G, E, s, "symmetric")
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
