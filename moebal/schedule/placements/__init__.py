"""The placement builders, one file each, and their registry ``PLACEMENTS``.

Every builder has one signature,
``build(num_gpus, num_experts, slots_per_gpu, *, loads_E=None, seed=0) -> Placement``:

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

A new builder is one file here defining the function, plus its entry in ``PLACEMENTS`` below
(and its module in the import line above it); from outside the package,
``register_placement(name)(fn)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from moebal.schedule.placement import Placement
from moebal.schedule.placements import asymmetric, eplb, standard, symmetric

PlacementBuilder = Callable[..., Placement]
PLACEMENTS: dict[str, PlacementBuilder] = {
    "standard": standard.standard,
    "symmetric": symmetric.symmetric,
    "eplb": eplb.eplb,
    "asymmetric": asymmetric.asymmetric,
}


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
    """``PLACEMENTS[name](num_gpus, num_experts, slots_per_gpu, loads_E=..., seed=...)``.

    ``loads_E``: the load history, int [E] or [P steps, E] (needed by eplb and asymmetric).
    """
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {name!r}; choose from {sorted(PLACEMENTS)}")
    return PLACEMENTS[name](num_gpus, num_experts, slots_per_gpu, loads_E=loads_E, seed=seed)
