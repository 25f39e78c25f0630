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

Design (docs/distributed.md has the long form), one module each:

- ``layout``: which rank holds which experts; ``plan``: where each token is computed.
- ``dispatch``: the token dispatcher (counts, plan, permutation, all-to-all and back),
  built on the permutation of ``moebal.model.dispatch``; ``experts``: the MoE layer's
  experts as dispatch, compute, combine.
- ``gradients``: dense all-reduce, replica-set reduction, global norm.
- ``stats``: the per-rank counters of a step.
- here: the config, the process groups, ``parallelize`` and the full state dict.

The default group is the data-parallel group of the dense parameters and of the routers'
load statistics. One group per scheduling group carries the count all-gather and the token
all-to-alls; the replica-set groups are the gradients' (``moebal.parallel.gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from moebal.parallel.comm import all_reduce_, broadcast_, collective, new_group
from moebal.parallel.dispatch import ExpertParallelDispatcher
from moebal.parallel.experts import ExpertParallelExperts
from moebal.parallel.gradients import GradientSync, unique_params
from moebal.parallel.layout import ParallelLayout, check_sizes
from moebal.parallel.placement import build_rank_placement, check_placement_name
from moebal.parallel.plan import SCHEDULES, Planner
from moebal.parallel.stats import STAT_FIELDS, RankStepStats


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
            check_placement_name(self.placement)


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
        self.stats = RankStepStats()
        # every rank creates every group, in the same order (torch.distributed's rule)
        self.sched_pg = None
        for ranks in layout.sched_groups():
            pg = new_group(ranks) if layout.num_sched_groups > 1 else dist.group.WORLD
            if rank in ranks:
                self.sched_pg = pg
        self.dp_pg = dist.group.WORLD
        self.gradients = GradientSync(layout, rank, self.dp_pg, device)

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
        layer keeps only this rank's experts behind an :class:`ExpertParallelDispatcher`
        (which plans with ``self.planner`` as it is now), and each router all-reduces its
        load statistics over the data-parallel group.
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
            dispatcher = ExpertParallelDispatcher(
                num_experts=self.layout.num_experts, local_experts=self.local_experts(),
                group=self.sched_pg, group_rank=self.sched_rank,
                group_size=len(self.sched_ranks), planner=self.planner, layer_index=index,
                device=self.device)
            layer.experts = ExpertParallelExperts(layer.experts, dispatcher, self.layout,
                                                  self.rank, self.stats, self.config.timing)
            layer.router.group = self.dp_pg
        return model

    def expert_modules(self, model: nn.Module) -> list[ExpertParallelExperts]:
        return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]

    def _split_params(self, model: nn.Module
                      ) -> tuple[list[nn.Parameter], list[ExpertParallelExperts]]:
        experts = self.expert_modules(model)
        if not experts:
            raise ValueError("the model is not expert-parallel: call parallelize() first")
        expert_ids = {id(p) for m in experts for p in m.parameters()}
        dense = [p for p in unique_params(model) if id(p) not in expert_ids and p.requires_grad]
        return dense, experts

    def sync_gradients(self, model: nn.Module) -> None:
        """After ``backward``: dense gradients averaged over all ranks, expert gradients
        summed over each expert's replicas and divided by the world size."""
        self.gradients.sync_(*self._split_params(model))

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm (each expert counted once), identical on every
        rank; call after :meth:`sync_gradients`. Returns the norm before clipping."""
        if isinstance(max_norm, bool) or not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        return self.gradients.clip_(*self._split_params(model), max_norm)

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
        with collective("all_gather step statistics"):
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


# -- helpers ----------------------------------------------------------------------------

def _make_layout(config: ParallelConfig, num_experts: int,
                 world_size: int) -> tuple[ParallelLayout, Any]:
    sched_size = check_sizes(world_size, config.ep_size, num_experts, config.sched_size)
    experts_of_gpu, placement = build_rank_placement(
        config.placement, sched_size, config.ep_size, num_experts,
        seed=config.placement_seed, loads=config.placement_loads,
    )
    layout = ParallelLayout.from_placement(world_size, config.ep_size, num_experts,
                                           experts_of_gpu, sched_size)
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
