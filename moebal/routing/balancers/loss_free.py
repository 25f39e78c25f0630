"""DeepSeek's auxiliary-loss-free balancing: an expert bias used only to choose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from moebal.routing.balancers.collectives import all_reduce_sum_
from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.kernels import Workspace, topk_indices
from moebal.routing.validate import check_choice, check_number

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from moebal.routing.config import RouterConfig


@register_balancer("loss_free")
class LossFree(Balancer):
    """Token i takes the top-k of ``s_ij + b_j``; its gate weights stay the unbiased ``s_ij``.

    Loads (after capacity drops) accumulate over the micro-batches seen in training mode;
    at ``step()`` they are summed over the data-parallel ``group`` when one is given and,
    with ``e_j = mean_j(load) - load_j``:

    - ``update="sign"`` (the paper's): ``b_j += u * sign(e_j)``;
    - ``update="proportional"``: ``b_j += u * e_j / mean_j(load)`` (the error relative
      to the mean load, so u means the same whatever the batch size).

    u = ``options.rate`` (1e-3, the paper's best). The bias only ever sees loads
    of earlier batches: a batch's own loads never change its own routing.

    State (buffers): ``bias_E``, ``loads_sum_E`` (loads since the last step), ``num_updates``.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """rate: u (flat ``bias_update_rate``); update: "sign" or "proportional"
        (flat ``bias_update``)."""

        rate: float = 1e-3
        update: str = "sign"
        flat_names: ClassVar[dict[str, str]] = {"rate": "bias_update_rate",
                                                "update": "bias_update"}

        def validate(self) -> None:
            check_number("bias_update_rate", self.rate, low=0.0)
            check_choice("bias_update", self.update, ("sign", "proportional"))

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__(config)
        E = config.num_experts
        self.register_buffer("bias_E", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("loads_sum_E", torch.zeros(E, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._ws = Workspace()

    def selection_scores(self, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return scores_TE.detach() + self.bias_E.to(scores_TE.dtype)

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        # s + b into a reused buffer: it only chooses, it carries no gradient
        biased_TE = self._ws.get("biased", tuple(scores_TE.shape), scores_TE)
        torch.add(scores_TE.detach(), self.bias_E.to(scores_TE.dtype), out=biased_TE)
        if ctx.allowed_TE is not None:
            biased_TE.masked_fill_(~ctx.allowed_TE, float("-inf"))
        return topk_indices(biased_TE, top_k)

    def observe(self, loads_E: torch.Tensor, ctx: RoutingContext) -> None:
        self.loads_sum_E.add_(loads_E)

    def step(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        loads_E = all_reduce_sum_(self.loads_sum_E, group)
        mean = loads_E.sum() * (1.0 / loads_E.numel())
        error_E = mean - loads_E
        if self.options.update == "sign":
            self.bias_E.add_(error_E.sign_(), alpha=self.options.rate)
        else:
            self.bias_E.add_(error_E.div_(mean.clamp_min(1.0)), alpha=self.options.rate)
        loads_E.zero_()
        self.num_updates.add_(1)
