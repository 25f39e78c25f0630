"""``asymmetric``: replica counts from a load history, GPU sets chosen by the exact makespan."""

from __future__ import annotations

from typing import Optional

import numpy as np

from moebal.schedule.loads import load_history
from moebal.schedule.placement import Placement
from moebal.schedule.placements.packing import check_sizes, pack, replica_counts, replica_weights
from moebal.schedule.solve import solve_schedule


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
    G, E, s = check_sizes(num_gpus, num_experts, slots_per_gpu)
    history_PE = load_history(loads_E, E, "asymmetric")
    total_E = history_PE.sum(0)
    counts_E = replica_counts(total_E, G * s, G)
    weight_E = replica_weights(total_E, counts_E)
    if len(history_PE) > max_steps:  # evaluate on evenly spaced steps
        history_PE = history_PE[np.linspace(0, len(history_PE) - 1, max_steps).astype(np.int64)]
    rng = np.random.default_rng(seed)
    best: Optional[tuple[int, Placement]] = None
    for c in range(max(1, int(candidates))):
        if c == 0:  # EPLB's own packing, so the result is never worse than eplb here
            w, priority_G = weight_E, np.arange(G)
        else:  # seeded tie-breaks and weights perturbed by up to +10%
            priority_G = rng.permutation(G)
            w = weight_E * 10240 + weight_E * rng.integers(0, 1024, size=E)
        holds = pack(w, counts_E, G, s, priority_G)
        cand = Placement.from_holds(holds, s, name="asymmetric")
        score = sum(solve_schedule(cand, row).makespan for row in history_PE)
        if best is None or score < best[0]:
            best = (score, cand)
    assert best is not None
    return best[1]
