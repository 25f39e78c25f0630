"""moebal's scheduled replicated experts as a torchtitan token dispatcher.

:class:`ScheduledTokenDispatcher` subclasses torchtitan's ``AllToAllTokenDispatcher`` and
is chosen through its ``Config`` (``RoutedExperts.Config(token_dispatcher=...)``, or
:func:`use_scheduled_dispatcher` on a whole model config). Once the EP mesh is wired
(``wire_meshes(ep_mesh=...)``, which torchtitan's ``RoutedExperts.parallelize`` calls), each
forward of a MoE block:

1. reorders the rank's routed tokens by expert (torchtitan's ``_local_reorder``);
2. all-gathers the per-(source, expert) counts ``loads_GE`` [G, E] over the EP group;
3. solves the same deterministic schedule on every rank: ``moebal.schedule.solve_schedule``
   on the placement (built by ``moebal.schedule.build_placement``: ``standard``,
   ``symmetric``, ``asymmetric``) and ``loads_GE``, warm-started from the block's previous
   plan: the busiest rank computes ``ceil(LP optimum)`` tokens and, among such plans, as
   few tokens as possible leave their source;
4. sends each token to its scheduled replica (one variable-split all-to-all), runs the
   local expert slots as one grouped matmul and combines the outputs back (the reverse
   all-to-all, then torchtitan's own scoring and deterministic scatter-add).

Expert weights: rank g holds the experts ``{e : g in gpus_of_expert[e]}`` of the placement,
in increasing order, as the rows of its ``GroupedExperts`` parameters (``place_experts``
cuts them from the full [E, ...] weights, identical on every rank). This is not
torchtitan's expert sharding (``Shard(0)`` of a DTensor over the EP mesh, E / EP
contiguous experts per rank): with replicas an expert lives on several ranks and a rank's
rows are not a contiguous block, so the expert parameters are plain local tensors; do not
let torchtitan's ``parallelize`` apply its EP sharding (or FSDP over the EP dimension) to
them, and checkpoint them per rank. Replicas see different tokens, so after backward
:func:`sync_replica_grads` sums each expert's gradient over the ranks holding it; with the
same optimizer the replicas then stay identical. With the ``standard`` placement and
``slots_per_rank = E / EP`` each expert has one replica, as in torchtitan, but moebal deals
the experts out round-robin (expert e on rank ``e mod EP``) where torchtitan's shard is a
contiguous block.

Per forward, a :class:`DispatchRecord` (makespan, its lower bound, the makespan of a fixed
replica per source, tokens moved) is appended to the list handed to ``record_into``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torchtitan.models.common.moe import RoutedExperts
from torchtitan.models.common.token_dispatcher import (
    AllToAllTokenDispatcher,
    LocalDispatchMetadata,
    LocalTokenDispatcher,
)

from moebal.parallel import all_to_all
from moebal.parallel.comm import all_gather_counts, all_reduce_
from moebal.schedule import PLACEMENTS, Placement, build_placement, solve_schedule

EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")  # GroupedExperts parameters, [E, ...]


@dataclass(frozen=True)
class DispatchRecord:
    """One scheduled dispatch (one MoE block, one micro-batch), over the EP group.

    makespan              tokens computed on the busiest rank under the plan.
    lower_bound           the schedule's cheap lower bound on any plan's makespan.
    makespan_unscheduled  the same with a fixed replica per source (its own if it holds the
                          expert, else replica ``source mod replicas``).
    tokens_moved          tokens computed on a rank other than their source.
    tokens                routed token-slots of the whole group.
    """

    makespan: int
    lower_bound: int
    makespan_unscheduled: int
    tokens_moved: int
    tokens: int


@dataclass(frozen=True, kw_only=True)
class ScheduledDispatchMetadata(LocalDispatchMetadata):
    """What combine() needs from dispatch()."""

    send_order_N: torch.Tensor  # expert-sorted position of each row sent, destination-major
    local_order_R: torch.Tensor  # received position of each row computed, slot-major
    input_splits: list[int]
    output_splits: list[int]


def _segments(starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """int64 indices ``concat(arange(s, s + n) for s, n in zip(starts, lengths))``."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    offsets = np.repeat(starts.astype(np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return torch.from_numpy(offsets + np.arange(total, dtype=np.int64))


