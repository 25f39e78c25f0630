"""Replica placement and per-micro-batch token scheduling across GPUs (pure NumPy).

Shared by the cluster simulator and the distributed runtime; imports nothing from the model,
the trainer or the runtime. Shape letters as in docs/design.md (E experts, G GPUs, R source
ranks with R = G here, N replica slots of a placement, P steps of a load history).

Modules, each importing only those before it: ``placement`` (``Placement`` and its
``SlotIndex``), ``loads`` (checked load arrays), ``bounds`` (subset densities), ``flow``
(routing under a capacity), ``locality`` (fewest tokens moved), ``highs`` (the LP
reference), ``solve`` (``solve_schedule`` and the scheduler registry), ``placements`` (the
builders and their registry).
"""

from moebal.schedule.bounds import densest_subset, subset_density
from moebal.schedule.placement import Placement, SlotIndex
from moebal.schedule.placements import PLACEMENTS, build_placement, register_placement
from moebal.schedule.placements.asymmetric import asymmetric
from moebal.schedule.placements.eplb import eplb
from moebal.schedule.placements.standard import standard
from moebal.schedule.placements.symmetric import symmetric
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
    "SlotIndex",
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
