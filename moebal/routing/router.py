"""The router: logits in, expert choices out; the one gate-and-router core.

``Router(config)(logits_TE)`` returns a :class:`Routing`. The balancing method is a small
module built from ``config.balancer`` (see :mod:`moebal.routing.balancers`).

Every MoE block built on moebal (the model's ``MoELayer``, ``moebal.nn.MoEGate``, the
transformers adapter) goes through the same two calls, so they share one behaviour:

    logits_TE = gate_logits(x_TD, weight_ED, bias_E, float32=...)   # or your own gate
    routing = router(logits_TE, seq_len, log=log)

or ``router.route(x_TD, weight_ED, bias_E, seq_len=..., log=...)`` for both, timed into
``log.router_seconds`` when ``log.timed``. ``log`` (a :class:`RoutingLog`, one per model
forward) collects the layers' routings and defers their balancer updates to
``log.commit()``; without it the update is applied before the call returns. Activation
checkpointing needs nothing more than ``router.replay = True`` (the recompute then routes
from the state its forward saw, and never updates). A training loop that steps the
balancers once per optimizer step builds the router with ``auto_step=False`` and calls
``router.step()`` after ``optimizer.step()``.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moebal.routing.balancers import Balancer, RoutingContext
from moebal.routing.config import RouterConfig
from moebal.routing.groups import group_mask_TE
from moebal.routing.kernels import expert_counts
from moebal.routing.log import (  # NonFiniteLogits: where it was defined before
    NonFiniteLogits,
    PendingUpdate,
    RoutingLog,
    check_finite_mode,
    check_finite_now,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist


@dataclass
class Routing:
    """The router's answer for one batch of T tokens.

    indices_TK  int64 expert ids, distinct per token.
    weights_TK  gate weights from the unbiased scores; 0 where the slot was dropped.
    kept_TK     bool, False where capacity dropped the slot (all True when dropless).
    aux_loss    the balancer's auxiliary loss (scalar; zero when it has none).
    z_loss      the router z-loss (scalar; zero when z_loss_coeff is 0).
    loads_E     int64 tokens per expert after drops.
    scores_TE   the routing scores the choice was made on (softmax or sigmoid of the
                logits, before any balancer bias), detached; None for an empty batch.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    loads_E: torch.Tensor
    scores_TE: Optional[torch.Tensor] = None

    @property
    def loss(self) -> torch.Tensor:
        """What to add to the model's loss: aux loss plus z-loss."""
        return self.aux_loss + self.z_loss

    @property
    def routed_slots(self) -> int:
        """T*K: the token-slots the router assigned (kept or dropped)."""
        return self.indices_TK.numel()

    @property
    def dropped(self) -> torch.Tensor:
        """int64 scalar: token-slots capacity dropped, ``T*K - sum_j loads_j`` (0 dropless)."""
        return self.routed_slots - self.loads_E.sum()


def gate_logits(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: Optional[torch.Tensor] = None,
    float32: bool = True,
) -> torch.Tensor:
    """The gate's logits ``x W^T (+ b)``, ``[T, E]``.

    ``float32``: in float32 with autocast off, whatever the input's dtype (the model's gate:
    routing decisions are not made in bf16); else as a plain ``nn.Linear`` would (in the
    input's dtype, under any autocast).
    """
    if not float32:
        return F.linear(x_TD, weight_ED, bias_E)
    with torch.autocast(x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())


