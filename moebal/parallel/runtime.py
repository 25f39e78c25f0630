"""Expert parallelism for :class:`moebal.model.MoEModel` on ``torch.distributed``.

    init_distributed()                     # torchrun's environment, a timeout on collectives
    ep = ExpertParallel.setup(ParallelConfig(ep_size=2, placement="symmetric"),
                              model.config.num_experts)
    model = ep.parallelize(model)          # same weights on every rank, local experts only
    out = model(tokens_BS, targets_BS)     # this rank's share of the global batch
    out.loss.backward()
    ep.sync_gradients(model)               # dense: mean over ranks; experts: over replicas
    ep.clip_grad_norm_(model, 1.0)         # the global norm, the same on every rank
    optimizer.step(); model.step_routers()

Design (docs/distributed.md has the long form):

- Groups. The default group is the data-parallel group of the dense parameters and of the
  routers' load statistics. One group per scheduling group carries the count all-gather
  and the token all-to-alls. One group per *distinct* expert replica set carries that
  set's expert gradients; all ranks create every group in the same sorted order, and a rank
  all-reduces only over the sets it belongs to, in that same order, so no two ranks wait on
  each other crosswise. Replica sets of one rank need no group.
- Dispatch. Each MoE layer's ``experts`` module is replaced by :class:`ExpertParallelExperts`:
  counts all-gathered, the same plan computed on every rank (``moebal.parallel.plan``),
  token rows sent with a variable-split all-to-all, computed by the model's grouped expert
  path on this rank's experts, sent back, weighted by the gate weights at the source and
  summed per token. Every step is differentiable: the all-to-all's backward is the reverse
  all-to-all.
- Gradients. The loss of each rank is the mean over its own tokens; the global objective is
  the mean over ranks. Dense gradients are summed over all ranks and divided by the world
  size (one flat all-reduce: no DDP, whose hooks would also try to reduce the expert
  weights). Each expert replica receives the gradient of the tokens computed on it, from
  every source; summing over the replica set and dividing by the world size gives the
  expert's gradient of the global objective, identical on every replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moebal.parallel import comm
from moebal.parallel.comm import all_gather_counts, all_reduce_, all_to_all, broadcast_
from moebal.parallel.layout import ParallelLayout, check_sizes
from moebal.parallel.plan import SCHEDULES, Planner, RankPlan

STAT_FIELDS = (
    "tokens_computed",
    "tokens_sent",
    "tokens_received",
    "t_dispatch",
    "t_compute",
    "t_combine",
    "t_schedule",
    "makespan",
    "makespan_unscheduled",
)


@dataclass
class ParallelConfig:
    """How the experts are spread and scheduled.

    ep_size         ranks per expert-parallel group (experts split E / ep_size per rank).
    placement       a ``moebal.schedule`` placement name (standard, symmetric, asymmetric,
                    eplb), or an explicit placement: one list of experts per rank of a
                    scheduling group.
    schedule        "lp" (``moebal.schedule.solve_schedule`` per micro-batch) or "none"
                    (fixed targets, Megatron-style; see ``moebal.parallel.plan``).
    sched_size      ranks per scheduling group (None: the whole world).
    placement_seed  seed of the placement builders that shuffle.
    placement_loads per-expert load history for the builders that use one (asymmetric,
                    eplb); None = uniform.
    timing          measure dispatch/compute/combine times (on CUDA: synchronises).
    """

    ep_size: int = 1
    placement: Union[str, Sequence[Sequence[int]]] = "standard"
    schedule: str = "lp"
    sched_size: Optional[int] = None
    placement_seed: int = 0
    placement_loads: Optional[Sequence[float]] = None
    timing: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ep_size, int) or isinstance(self.ep_size, bool) or self.ep_size < 1:
            raise ValueError(f"ep_size must be a positive int, got {self.ep_size!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.placement, str):
            from moebal.parallel.placement import check_placement_name

            check_placement_name(self.placement)


class StepStats:
    """Per-rank counters of one optimizer step, summed over MoE layers and micro-batches
    (training-mode forwards only).

    tokens_computed  expert-token rows computed on this rank (from any source, itself too).
    tokens_sent      rows this rank sent to other ranks in dispatch (rows kept local
                     are not counted); tokens_received likewise.
    t_dispatch       seconds in counts all-gather, planning, permutation and the dispatch
                     all-to-all (forward); t_compute: local experts; t_combine: the return
                     all-to-all, gate weighting and per-token sum (forward); t_schedule:
                     the planning part of t_dispatch (the scheduler, same on every rank).
    makespan         rows on the busiest rank of the scheduling group under the plan used;
    makespan_unscheduled  the same under the ``none`` rule; per layer, summed over layers.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values = {name: 0.0 for name in STAT_FIELDS}

    def add(self, **kwargs: float) -> None:
        for name, value in kwargs.items():
            self.values[name] += float(value)

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)


