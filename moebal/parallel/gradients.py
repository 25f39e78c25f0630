"""Gradients of an expert-parallel model: the dense all-reduce, the reduction over each
expert's replica set, and the global gradient norm.

The loss of each rank is the mean over its own tokens; the global objective is the mean
over ranks. Dense gradients are summed over all ranks and divided by the world size (one
flat all-reduce: no DDP, whose hooks would also try to reduce the expert weights). Each
expert replica receives the gradient of the tokens computed on it, from every source;
summing over the replica set and dividing by the world size gives the expert's gradient of
the global objective, identical on every replica.

One process group per *distinct* replica set carries that set's expert gradients: all ranks
create every group in the same sorted order, and a rank all-reduces only over the sets it
belongs to, in that same order, so no two ranks wait on each other crosswise. Replica sets
of one rank need no group.

The expert modules are those of :mod:`moebal.parallel.experts`: ``local`` holds this rank's
experts (``[L, ...]`` weights), ``local_experts`` their ids.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from moebal.parallel.comm import all_reduce_, new_group
from moebal.parallel.layout import ParallelLayout


class GradientSync:
    """The gradient reductions of one rank, with the process groups they use.

    Creating it creates the replica-set groups: every rank must create it, in the same
    order relative to its other groups.
    """

    def __init__(self, layout: ParallelLayout, rank: int, dp_group: Any,
                 device: torch.device):
        self.layout, self.rank, self.dp_group, self.device = layout, rank, dp_group, device
        self.replica_groups: list[tuple[tuple[int, ...], Any]] = []
        for ranks in layout.replica_sets():
            pg = new_group(ranks) if len(ranks) > 1 else None
            self.replica_groups.append((ranks, pg))

    @torch.no_grad()
    def sync_(self, dense: Sequence[nn.Parameter], experts: Sequence[nn.Module]) -> None:
        """Dense gradients averaged over all ranks, expert gradients summed over each
        expert's replicas and divided by the world size; in place."""
        W = float(self.layout.world_size)
        grads = [grad_of(p) for p in dense]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_(flat, self.dp_group, what="dense gradient all-reduce")
            flat /= W
            unflatten_into(flat, grads)
        for ranks, pg in self.replica_groups:
            if self.rank not in ranks:
                continue
            pieces = [grad for module in experts
                      for grad in replica_set_grads(module, self.layout, ranks)]
            if not pieces:
                continue
            flat = torch.cat([g.reshape(-1) for g in pieces])
            if pg is not None:
                all_reduce_(flat, pg, what=f"expert gradient all-reduce over ranks {list(ranks)}")
            flat /= W
            unflatten_into(flat, pieces)

    @torch.no_grad()
    def clip_(self, dense: Sequence[nn.Parameter], experts: Sequence[nn.Module],
              max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm (each expert counted once), identical on every
        rank; call after :meth:`sync_`. Returns the norm before clipping."""
        dense_sq = sum((grad_of(p).double().square().sum() for p in dense),
                       torch.zeros((), dtype=torch.float64, device=self.device))
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for module in experts:
            expert_sq += grad_square_share(module, self.layout).to(self.device)
        all_reduce_(expert_sq, self.dp_group, what="gradient norm all-reduce")
        total = (dense_sq + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in list(dense) + [p for m in experts for p in m.parameters()]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total.float()


def replica_set_grads(module: nn.Module, layout: ParallelLayout,
                      ranks: tuple[int, ...]) -> list[torch.Tensor]:
    """Views of the gradients of ``module``'s local experts whose replica set is ``ranks``,
    by expert id; every rank of the set returns them in the same order."""
    ids = list(module.local_experts)
    out = []
    for e in sorted(e for e in ids if layout.replica_set(e) == ranks):
        slot = ids.index(e)
        for param in module.local.parameters():
            out.append(grad_of(param)[slot])
    return out


def grad_square_share(module: nn.Module, layout: ParallelLayout) -> torch.Tensor:
    """Sum of squared expert gradients of ``module``, each expert divided by its replica
    count, so that summing over all ranks counts every expert once."""
    params = list(module.local.parameters())
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for slot, e in enumerate(module.local_experts):
        n = len(layout.replica_set(e))
        for param in params:
            if param.grad is not None:
                total += param.grad[slot].double().square().sum() / n
    return total


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, each once (tied weights appear once)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def grad_of(p: nn.Parameter) -> torch.Tensor:
    """``p.grad``, zeros first if it has none (a parameter no token reached)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def unflatten_into(flat: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``targets``, in order."""
    offset = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