class Router(nn.Module):
    """Chooses top-k experts per token under the configured balancer.

    ``forward(logits_TE, seq_len=None)``; ``seq_len`` is the tokens per sequence when the
    batch stacks whole sequences (needed by ``seq_aux_loss``). ``group`` is the
    data-parallel process group whose loads the balancer all-reduces (None: this process).

    In training mode the balancer sees each batch's loads. Balancers with state update it at
    ``step()``, to be called once per optimizer step. With ``auto_step`` (the default) every
    training-mode forward also counts as a step of its own, until ``step()`` is first
    called (which sets ``auto_step = False``); a training loop that steps once per
    optimizer step builds its routers with ``auto_step=False`` (or sets the attribute).
    In ``eval()`` nothing updates.

    A forward changes no balancer state while it runs: what it would change is collected
    (:class:`PendingUpdate`) and applied by :meth:`commit` at the end of the call, or, with
    ``log`` (a :class:`RoutingLog`), when the caller commits the log after its whole
    forward. Under activation checkpointing the recompute in backward routes again without
    updating anything; with ``replay = True`` it routes from the state its forward saw.

    ``finite_check`` ("auto", "sync", "deferred", "off"): how logits with a NaN or inf entry
    are refused (:class:`NonFiniteLogits`; see :mod:`moebal.routing.log`). "auto": checked
    before routing on CPU tensors; on others, in training with a log, by ``log.commit()``
    without stopping the device. A balancer that reads the scores on the host
    (``Balancer.reads_on_host``) is always checked before routing, unless "off".
    """

    def __init__(
        self, config: RouterConfig, group: Optional["dist.ProcessGroup"] = None,
        auto_step: bool = True, finite_check: str = "auto",
    ):
        super().__init__()
        config.validate()
        self.config = config
        self.group = group
        self.balancer = config.balancer.build(config)
        # balancers that choose by the plain top-k of the scores: the router takes the
        # top-k values as gate weights and skips the gather
        kind = type(self.balancer)
        self._plain_topk = (
            kind.select is Balancer.select and kind.selection_scores is Balancer.selection_scores
        )
        self.auto_step = bool(auto_step)
        self.finite_check = finite_check
        self.replay = False
        self._replay: collections.deque = collections.deque()

    def extra_repr(self) -> str:
        c = self.config
        groups = "" if c.num_groups is None else (
            f", groups={c.group_topk} of {c.num_groups} ({c.group_score})")
        return (f"E={c.num_experts}, K={c.top_k}, score={c.score_function}, "
                f"balancer={c.balancer_name}{groups}")

    @property
    def finite_check(self) -> str:
        """"auto", "sync", "deferred" or "off" (validated on assignment)."""
        return self._finite_check

    @finite_check.setter
    def finite_check(self, value: str) -> None:
        self._finite_check = check_finite_mode(value)

    def _finite_mode(self, logits_TE: torch.Tensor, deferrable: bool) -> str:
        """The check this call runs: "sync", "deferred" (only when ``deferrable``) or "off"."""
        mode = self._finite_check
        if mode == "off":
            return mode
        if mode == "auto":
            mode = "sync" if logits_TE.device.type == "cpu" else "deferred"
        if mode == "deferred" and (not deferrable or self.balancer.reads_on_host):
            mode = "sync"
        return mode

    def _check(self, logits_TE: torch.Tensor) -> None:
        if not isinstance(logits_TE, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits_TE).__name__}")
        if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
            raise ValueError(
                f"logits must be a 2-D floating-point tensor [tokens, experts], got "
                f"shape {tuple(logits_TE.shape)} dtype {logits_TE.dtype}"
            )
        if logits_TE.shape[1] != self.config.num_experts:
            raise ValueError(
                f"logits have {logits_TE.shape[1]} columns but num_experts is "
                f"{self.config.num_experts}"
            )

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        logits_TE = logits_TE.float()
        if self.config.score_function == "softmax":
            return torch.softmax(logits_TE, dim=-1)
        return torch.sigmoid(logits_TE)

    def forward(
        self, logits_TE: torch.Tensor, seq_len: Optional[int] = None,
        log: Optional[RoutingLog] = None,
    ) -> Routing:
        """Route one batch. With ``log`` the routing is appended to it and the balancer
        update waits for ``log.commit()``; without, the update is applied before returning.
        Raises :class:`NonFiniteLogits` for NaN/inf logits (here, or from ``log.commit()``
        with the deferred check)."""
        if self.training and recomputing():
            return self._recompute(logits_TE, seq_len)
        self._check(logits_TE)
        check = self._finite_mode(logits_TE, deferrable=log is not None and self.training)
        if check == "sync":
            check_finite_now(logits_TE)
        elif check == "deferred":
            log.stage_finite(logits_TE)
        try:
            routing, ctx = self._route(logits_TE, seq_len)
        except Exception:
            if check == "deferred":  # a routing that failed on NaN/inf logits says so
                log.check_finite()
            raise
        if log is not None:
            log.routings.append(routing)
        if self.training and ctx is not None:
            update = PendingUpdate(ctx, routing.loads_E, self.replay and torch.is_grad_enabled())
            if log is None:
                self.commit(update)
            else:
                log.stage(self, update)
        return routing

    def route(
        self, x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: Optional[torch.Tensor] = None,
        *, seq_len: Optional[int] = None, log: Optional[RoutingLog] = None, float32: bool = True,
    ) -> tuple[torch.Tensor, Routing]:
        """Gate and route: ``(logits_TE, routing)`` for hidden states ``x_TD``.

        :func:`gate_logits` then ``forward``; with ``log.timed`` the time of both goes to
        ``log.timer`` (on CUDA a pair of timing events on the stream, nothing synchronised;
        ``log.router_seconds`` resolves them).
        """
        timed = log is not None and log.timed
        if timed:
            token = log.timer.start(x_TD.device)
        logits_TE = gate_logits(x_TD, weight_ED, bias_E, float32)
        routing = self(logits_TE, seq_len, log=log)
        if timed:
            log.timer.stop(x_TD.device, token)
        return logits_TE, routing

    def _recompute(self, logits_TE: torch.Tensor, seq_len: Optional[int]) -> Routing:
        """Backward re-runs a checkpointed forward: route again, change nothing (the logits
        are its forward's, checked there; here only when the check is synchronous)."""
        self._check(logits_TE)
        if self._finite_mode(logits_TE, deferrable=True) == "sync":
            check_finite_now(logits_TE)
        if not self._replay:
            return self._route(logits_TE, seq_len)[0]
        before = self._replay.popleft()
        now = {name: buf for name, buf in self.balancer.named_buffers()}
        self._swap_buffers(before)
        try:
            return self._route(logits_TE, seq_len)[0]
        finally:
            self._swap_buffers(now)

    def _swap_buffers(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            owner, _, leaf = name.rpartition(".")
            self.balancer.get_submodule(owner)._buffers[leaf] = value

    @torch.no_grad()
    def commit(self, update: PendingUpdate) -> None:
        """Apply one forward's balancer update: the buffers ``select``/``loss`` computed,
        then ``observe`` of the loads, then (until ``step()`` is called explicitly) a step."""
        balancer = self.balancer
        if update.replay:
            self._replay.append({n: b.clone() for n, b in balancer.named_buffers()})
        balancer.commit(update.ctx.updates)
        balancer.observe(update.loads_E, update.ctx)
        if self.auto_step:
            balancer.step(self.group)

    def _route(
        self, logits_TE: torch.Tensor, seq_len: Optional[int]
    ) -> tuple[Routing, Optional[RoutingContext]]:
        cfg = self.config
        T, E, K = logits_TE.shape[0], cfg.num_experts, cfg.top_k
        if seq_len is not None and (seq_len < 1 or T % seq_len):
            raise ValueError(f"seq_len={seq_len!r} does not divide the {T} tokens of the batch")
        ctx = RoutingContext(logits_TE=logits_TE, seq_len=seq_len, group=self.group)
        scores_TE = self.scores(logits_TE)

        if T == 0:
            empty = torch.empty(0, K, dtype=torch.int64, device=logits_TE.device)
            zero = scores_TE.sum() * 0.0
            return Routing(
                indices_TK=empty,
                weights_TK=scores_TE.new_empty(0, K),
                kept_TK=torch.empty(0, K, dtype=torch.bool, device=logits_TE.device),
                aux_loss=zero,
                z_loss=zero,
                loads_E=torch.zeros(E, dtype=torch.int64, device=logits_TE.device),
            ), None  # an empty batch updates nothing

        balancer = self.balancer
        if cfg.num_groups is not None:
            with torch.no_grad():
                ctx.allowed_TE = group_mask_TE(
                    balancer.choice_scores(scores_TE, ctx).detach(), cfg.num_groups,
                    cfg.group_topk, K, cfg.group_score)
        if self._plain_topk and ctx.allowed_TE is None:
            # the choice is the top-k of the scores themselves: its values are the weights
            weights_TK, indices_TK = torch.topk(scores_TE, K, dim=-1, sorted=False)
        else:
            indices_TK = balancer.select(scores_TE, K, ctx)
            if indices_TK.dtype != torch.int64:
                indices_TK = indices_TK.long()
            weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        counts_E = expert_counts(indices_TK.flatten(), E)
        ctx.counts_E = counts_E
        if cfg.capacity_factor is None:
            kept_TK = torch.ones_like(indices_TK, dtype=torch.bool)
            loads_E = counts_E
        else:
            kept_TK = self._capacity_mask(indices_TK, weights_TK, counts_E, T)
            weights_TK = weights_TK * kept_TK
            loads_E = expert_counts(indices_TK.flatten(), E, kept_TK.flatten())

        aux_loss = balancer.loss(scores_TE, indices_TK, ctx)
        if cfg.z_loss_coeff > 0:
            z_loss = cfg.z_loss_coeff * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
        else:
            z_loss = scores_TE.new_zeros(())
        return Routing(indices_TK, weights_TK, kept_TK, aux_loss, z_loss, loads_E,
                       scores_TE.detach()), ctx

    def capacity(self, num_tokens: int) -> int:
        """Tokens one expert may take from a batch of ``num_tokens`` (None = unbounded)."""
        cfg = self.config
        if cfg.capacity_factor is None:
            return num_tokens
        return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))

    def _capacity_mask(
        self, indices_TK: torch.Tensor, weights_TK: torch.Tensor, counts_E: torch.Tensor, T: int
    ) -> torch.Tensor:
        """True for the slots each expert keeps within its capacity, by the drop policy."""
        K = self.config.top_k
        device = indices_TK.device
        # the T*K slots flattened token-major (``_TK`` below is that flat [T*K] order)
        expert_TK = indices_TK.flatten()
        if self.config.drop_policy == "probs":
            priority_TK = torch.argsort(weights_TK.detach().flatten(), descending=True, stable=True)
        else:
            priority_TK = torch.arange(T * K, device=device)
        by_expert_TK = priority_TK[torch.argsort(expert_TK[priority_TK], stable=True)]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_TK = torch.arange(T * K, device=device) - starts_E[expert_TK[by_expert_TK]]
        kept_TK = torch.zeros(T * K, dtype=torch.bool, device=device)
        kept_TK[by_expert_TK] = rank_TK < self.capacity(T)
        return kept_TK.view(T, K)

    def step(self) -> None:
        """One optimizer step: balancers with state update it from the loads seen since."""
        self.auto_step = False
        self._replay.clear()  # recomputes belong to the backward passes before this step
        if self.training:
            with torch.no_grad():
                self.balancer.step(self.group)

    @property
    def _explicit_steps(self) -> bool:  # the former spelling of ``not auto_step``
        return not self.auto_step

    @_explicit_steps.setter
    def _explicit_steps(self, value: bool) -> None:
        self.auto_step = not value


def recomputing() -> bool:
    """True while autograd re-runs a forward for activation checkpointing (inside backward)."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1
