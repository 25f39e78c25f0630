"""The router: logits in, expert choices out.

``Router(config)(logits_TE)`` returns a :class:`Routing`. The balancing method is a small
module picked by name from the registry in :mod:`moebal.routing.balancers`.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from moebal.routing.balancers import BALANCERS, Balancer, RoutingContext

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
BIAS_UPDATES = ("sign", "proportional")
BIP_ORDERS = ("paper", "causal")
OPTIMAL_SOLVERS = ("flow", "highs")


@dataclass
class RouterConfig:
    """Everything the router needs; names follow Megatron-core's ``moe_router_*`` knobs.

    num_experts, top_k      E and K.
    score_function          "softmax" or "sigmoid" over the logits (computed in float32).
    norm_topk_prob          rescale each token's K gate weights to sum to 1.
    capacity_factor         None = dropless; else each expert takes at most
                            ceil(capacity_factor * T * K / E) tokens of a batch.
    drop_policy             which tokens an over-full expert keeps: "probs" (highest gate
                            weight) or "position" (earliest in the batch).
    balancer                registered balancer name (see ``moebal.routing.BALANCERS``).
    aux_loss_coeff          alpha of the auxiliary-loss balancers.
    z_loss_coeff            beta of the router z-loss, usable with any balancer (0 = off).
    bias_update_rate        u of the loss-free expert bias.
    bias_update             "sign" (the paper's) or "proportional".
    bip_iters               T_iter: alternating dual iterations per batch of the BIP balancer.
    bip_warmup_iters        iterations of the BIP balancer's first update (from q = 0).
    bip_order               "paper" (update q on the batch, then route it) or "causal"
                            (route with the previous q, then update it from the batch).
    bip_pin_q               after each q update subtract min_j q_j (keeps the dual on the
                            representative with min q = 0; the batch's routing is unchanged).
                            False = the bare update as usually described, which drifts on long
                            streams (see docs/design.md, "Balancers").
    quantile_ema            EMA weight of the quantile balancer's beta across steps (0 = off).
    sinkhorn_iters          cap on Sinkhorn iterations per batch.
    sinkhorn_tol            Sinkhorn stops when the mean change of the expert scaling is
                            below this (Megatron-core's 1e-4).
    optimal_solver          the exact balanced routing's solver: "flow" (successive
                            shortest paths) or "highs" (the LP by HiGHS's simplex).
    """

    num_experts: int
    top_k: int = 2
    score_function: str = "softmax"
    norm_topk_prob: bool = False
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    balancer: str = "none"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    bias_update_rate: float = 1e-3
    bias_update: str = "sign"
    bip_iters: int = 2
    bip_warmup_iters: int = 32
    bip_order: str = "paper"
    bip_pin_q: bool = True
    quantile_ema: float = 0.0
    sinkhorn_iters: int = 1000
    sinkhorn_tol: float = 1e-4
    optimal_solver: str = "flow"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k!r}"
            )
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}"
            )
        if self.capacity_factor is not None and not (
            math.isfinite(self.capacity_factor) and self.capacity_factor > 0
        ):
            raise ValueError(
                f"capacity_factor must be None (dropless) or a positive number, "
                f"got {self.capacity_factor!r}"
            )
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(
                f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}"
            )
        if self.balancer not in BALANCERS:
            raise ValueError(
                f"unknown balancer {self.balancer!r}; known: {sorted(BALANCERS)}"
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.bias_update not in BIAS_UPDATES:
            raise ValueError(
                f"bias_update must be one of {BIAS_UPDATES}, got {self.bias_update!r}"
            )
        if self.bip_order not in BIP_ORDERS:
            raise ValueError(f"bip_order must be one of {BIP_ORDERS}, got {self.bip_order!r}")
        for name in ("bip_iters", "bip_warmup_iters", "sinkhorn_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.bip_pin_q, bool):
            raise ValueError(f"bip_pin_q must be a bool, got {self.bip_pin_q!r}")
        if not _is_number(self.quantile_ema) or not 0 <= self.quantile_ema < 1:
            raise ValueError(f"quantile_ema must be in [0, 1), got {self.quantile_ema!r}")
        if self.optimal_solver not in OPTIMAL_SOLVERS:
            raise ValueError(
                f"optimal_solver must be one of {OPTIMAL_SOLVERS}, got {self.optimal_solver!r}"
            )
        if not _is_number(self.sinkhorn_tol) or not (
            math.isfinite(self.sinkhorn_tol) and self.sinkhorn_tol > 0
        ):
            raise ValueError(f"sinkhorn_tol must be a finite number > 0, got {self.sinkhorn_tol!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Routing:
    """The router's answer for one batch of T tokens.

    indices_TK  int64 expert ids, distinct per token.
    weights_TK  gate weights from the unbiased scores; 0 where the slot was dropped.
    kept_TK     bool, False where capacity dropped the slot (all True when dropless).
    aux_loss    the balancer's auxiliary loss (scalar; zero when it has none).
    z_loss      the router z-loss (scalar; zero when z_loss_coeff is 0).
    loads_E     int64 tokens per expert after drops.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    loads_E: torch.Tensor

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


class NonFiniteLogits(ValueError):
    """The router was given logits with a NaN or inf entry (a diverged model)."""


@dataclass
class PendingUpdate:
    """One router's balancer update of one forward, applied by :meth:`Router.commit`.

    ``ctx.updates`` holds the new values of buffers that ``select``/``loss`` computed;
    ``loads_E`` goes to ``observe``; ``replay`` tells whether to keep the state from before
    the update for an activation-checkpointing recompute.
    """

    ctx: RoutingContext
    loads_E: torch.Tensor
    replay: bool


class RoutingLog:
    """The routings of one model forward, layer by layer, and their pending balancer updates.

    A model makes one per forward and hands it to every MoE layer; each router appends its
    :class:`Routing` to ``routings`` and, in training mode, its balancer update to the
    pending list instead of applying it. ``commit()`` — once the whole forward succeeded —
    applies them all; a forward that raises (say :class:`NonFiniteLogits` in a later layer)
    drops the log and no balancer state has changed. ``timed``: layers add the wall time
    of gate + router to ``router_seconds``.
    """

    def __init__(self, timed: bool = False) -> None:
        self.routings: list[Routing] = []
        self.timed = timed
        self.router_seconds = 0.0
        self._pending: list[tuple["Router", PendingUpdate]] = []

    def stage(self, router: "Router", update: PendingUpdate) -> None:
        if any(r is router for r, _ in self._pending):
            raise ValueError(
                "a router routed twice in one RoutingLog; its second update would overwrite "
                "the first (use one log per forward, one call per router)"
            )
        self._pending.append((router, update))

    def commit(self) -> None:
        """Apply every staged balancer update, in layer order; the log is then empty of them."""
        pending, self._pending = self._pending, []
        for router, update in pending:
            router.commit(update)


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
    """

    def __init__(
        self, config: RouterConfig, group: Optional["dist.ProcessGroup"] = None,
        auto_step: bool = True,
    ):
        super().__init__()
        config.validate()
        self.config = config
        self.group = group
        self.balancer = BALANCERS[config.balancer](config)
        # balancers that choose by the plain top-k of the scores: the router takes the
        # top-k values as gate weights and skips the gather
        kind = type(self.balancer)
        self._plain_topk = (
            kind.select is Balancer.select and kind.selection_scores is Balancer.selection_scores
        )
        self.auto_step = bool(auto_step)
        self.replay = False
        self._replay: collections.deque = collections.deque()

    def extra_repr(self) -> str:
        c = self.config
        return f"E={c.num_experts}, K={c.top_k}, score={c.score_function}, balancer={c.balancer}"

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
        # One cheap reduction: the sum is finite whenever every entry is, unless it overflows;
        # only then (or when something is NaN/inf) look at every entry.
        acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
        if logits_TE.numel() and not math.isfinite(float(logits_TE.detach().sum(dtype=acc))):
            bad = ~torch.isfinite(logits_TE)
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise NonFiniteLogits(
                    f"logits contain NaN or inf ({int(bad.sum())} entries, first at "
                    f"{where}: {logits_TE[where].item()!r})"
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
        update waits for ``log.commit()``; without, the update is applied before returning."""
        if self.training and recomputing():
            return self._recompute(logits_TE, seq_len)
        routing, ctx = self._route(logits_TE, seq_len)
        if log is not None:
            log.routings.append(routing)
        if self.training and ctx is not None:
            update = PendingUpdate(ctx, routing.loads_E, self.replay and torch.is_grad_enabled())
            if log is None:
                self.commit(update)
            else:
                log.stage(self, update)
        return routing

    def _recompute(self, logits_TE: torch.Tensor, seq_len: Optional[int]) -> Routing:
        """Backward re-runs a checkpointed forward: route again, change nothing."""
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
        self._check(logits_TE)
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
        if self._plain_topk:
            # the choice is the top-k of the scores themselves: its values are the weights
            weights_TK, indices_TK = torch.topk(scores_TE, K, dim=-1, sorted=False)
        else:
            indices_TK = balancer.select(scores_TE, K, ctx)
            if indices_TK.dtype != torch.int64:
                indices_TK = indices_TK.long()
            weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        counts_E = torch.bincount(indices_TK.flatten(), minlength=E)
        ctx.counts_E = counts_E
        if cfg.capacity_factor is None:
            kept_TK = torch.ones_like(indices_TK, dtype=torch.bool)
            loads_E = counts_E
        else:
            kept_TK = self._capacity_mask(indices_TK, weights_TK, counts_E, T)
            weights_TK = weights_TK * kept_TK
            loads_E = torch.bincount(indices_TK[kept_TK], minlength=E)

        aux_loss = balancer.loss(scores_TE, indices_TK, ctx)
        if cfg.z_loss_coeff > 0:
            z_loss = cfg.z_loss_coeff * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
        else:
            z_loss = scores_TE.new_zeros(())
        return Routing(indices_TK, weights_TK, kept_TK, aux_loss, z_loss, loads_E), ctx

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
        E, K = self.config.num_experts, self.config.top_k
        flat_expert = indices_TK.flatten()
        if self.config.drop_policy == "probs":
            priority = torch.argsort(weights_TK.detach().flatten(), descending=True, stable=True)
        else:
            priority = torch.arange(T * K, device=indices_TK.device)
        by_expert = priority[torch.argsort(flat_expert[priority], stable=True)]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank = torch.arange(T * K, device=indices_TK.device) - starts_E[flat_expert[by_expert]]
        kept = torch.zeros(T * K, dtype=torch.bool, device=indices_TK.device)
        kept[by_expert] = rank < self.capacity(T)
        return kept.view(T, K)

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
