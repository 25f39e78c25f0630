"""What the patched layers of a model routed: the accumulator their adapters add to.

A ``transformers`` router module must return the model's own ``(logits, weights, indices)``,
so the rest of moebal's :class:`moebal.routing.Routing` (loads, aux loss, z-loss) cannot be
returned through the model; each model forward adds its layers' routings to the
:class:`RoutingRecord` when it ends, and the patch handle reads them from there.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

from moebal.routing import Routing


def detached(routing: Routing) -> Routing:
    """``routing`` with every tensor detached from its autograd graph."""
    return Routing(**{f.name: None if getattr(routing, f.name) is None
                      else getattr(routing, f.name).detach() for f in fields(Routing)})


class RoutingRecord:
    """Per MoE layer: the :class:`Routing` of its latest forward and its training loads since
    the last optimizer step.

    latest[i]         layer i's latest Routing (None before its first forward).
    step_loads_LE[i]  int64 [E]: layer i's loads summed over its training forwards since the
                      last :meth:`end_step` (None: none since).

    ``copy.deepcopy`` copies the latest routings without their autograd graph (torch cannot
    deep-copy a tensor that is not a graph leaf), so a model that holds a record copies.
    """

    def __init__(self, num_layers: int) -> None:
        self.latest: list[Optional[Routing]] = [None] * num_layers
        self.step_loads_LE: list[Optional[torch.Tensor]] = [None] * num_layers

    def add(self, layer: int, routing: Routing, training: bool) -> None:
        """What layer ``layer`` routed; a training forward's loads count towards the step."""
        self.latest[layer] = routing
        if training:
            loads_E = routing.loads_E.detach()
            before = self.step_loads_LE[layer]
            self.step_loads_LE[layer] = loads_E if before is None else before + loads_E

    def end_step(self) -> None:
        """Start counting the next optimizer step's loads."""
        self.step_loads_LE = [None] * len(self.step_loads_LE)

    def __deepcopy__(self, memo: dict) -> "RoutingRecord":
        copy = RoutingRecord(0)
        memo[id(self)] = copy
        copy.latest = [None if r is None else detached(r) for r in self.latest]
        copy.step_loads_LE = [None if t is None else t.clone() for t in self.step_loads_LE]
        return copy


__all__ = ["RoutingRecord", "detached"]