class ExpertParallel:
    """One process's share of an expert-parallel run: layout, groups, plans and counters.

    Build with :meth:`setup` after ``init_distributed`` (or ``dist.init_process_group``).
    """

    def __init__(self, config: ParallelConfig, layout: ParallelLayout, placement: Any,
                 rank: int, device: torch.device):
        self.config = config
        self.layout = layout
        self.rank = rank
        self.world_size = layout.world_size
        self.device = device
        self.sched_ranks = layout.sched_group(rank)
        self.sched_rank = self.sched_ranks.index(rank)
        self.planner = Planner(layout, config.schedule, placement)
        self.holds_GE = layout.holds_GE()
        self.stats = StepStats()
        # every rank creates every group, in the same order (torch.distributed's rule)
        self.sched_pg = None
        for ranks in layout.sched_groups():
            pg = comm.new_group(ranks) if layout.num_sched_groups > 1 else dist.group.WORLD
            if rank in ranks:
                self.sched_pg = pg
        self.replica_pgs: list[tuple[tuple[int, ...], Any]] = []
        for ranks in layout.replica_sets():
            pg = comm.new_group(ranks) if len(ranks) > 1 else None
            self.replica_pgs.append((ranks, pg))
        self.dp_pg = dist.group.WORLD

    @classmethod
    def validate(cls, config: ParallelConfig, num_experts: int, world_size: int) -> ParallelLayout:
        """The layout for these sizes, or a ValueError; pure, no collective.

        Every rank raises the same error, since every rank computes the same thing.
        """
        layout, _ = _make_layout(config, num_experts, world_size)
        return layout

    @classmethod
    def setup(cls, config: ParallelConfig, num_experts: int,
              device: Optional[torch.device] = None) -> "ExpertParallel":
        """Validate (before any collective), then create the process groups.

        The groups get the collective timeout given to :func:`init_distributed`.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call moebal.parallel.init_distributed() "
                "first (torchrun sets the environment it reads)"
            )
        world_size, rank = dist.get_world_size(), dist.get_rank()
        layout, placement = _make_layout(config, num_experts, world_size)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend() == "nccl" else torch.device("cpu"))
        return cls(config, layout, placement, rank, device)

    # -- the model ---------------------------------------------------------------------
    def local_experts(self) -> tuple[int, ...]:
        return self.layout.local_experts(self.rank)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Make ``model`` expert-parallel, in place; returns it.

        Every parameter and buffer is first broadcast from rank 0 (so all ranks start from
        rank 0's initialisation and every replica of an expert is identical), then each MoE
        layer keeps only this rank's experts, and each router all-reduces its load
        statistics over the data-parallel group.
        """
        from moebal.model import MoELayer

        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ValueError("the model has no MoELayer to parallelise")
        for layer in layers:
            if isinstance(layer.experts, ExpertParallelExperts):
                raise ValueError("the model is already expert-parallel")
            if layer.experts.num_experts != self.layout.num_experts:
                raise ValueError(
                    f"the model has {layer.experts.num_experts} experts per layer but the "
                    f"layout was built for {self.layout.num_experts}"
                )
        model.to(self.device)
        with torch.no_grad():
            for name, tensor in _unique_tensors(model):
                broadcast_(tensor.data, src=0, what=f"initial broadcast of {name}")
        for index, layer in enumerate(layers):
            layer.experts = ExpertParallelExperts(layer.experts, self, index)
            layer.router.group = self.dp_pg
        return model

    def expert_modules(self, model: nn.Module) -> list["ExpertParallelExperts"]:
        return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]

    def _split_params(self, model: nn.Module) -> tuple[list[nn.Parameter], list["ExpertParallelExperts"]]:
        experts = self.expert_modules(model)
        if not experts:
            raise ValueError("the model is not expert-parallel: call parallelize() first")
        expert_ids = {id(p) for m in experts for p in m.parameters()}
        dense = [p for p in _unique_params(model) if id(p) not in expert_ids and p.requires_grad]
        return dense, experts

    @torch.no_grad()
    def sync_gradients(self, model: nn.Module) -> None:
        """After ``backward``: dense gradients averaged over all ranks, expert gradients
        summed over each expert's replicas and divided by the world size."""
        dense, experts = self._split_params(model)
        W = float(self.world_size)
        grads = [_grad(p) for p in dense]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_(flat, self.dp_pg, what="dense gradient all-reduce")
            flat /= W
            _unflatten_into(flat, grads)
        for ranks, pg in self.replica_pgs:
            if self.rank not in ranks:
                continue
            pieces = [
                grad
                for module in experts
                for grad in module.replica_set_grads(ranks)
            ]
            if not pieces:
                continue
            flat = torch.cat([g.reshape(-1) for g in pieces])
            if pg is not None:
                all_reduce_(flat, pg, what=f"expert gradient all-reduce over ranks {list(ranks)}")
            flat /= W
            _unflatten_into(flat, pieces)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm (each expert counted once), identical on every
        rank; call after :meth:`sync_gradients`. Returns the norm before clipping."""
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        dense, experts = self._split_params(model)
        dense_sq = sum((_grad(p).double().square().sum() for p in dense),
                       torch.zeros((), dtype=torch.float64, device=self.device))
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for module in experts:
            expert_sq += module.grad_square_share()
        all_reduce_(expert_sq, self.dp_pg, what="gradient norm all-reduce")
        total = (dense_sq + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in list(dense) + [p for m in experts for p in m.parameters()]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total.float()

    @torch.no_grad()
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The state dict of the equivalent single-process model, on every rank (CPU).

        Each expert's weights come from the lowest rank holding it (one all-reduce per
        expert tensor). Keys and shapes are those of the unparallelised model.
        """
        out: dict[str, torch.Tensor] = {}
        expert_prefixes = {
            name: module for name, module in model.named_modules()
            if isinstance(module, ExpertParallelExperts)
        }
        for key, value in model.state_dict().items():
            prefix = next((p for p in expert_prefixes if key.startswith(p + ".")), None)
            if prefix is None:
                out[key] = value.detach().cpu().clone()
                continue
            module = expert_prefixes[prefix]
            rest = key[len(prefix) + 1:]
            if not rest.startswith("local."):
                continue  # bookkeeping buffers
            pname = rest[len("local."):]
            full = module.full_tensor(pname)
            all_reduce_(full, self.dp_pg, what=f"gather of {prefix}.{pname}")
            out[f"{prefix}.{pname}"] = full.cpu()
        return out

    # -- statistics ------------------------------------------------------------------------
    def step_records(self, step: int) -> list[dict[str, Any]]:
        """Every rank's counters of this step, gathered on every rank (one small
        all-gather); the counters are reset."""
        local = torch.tensor([self.stats.values[n] for n in STAT_FIELDS], dtype=torch.float64,
                             device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        with comm.collective("all_gather step statistics"):
            dist.all_gather(parts, local)
        self.stats.reset()
        records = []
        for r, part in enumerate(parts):
            values = part.cpu().tolist()
            record: dict[str, Any] = {"rank": r, "step": int(step)}
            for name, value in zip(STAT_FIELDS, values):
                record[name] = int(round(value)) if not name.startswith("t_") else value
            records.append(record)
        return records


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over steps of the per-rank records written by a run: per rank, and the
    ratio of the scheduled to the unscheduled makespan."""
    if not records:
        return {}
    ranks = sorted({int(r["rank"]) for r in records})
    per_rank = {}
    for rank in ranks:
        rows = [r for r in records if int(r["rank"]) == rank]
        per_rank[rank] = {n: float(np.mean([row[n] for row in rows])) for n in STAT_FIELDS}
    rows0 = [r for r in records if int(r["rank"]) == ranks[0]]
    makespan = float(np.sum([r["makespan"] for r in rows0]))
    unscheduled = float(np.sum([r["makespan_unscheduled"] for r in rows0]))
    return {
        "steps": len(rows0),
        "per_rank": per_rank,
        "makespan_ratio": makespan / unscheduled if unscheduled else 1.0,
    }


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``GroupedExperts`` whose experts live on several ranks.

    ``forward(x_TD, routing) -> y_TD`` as ``GroupedExperts`` (sum over each token's kept
    slots of gate weight x expert output), but each slot is computed on the rank the plan
    chose. ``local`` is a ``GroupedExperts`` over this rank's experts (``expert_ids``).
    """

    def __init__(self, experts: nn.Module, ep: ExpertParallel, layer_index: int):
        super().__init__()
        from moebal.model import GroupedExperts

        ids = ep.local_experts()
        self.ep = ep
        self.layer_index = layer_index
        self.num_experts = experts.num_experts
        self.dim, self.hidden = experts.dim, experts.hidden
        self.local = GroupedExperts(len(ids), experts.dim, experts.hidden).to(
            device=experts.w1_EDF.device, dtype=experts.w1_EDF.dtype
        )
        index = torch.tensor(ids, dtype=torch.long, device=experts.w1_EDF.device)
        with torch.no_grad():
            for name, param in self.local.named_parameters():
                param.copy_(getattr(experts, name).index_select(0, index))
        self.register_buffer("expert_ids", index.clone(), persistent=False)
        self._ids = np.asarray(ids, dtype=np.int64)
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot_of[index.cpu()] = torch.arange(len(ids))
        self.register_buffer("slot_of_expert", slot_of.to(index.device), persistent=False)

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, local experts {list(self.ep.local_experts())}, "
                f"rank {self.ep.rank}")

    # -- gradient helpers ---------------------------------------------------------------
    def replica_set_grads(self, ranks: tuple[int, ...]) -> list[torch.Tensor]:
        """Views of the gradients of the local experts whose replica set is ``ranks``,
        by expert id; every rank of the set returns them in the same order."""
        layout = self.ep.layout
        ids = [e for e in sorted(self.ep.local_experts()) if layout.replica_set(e) == ranks]
        out = []
        for e in ids:
            slot = int(self.slot_of_expert[e])
            for param in self.local.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                out.append(param.grad[slot])
        return out

    def grad_square_share(self) -> torch.Tensor:
        """Sum of squared expert gradients, each expert divided by its replica count, so
        that summing over all ranks counts every expert once."""
        layout = self.ep.layout
        total = torch.zeros((), dtype=torch.float64, device=self.expert_ids.device)
        for slot, e in enumerate(self.ep.local_experts()):
            n = len(layout.replica_set(e))
            for param in self.local.parameters():
                if param.grad is not None:
                    total += param.grad[slot].double().square().sum() / n
        return total

    def full_tensor(self, name: str) -> torch.Tensor:
        """``[E, ...]`` zeros except the experts this rank is the lowest replica of."""
        param = getattr(self.local, name)
        full = param.new_zeros((self.num_experts,) + tuple(param.shape[1:]))
        layout = self.ep.layout
        for slot, e in enumerate(self.ep.local_experts()):
            if layout.replica_set(e)[0] == self.ep.rank:
                full[e] = param.detach()[slot]
        return full

    # -- forward ------------------------------------------------------------------------
    def _sync(self) -> float:
        if self.ep.config.timing and self.ep.device.type == "cuda":
            torch.cuda.synchronize(self.ep.device)
        return time.perf_counter()

    def forward(self, x_TD: torch.Tensor, routing: Any) -> torch.Tensor:
        ep = self.ep
        T, D = x_TD.shape
        K = routing.indices_TK.shape[1]
        G, E = len(ep.sched_ranks), self.num_experts
        device = x_TD.device
        t0 = self._sync()

        # kept slots (token-major), their experts, this rank's counts
        expert_S = routing.indices_TK.reshape(-1)
        kept_S = routing.kept_TK.reshape(-1)
        if bool(kept_S.all()):
            slot_N = torch.arange(T * K, device=device)
        else:
            slot_N = torch.nonzero(kept_S).squeeze(1)
        expert_N = expert_S[slot_N]
        counts_E = torch.bincount(expert_N, minlength=E)

        # the same plan on every rank of the scheduling group
        loads_GE = all_gather_counts(counts_E, ep.sched_pg,
                                     what=f"expert counts of MoE layer {self.layer_index}")
        t_plan = time.perf_counter()
        plan: RankPlan = ep.planner.plan(loads_GE.cpu().numpy(), ep.sched_rank,
                                         layer=self.layer_index)
        t_plan = time.perf_counter() - t_plan

        # slots sorted by expert; the run of expert e splits over destinations in rank order
        send_EG = torch.from_numpy(plan.send_EG).to(device)
        order_N = torch.argsort(expert_N, stable=True)
        bounds_C = torch.cumsum(send_EG.reshape(-1), 0)  # chunks (e, g), e-major
        chunk_N = torch.searchsorted(bounds_C, torch.arange(len(order_N), device=device),
                                     right=True)
        dest_N = chunk_N % G
        expert_sorted_N = chunk_N // G
        send_order = torch.argsort(dest_N * E + expert_sorted_N, stable=True)
        send_slot_N = slot_N[order_N[send_order]]
        token_N = torch.div(send_slot_N, K, rounding_mode="floor")
        in_splits = plan.send_EG.sum(0).tolist()
        out_splits = plan.recv_GE.sum(1).tolist()
        what = f"MoE layer {self.layer_index}"
        x_recv_MD = all_to_all(x_TD[token_N], out_splits, in_splits, ep.sched_pg,
                               what=f"dispatch all-to-all of {what}")
        t1 = self._sync()

        # received rows come source-major, expert-ascending; regroup them by local expert
        recv_C = torch.from_numpy(plan.recv_GE.reshape(-1)).to(device)  # (g, e), g-major
        M = int(x_recv_MD.shape[0])
        label_M = torch.repeat_interleave(torch.arange(G * E, device=device), recv_C,
                                          output_size=M)
        local_slot_M = self.slot_of_expert[label_M % E]
        perm_M = torch.argsort(local_slot_M * G + label_M // E, stable=True)
        counts_L = torch.from_numpy(plan.recv_GE[:, self._ids].sum(0)).to(device)
        y_sorted_MD = self.local.run_sorted(x_recv_MD[perm_M], counts_L)
        y_recv_MD = y_sorted_MD[torch.argsort(perm_M)]
        t2 = self._sync()

        y_back_ND = all_to_all(y_recv_MD, in_splits, out_splits, ep.sched_pg,
                               what=f"combine all-to-all of {what}")
        weight_N = routing.weights_TK.reshape(-1)[send_slot_N].unsqueeze(1).to(y_back_ND.dtype)
        out_TD = torch.zeros(T, D, dtype=y_back_ND.dtype, device=device)
        out_TD = out_TD.index_add(0, token_N, y_back_ND * weight_N).to(x_TD.dtype)
        t3 = self._sync()

        if not self.training:  # evaluation forwards are not part of a training step
            return out_TD
        self_rows = int(plan.send_EG[:, ep.sched_rank].sum())
        ep.stats.add(
            tokens_computed=M,
            tokens_sent=int(sum(in_splits)) - self_rows,
            tokens_received=M - int(plan.recv_GE[ep.sched_rank].sum()),
            t_dispatch=t1 - t0,
            t_compute=t2 - t1,
            t_combine=t3 - t2,
            t_schedule=t_plan,
            makespan=plan.makespan,
            makespan_unscheduled=plan.makespan_unscheduled,
        )
        return out_TD


# -- helpers ----------------------------------------------------------------------------

def _make_layout(config: ParallelConfig, num_experts: int, world_size: int) -> tuple[ParallelLayout, Any]:
    from moebal.parallel.placement import build_placement

    sched_size = check_sizes(world_size, config.ep_size, num_experts, config.sched_size)
    experts_GS, placement = build_placement(
        config.placement, sched_size, config.ep_size, num_experts,
        seed=config.placement_seed, loads=config.placement_loads,
    )
    layout = ParallelLayout.from_placement(world_size, config.ep_size, num_experts, experts_GS,
                                           sched_size)
    return layout, placement


def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _unflatten_into(flat: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
