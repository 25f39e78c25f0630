"""Replica placement and per-micro-batch token scheduling across GPUs (pure NumPy).

Shared by the cluster simulator and the distributed runtime; imports nothing from the model,
the trainer or the runtime.
"""

from moebal.schedule.placement import (
    PLACEMENTS,
    Placement,
    asymmetric,
    build_placement,
    densest_subset,
    eplb,
    register_placement,
    standard,
    subset_density,
    symmetric,
)
from moebal.schedule.solve import (
    METHODS,
    SCHEDULERS,
    Schedule,
    even_split_makespan,
    lp_optimum,
    register_scheduler,
    solve_schedule,
)

__all__ = [
    "METHODS",
    "PLACEMENTS",
    "Placement",
    "SCHEDULERS",
    "Schedule",
    "asymmetric",
    "build_placement",
    "densest_subset",
    "eplb",
    "even_split_makespan",
    "lp_optimum",
    "register_placement",
    "register_scheduler",
    "solve_schedule",
    "standard",
    "subset_density",
    "symmetric",
]
