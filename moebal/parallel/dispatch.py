"""The expert-parallel token dispatcher: the rows of one MoE layer sent to the ranks the plan
chose, and back.

It has the calls of :class:`moebal.model.dispatch.LocalDispatcher`, and its permutations:

    dispatch(x_TD, routing) -> (x_recv_ND, local_counts, meta)
        1. the kept slots sorted by expert (``sort_slots``), counts per expert;
        2. the counts all-gathered over the scheduling group (``loads_GE``) and the same
           plan computed on every rank (``moebal.parallel.plan``);
        3. each expert's run split over its destinations in rank order and the rows
           reordered destination-major (``sort_runs``), then sent (variable-split
           all-to-all);
        4. the received rows (source-major, expert-ascending) regrouped by local expert.
    combine(y_recv_ND, meta) -> out_TD
        the regrouping undone, the rows sent back (reverse all-to-all), gate-weighted and
        summed per token at the source (``combine_rows``).

Shapes (docs/design.md): T tokens, K slots per token, E experts, G ranks of the scheduling
group, N routed rows: ``*_ND`` the rows this rank sends (its kept slots), ``*_recv_ND`` the
rows it receives and computes (from every rank of the group, itself too; another count).
``local_counts`` has one entry per expert of this rank. Every step is differentiable; the
all-to-all's backward is the reverse all-to-all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from moebal.model.dispatch import combine_rows, inverse_permutation, sort_runs, sort_slots
from moebal.parallel.comm import all_gather_counts, all_to_all
from moebal.parallel.plan import Planner, RankPlan
from moebal.routing import Routing


@dataclass(frozen=True)
class ExpertParallelDispatch:
    """What :meth:`ExpertParallelDispatcher.combine` needs, and what the layer moved.

    token_N, weight_N  int64 [N], [N]: token and gate weight of each sent row, in send order.
    num_tokens, dtype  T and the dtype of ``x_TD`` (those of the output).
    input_splits       rows sent to each rank of the group; output_splits: received.
    unsort_recv_N      int64: the received rows' arrival order from the local-expert order.
    plan               this rank's plan; t_schedule: seconds the planner took.
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int
    dtype: torch.dtype
    input_splits: list[int]
    output_splits: list[int]
    unsort_recv_N: torch.Tensor
    plan: RankPlan
    t_schedule: float

    def counters(self, group_rank: int) -> dict[str, float]:
        """The token counters of :class:`moebal.parallel.RankStepStats` for this dispatch."""
        computed = sum(self.output_splits)
        return {
            "tokens_computed": computed,
            "tokens_sent": sum(self.input_splits) - int(self.plan.send_EG[:, group_rank].sum()),
            "tokens_received": computed - int(self.plan.recv_GE[group_rank].sum()),
            "makespan": self.plan.makespan,
            "makespan_unscheduled": self.plan.makespan_unscheduled,
        }


class ExpertParallelDispatcher:
    """One MoE layer's dispatch over a scheduling group (see the module docstring).

    ``local_experts``: the experts of this rank, in the order of its local weights;
    ``group``: the scheduling group's process group (None: the default group), in which
    this rank is ``group_rank`` of ``group_size``; ``planner``: the same on every rank.
    """

    def __init__(self, *, num_experts: int, local_experts: Sequence[int], group: Any,
                 group_rank: int, group_size: int, planner: Planner, layer_index: int,
                 device: torch.device):
        G, E = group_size, num_experts
        self.num_experts, self.group, self.group_rank, self.group_size = E, group, group_rank, G
        self.planner, self.layer_index = planner, layer_index
        self.local_experts = tuple(int(e) for e in local_experts)
        self._local_ids = np.asarray(self.local_experts, dtype=np.int64)
        # sent rows come in runs (e, g), e-major: ordered destination-major, then by expert
        e_EG, g_EG = torch.meshgrid(torch.arange(E), torch.arange(G), indexing="ij")
        self._send_key_EG = (g_EG * E + e_EG).to(device)
        # received rows come in runs (g, e), g-major: ordered by local slot, then by source
        slot_of_E = torch.full((E,), -1, dtype=torch.long)
        slot_of_E[list(self.local_experts)] = torch.arange(len(self.local_experts))
        g_GE, e_GE = torch.meshgrid(torch.arange(G), torch.arange(E), indexing="ij")
        self._recv_key_GE = (slot_of_E[e_GE] * G + g_GE).to(device)

    def _plan(self, counts_E: torch.Tensor) -> tuple[RankPlan, float]:
        loads_GE = all_gather_counts(counts_E, self.group,
                                     what=f"expert counts of MoE layer {self.layer_index}")
        start = time.perf_counter()
        plan = self.planner.plan(loads_GE.cpu().numpy(), self.group_rank, layer=self.layer_index)
        return plan, time.perf_counter() - start

    def dispatch(self, x_TD: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelDispatch]:
        """``(x_recv_ND, local_counts, meta)``: the rows this rank computes, sorted by local
        expert, and the rows per local expert."""
        device = x_TD.device
        slots = sort_slots(routing.indices_TK, routing.kept_TK, self.num_experts)
        plan, t_schedule = self._plan(slots.counts_E)
        N = len(slots.slot_N)
        if int(plan.send_EG.sum()) != N:
            raise RuntimeError(f"the plan of MoE layer {self.layer_index} sends "
                               f"{int(plan.send_EG.sum())} rows of rank {self.group_rank}'s {N}")
        send_EG = torch.from_numpy(plan.send_EG).to(device)
        order_N = sort_runs(send_EG.reshape(-1), self._send_key_EG.to(device).reshape(-1), N)
        token_N = slots.token_N[order_N]
        input_splits = plan.send_EG.sum(0).tolist()
        output_splits = plan.recv_GE.sum(1).tolist()
        x_recv_ND = all_to_all(x_TD[token_N], output_splits, input_splits, self.group,
                               what=f"dispatch all-to-all of MoE layer {self.layer_index}")
        recv_GE = torch.from_numpy(plan.recv_GE).to(device)
        sort_recv_N = sort_runs(recv_GE.reshape(-1), self._recv_key_GE.to(device).reshape(-1),
                                int(x_recv_ND.shape[0]))
        local_counts = torch.from_numpy(plan.recv_GE[:, self._local_ids].sum(0)).to(device)
        meta = ExpertParallelDispatch(
            token_N=token_N, weight_N=routing.weights_TK.reshape(-1)[slots.slot_N[order_N]],
            num_tokens=x_TD.shape[0], dtype=x_TD.dtype,
            input_splits=input_splits, output_splits=output_splits,
            unsort_recv_N=inverse_permutation(sort_recv_N), plan=plan, t_schedule=t_schedule,
        )
        return x_recv_ND[sort_recv_N], local_counts, meta

    def combine(self, y_recv_ND: torch.Tensor, meta: ExpertParallelDispatch) -> torch.Tensor:
        """``out_TD``: the computed rows back at their source, gate-weighted, per token."""
        y_back_ND = all_to_all(y_recv_ND[meta.unsort_recv_N], meta.input_splits,
                               meta.output_splits, self.group,
                               what=f"combine all-to-all of MoE layer {self.layer_index}")
        return combine_rows(y_back_ND, meta.token_N, meta.weight_N, meta.num_tokens, meta.dtype)


__all__ = ["ExpertParallelDispatch", "ExpertParallelDispatcher"]
