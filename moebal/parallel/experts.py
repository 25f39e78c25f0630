"""The routed experts of one MoE layer spread over ranks: dispatch, compute, combine.

:class:`ExpertParallelExperts` replaces ``MoELayer.experts`` (the gate and the router stay
the model's). Its forward is the three calls of a token dispatcher around the model's own
grouped expert path (``GroupedExperts.run_sorted``) on this rank's experts, timed, with
the layer's counters added to the step's :class:`~moebal.parallel.stats.RankStepStats`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moebal.model import GroupedExperts
from moebal.parallel.dispatch import ExpertParallelDispatcher
from moebal.parallel.layout import ParallelLayout
from moebal.parallel.stats import RankStepStats
from moebal.routing import Routing


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``GroupedExperts`` whose experts live on several ranks.

    ``forward(x_TD, routing) -> y_TD`` as ``GroupedExperts`` (sum over each token's kept
    slots of gate weight x expert output), but each slot is computed on the rank the plan
    chose. ``local`` is a ``GroupedExperts`` over this rank's experts, ``local_experts``
    their ids (the dispatcher's). Training-mode forwards add their counters to ``stats``;
    with ``timing`` on CUDA the device is synchronised at each boundary.
    """

    def __init__(self, experts: GroupedExperts, dispatcher: ExpertParallelDispatcher,
                 layout: ParallelLayout, rank: int, stats: RankStepStats, timing: bool = True):
        super().__init__()
        ids = dispatcher.local_experts
        self.dispatcher, self.layout, self.rank, self.stats = dispatcher, layout, rank, stats
        self.timing = timing
        self.num_experts = experts.num_experts
        self.dim, self.hidden = experts.dim, experts.hidden
        self.local_experts = ids
        self.local = GroupedExperts(len(ids), experts.dim, experts.hidden).to(
            device=experts.w1_EDF.device, dtype=experts.w1_EDF.dtype
        )
        index = torch.tensor(ids, dtype=torch.long, device=experts.w1_EDF.device)
        with torch.no_grad():
            for name, param in self.local.named_parameters():
                param.copy_(getattr(experts, name).index_select(0, index))

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, local experts {list(self.local_experts)}, rank {self.rank}"

    def full_tensor(self, name: str) -> torch.Tensor:
        """``[E, ...]`` zeros except the experts this rank is the lowest replica of."""
        param = getattr(self.local, name)
        full = param.new_zeros((self.num_experts,) + tuple(param.shape[1:]))
        for slot, e in enumerate(self.local_experts):
            if self.layout.replica_set(e)[0] == self.rank:
                full[e] = param.detach()[slot]
        return full

    def _clock(self, device: torch.device) -> float:
        if self.timing and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        t0 = self._clock(x_TD.device)
        x_recv_ND, local_counts, meta = self.dispatcher.dispatch(x_TD, routing)
        t1 = self._clock(x_TD.device)
        y_recv_ND = self.local.run_sorted(x_recv_ND, local_counts)
        t2 = self._clock(x_TD.device)
        out_TD = self.dispatcher.combine(y_recv_ND, meta)
        t3 = self._clock(x_TD.device)
        if self.training:  # evaluation forwards are not part of a training step
            self.stats.add(**meta.counters(self.dispatcher.group_rank), t_dispatch=t1 - t0,
                           t_compute=t2 - t1, t_combine=t3 - t2, t_schedule=meta.t_schedule)
        return out_TD