def _exclusive_cumsum(a: np.ndarray, axis: int) -> np.ndarray:
    return np.cumsum(a, axis=axis) - a


def local_experts(placement: Placement, rank: int) -> list[int]:
    """The experts rank ``rank`` holds, in increasing order (its expert-slot rows)."""
    return [e for e, gpus in enumerate(placement.gpus_of_expert) if rank in gpus]


def unscheduled_makespan(placement: Placement, loads_GE: np.ndarray) -> int:
    """Busiest rank when source g sends expert e to itself if it holds e, else to replica
    ``g mod |replicas|`` of e (a fixed rule, no schedule)."""
    G = placement.num_gpus
    computed_G = np.zeros(G, dtype=np.int64)
    for e, gpus in enumerate(placement.gpus_of_expert):
        for g in range(G):
            computed_G[g if g in gpus else gpus[g % len(gpus)]] += loads_GE[g, e]
    return int(computed_G.max())


class ScheduledTokenDispatcher(AllToAllTokenDispatcher):
    """torchtitan's EP dispatcher, with tokens scheduled onto moebal's expert replicas.

    Config (besides torchtitan's ``num_experts``, ``top_k``):
        placement        a ``moebal.schedule`` placement name.
        slots_per_rank   expert slots per rank (None: E / EP, no replicas).
        placement_seed   seed of the placement builders that use one.
        placement_loads  a load history ([E] per step) for the builders that need one
                         (``asymmetric``); the same on every rank.

    Without an EP mesh (EP = 1) it is torchtitan's local dispatcher.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(AllToAllTokenDispatcher.Config):
        placement: str = "symmetric"
        slots_per_rank: Optional[int] = None
        placement_seed: int = 0
        placement_loads: Optional[list] = None

    def __init__(self, config: Config):
        super().__init__(config)
        if config.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, "
                             f"got {config.placement!r}")
        slots = config.slots_per_rank
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int)
                                  or not 1 <= slots <= config.num_experts):
            raise ValueError(f"slots_per_rank must be an int in 1..{config.num_experts} "
                             f"or None, got {slots!r}")
        self.config = config
        self.placement: Optional[Placement] = None
        self.rank = 0
        self.group: Any = None
        self.experts: list[int] = list(range(config.num_experts))
        self.records: Optional[list[DispatchRecord]] = None
        self._prev = None  # the previous plan of this block (warm start)

    def wire_meshes(self, *, ep_mesh) -> None:
        """Install the EP mesh and build the placement for its size."""
        super().wire_meshes(ep_mesh=ep_mesh)
        if ep_mesh is None:
            self.placement, self.experts = None, list(range(self.num_experts))
            return
        G, E = ep_mesh.size(), self.num_experts
        slots = self.config.slots_per_rank
        if slots is None:
            if E % G:
                raise ValueError(f"{E} experts do not split over {G} EP ranks; set "
                                 f"slots_per_rank")
            slots = E // G
        if slots * G < E:
            raise ValueError(f"{G} ranks x {slots} slots cannot hold {E} experts")
        loads = self.config.placement_loads
        self.placement = build_placement(
            self.config.placement, G, E, slots, seed=self.config.placement_seed,
            loads_E=None if loads is None else np.asarray(loads))
        self.group = ep_mesh.get_group()
        self.rank = ep_mesh.get_local_rank()
        self.experts = local_experts(self.placement, self.rank)
        self._prev = None

    def record_into(self, records: Optional[list]) -> None:
        """Append a :class:`DispatchRecord` to ``records`` at every EP forward (None: stop)."""
        self.records = records

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        if self.ep_mesh is None:
            return LocalTokenDispatcher.dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK,
                                                 num_local_tokens_per_expert_E)
        placement, rank, E = self.placement, self.rank, self.num_experts
        routed_ND, token_indices_N, scores_N = self._local_reorder(
            x_TD, topk_scores_TK, topk_expert_ids_TK)
        with torch.no_grad():
            loads_GE = all_gather_counts(num_local_tokens_per_expert_E.detach().cpu(),
                                         self.group, "expert counts").numpy()
        schedule = solve_schedule(placement, loads_GE, prev=self._prev)
        self._prev = schedule
        source, expert, gpu, tokens = schedule.sends.T
        G = placement.num_gpus
        send_EG = np.zeros((E, G), dtype=np.int64)
        np.add.at(send_EG, (expert[source == rank], gpu[source == rank]),
                  tokens[source == rank])
        recv_GE = np.zeros((G, E), dtype=np.int64)
        np.add.at(recv_GE, (source[gpu == rank], expert[gpu == rank]), tokens[gpu == rank])
        if not np.array_equal(send_EG.sum(1), loads_GE[rank]):
            raise RuntimeError(f"rank {rank}: the schedule does not send each of its tokens once")

        # this rank's rows are expert-sorted; chunk (e, g) goes to rank g, sent g-major
        expert_start_E = _exclusive_cumsum(loads_GE[rank], 0)
        start_EG = expert_start_E[:, None] + _exclusive_cumsum(send_EG, 1)
        send_order_N = _segments(start_EG.T.reshape(-1), send_EG.T.reshape(-1))
        input_splits = send_EG.sum(0).tolist()
        output_splits = recv_GE.sum(1).tolist()
        received_MD = all_to_all(routed_ND[send_order_N.to(routed_ND.device)], output_splits,
                                 input_splits, self.group, "scheduled dispatch")
        # received rows: source-major, then by expert; computed slot-major, then by source
        start_GE = _exclusive_cumsum(recv_GE.sum(1), 0)[:, None] + _exclusive_cumsum(recv_GE, 1)
        mine = self.experts
        local_order_R = _segments(start_GE[:, mine].T.reshape(-1),
                                  recv_GE[:, mine].T.reshape(-1))
        if local_order_R.numel() != received_MD.shape[0]:
            raise RuntimeError(f"rank {rank}: the schedule sends it tokens of experts it "
                               f"does not hold")
        routed_RD = received_MD[local_order_R.to(received_MD.device)]
        tokens_per_slot = torch.from_numpy(recv_GE[:, mine].sum(0)).to(x_TD.device)

        if self.records is not None:
            self.records.append(DispatchRecord(
                makespan=int(schedule.makespan), lower_bound=int(schedule.lower_bound),
                makespan_unscheduled=unscheduled_makespan(placement, loads_GE),
                tokens_moved=int(schedule.tokens_moved), tokens=int(loads_GE.sum())))
        metadata = ScheduledDispatchMetadata(
            token_indices_experts_sorted_N=token_indices_N,
            topk_scores_experts_sorted_N=scores_N,
            send_order_N=send_order_N, local_order_R=local_order_R,
            input_splits=input_splits, output_splits=output_splits)
        return routed_RD, tokens_per_slot, metadata

    def combine(self, routed_output_RD, metadata, x_TD):
        if self.ep_mesh is None:
            return LocalTokenDispatcher.combine(self, routed_output_RD, metadata, x_TD)
        received_MD = routed_output_RD.new_empty(
            (sum(metadata.output_splits),) + tuple(routed_output_RD.shape[1:]))
        received_MD[metadata.local_order_R.to(received_MD.device)] = routed_output_RD
        back_ND = all_to_all(received_MD, metadata.input_splits, metadata.output_splits,
                             self.group, "scheduled combine")
        sorted_ND = back_ND.new_empty(back_ND.shape)
        sorted_ND[metadata.send_order_N.to(back_ND.device)] = back_ND
        local = LocalDispatchMetadata(
            token_indices_experts_sorted_N=metadata.token_indices_experts_sorted_N,
            topk_scores_experts_sorted_N=metadata.topk_scores_experts_sorted_N)
        return LocalTokenDispatcher.combine(self, sorted_ND, local, x_TD)


def scheduled_dispatchers(model: nn.Module) -> list[tuple[RoutedExperts, ScheduledTokenDispatcher]]:
    """``(routed experts, dispatcher)`` of every block of ``model`` (or of ``model`` itself)
    whose token dispatcher is a :class:`ScheduledTokenDispatcher`."""
    return [(m, m.token_dispatcher) for m in model.modules()
            if isinstance(m, RoutedExperts)
            and isinstance(m.token_dispatcher, ScheduledTokenDispatcher)]


def place_experts(model: nn.Module) -> None:
    """Keep, in every scheduled block, only the rows of this rank's experts of the full
    [E, ...] expert weights (identical on every rank: same seed or same checkpoint)."""
    for experts, dispatcher in scheduled_dispatchers(model):
        if dispatcher.placement is None:
            raise ValueError("place_experts: wire the EP mesh first (wire_meshes)")
        inner = experts.inner_experts
        rows = torch.tensor(dispatcher.experts, dtype=torch.int64)
        for name in EXPERT_WEIGHTS:
            full = getattr(inner, name)
            if full.shape[0] != dispatcher.num_experts:
                raise ValueError(f"{name} has {full.shape[0]} rows, not the {dispatcher.num_experts} "
                                 f"experts: already placed?")
            setattr(inner, name, nn.Parameter(full.detach()[rows.to(full.device)].clone(),
                                              requires_grad=full.requires_grad))


def sync_replica_grads(model: nn.Module, scale: float = 1.0) -> None:
    """Sum each expert's gradient over the ranks that hold a replica of it (then times
    ``scale``, e.g. 1 / data-parallel size for a mean), in every scheduled block; call
    after backward, before the optimizer step.

    One all-reduce per block over the EP group, of the block's expert gradients laid out as
    [E, ...] (zeros where a rank holds no replica): the sum over each expert's replica
    group, without a process group per replica set."""
    for experts, dispatcher in scheduled_dispatchers(model):
        if dispatcher.placement is None:
            continue
        inner, E = experts.inner_experts, dispatcher.num_experts
        params = [getattr(inner, name) for name in EXPERT_WEIGHTS]
        rows = torch.tensor(dispatcher.experts, dtype=torch.int64, device=params[0].device)
        fulls = []
        for param in params:
            full = param.new_zeros((E,) + tuple(param.shape[1:]))
            if param.grad is not None:
                full[rows] = param.grad
            fulls.append(full)
        flat = torch.cat([f.reshape(-1) for f in fulls])
        all_reduce_(flat, dispatcher.group, "replica gradients")
        for param, full in zip(params, flat.split([f.numel() for f in fulls])):
            grad = full.view((E,) + tuple(param.shape[1:]))[rows].mul_(scale)
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.copy_(grad)


def use_scheduled_dispatcher(model_config: Any, **options: Any) -> int:
    """Swap the token dispatcher of every ``RoutedExperts.Config`` inside a torchtitan
    model config for a :class:`ScheduledTokenDispatcher.Config` (``options``: its
    placement fields). Returns how many were swapped."""
    swapped = 0
    for _, cfg, parent, attr in model_config.traverse(RoutedExperts.Config):
        old = cfg.token_dispatcher
        cfg.token_dispatcher = ScheduledTokenDispatcher.Config(
            num_experts=old.num_experts, top_k=old.top_k, **options)
        swapped += 1
    return swapped


__all__ = ["DispatchRecord", "ScheduledTokenDispatcher", "local_experts",
           "place_experts", "scheduled_dispatchers", "sync_replica_grads",
           "unscheduled_makespan", "use_scheduled_dispatcher"]
