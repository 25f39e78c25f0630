"""``eplb``: DeepSeek EPLB's global policy, as a baseline."""

from __future__ import annotations

from typing import Optional

import numpy as np

from moebal.schedule.loads import load_history
from moebal.schedule.placement import Placement
from moebal.schedule.placements.packing import check_sizes, pack, replica_counts, replica_weights


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
    G, E, s = check_sizes(num_gpus, num_experts, slots_per_gpu)
    total_E = load_history(loads_E, E, "eplb").sum(0)
    counts_E = replica_counts(total_E, G * s, G)
    holds = pack(replica_weights(total_E, counts_E), counts_E, G, s, np.arange(G))
    return Placement.from_holds(holds, s, name="eplb")
