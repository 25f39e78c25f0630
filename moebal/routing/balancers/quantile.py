"""Quantile balancing (Megatron-LM): the unclipped, equality-constrained relative of BIP.

Three estimators of the same price (``mode``): Megatron-LM's per-micro-batch quantile
averaged at the optimizer step, the exact quantile over the whole global batch, and the
same global quantile read from fixed-bin histograms (one integer all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from moebal.routing.balancers import quantile_histogram as hist
from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.balancers.collectives import all_gather_columns, all_reduce_sum_
from moebal.routing.kernels import Workspace, kth_largest, topk_indices
from moebal.routing.validate import check_choice, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from moebal.routing.config import RouterConfig

MODES = ("micro_batch", "global_batch", "histogram")


def admission(
    logits_TE: torch.Tensor, beta_E: torch.Tensor, top_k: int,
    allowed_TE: Optional[torch.Tensor] = None, ws: Optional[Workspace] = None,
    sorted_: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices_TK, alpha_T)``: the top-k of ``l - beta`` and the (K+1)-th value.

    ``alpha_i`` is token i's admission threshold. ``allowed_TE`` (bool, or None for all):
    experts outside it are not candidates (group-limited routing). ``sorted_``: the
    indices by decreasing ``l - beta`` (as Megatron-LM); else in no set order (faster).
    Needs ``K < E``.
    """
    T, E = logits_TE.shape
    ws = ws if ws is not None else Workspace()
    y_TE = torch.sub(logits_TE, beta_E, out=ws.get("y_TE", (T, E), logits_TE))
    if allowed_TE is not None:
        y_TE.masked_fill_(~allowed_TE, float("-inf"))
    if sorted_:
        values, indices = torch.topk(y_TE, top_k + 1, dim=1, sorted=True)
        return indices[:, :top_k].contiguous(), values[:, top_k]
    # unsorted: alpha is the least of the K+1; its slot takes the last one's expert
    values, indices = torch.topk(y_TE, top_k + 1, dim=1, sorted=False)
    alpha_T, at_T = values.min(dim=1)
    indices.scatter_(1, at_T[:, None], indices[:, top_k:])
    return indices[:, :top_k].contiguous(), alpha_T


def excess_ET(
    logits_TE: torch.Tensor, alpha_T: torch.Tensor,
    allowed_TE: Optional[torch.Tensor] = None, ws: Optional[Workspace] = None,
) -> torch.Tensor:
    """``x_ji = l_ij - alpha_i``, expert-major ``[E, T]``; -inf where not allowed.

    (A token with at most K allowed experts has ``alpha = -inf`` and ``x = +inf`` on them:
    it takes them at any price.)
    """
    T, E = logits_TE.shape
    ws = ws if ws is not None else Workspace()
    x_ET = ws.get("x_ET", (E, T), logits_TE)
    # a transposing copy, then a contiguous subtraction: one strided ``torch.sub(l.t(),
    # alpha, out=)`` measured 6x slower on the CPU (7.3 ms vs 1.3 ms at 16384 x 64)
    x_ET.copy_(logits_TE.t()).sub_(alpha_T)
    if allowed_TE is not None:
        x_ET.masked_fill_(~allowed_TE.t(), float("-inf"))
    return x_ET


def quantile_dual_update(
    logits_TE: torch.Tensor, beta_E: torch.Tensor, top_k: int, ws: Optional[Workspace] = None,
    allowed_TE: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route by the top-k of ``l - beta`` and estimate this batch's beta; both unclipped.

    ``alpha_i`` = (K+1)-th largest of ``l_i - beta`` (the token's admission threshold),
    ``beta_local_j`` = (c+1)-th largest over tokens of ``l_ij - alpha_i`` with
    ``c = floor(T K / E)`` (Megatron-LM requires ``T K`` divisible by E; the floor is its
    rule where it is, and the balanced target rounded down where it is not). Returns
    ``(indices_TK, beta_local_E)``. Needs ``K < E``. ``ws`` holds the [T, E]-sized scratch
    tensors between calls; ``allowed_TE`` as in :func:`admission`.
    """
    T, E = logits_TE.shape
    ws = ws if ws is not None else Workspace()
    indices_TK, alpha_T = admission(logits_TE, beta_E, top_k, allowed_TE, ws)
    x_ET = excess_ET(logits_TE, alpha_T, allowed_TE, ws)
    return indices_TK, kth_largest(x_ET, (T * top_k) // E + 1, dim=1)


@register_balancer("quantile")
class QuantileBalancer(Balancer):
    """Megatron-LM's quantile balancing: route by the top-k of ``l_ij - beta_j``.

    As in Megatron-LM it works on the logits l (float32), not on the scores: beta is in
    logit units. Each micro-batch is routed with the beta of earlier steps; in training
    mode it adds its part of the next estimate to an accumulator (with or without
    gradients: under a reentrant activation checkpoint the forward that counts runs in
    ``no_grad``, and the recompute never updates), and at ``step()``
    (once per optimizer step) the estimate becomes ``beta <- ema * beta + (1 - ema) * est``
    with ``ema = options.ema`` (0 = take the new estimate), centred (mean 0). No
    ``max(0, .)`` clip: experts below their share get a negative beta. ``options.mode``:

    - ``"micro_batch"`` (Megatron-LM): est = the mean over ranks of each rank's mean over
      its micro-batches of :func:`quantile_dual_update`'s estimate.
    - ``"global_batch"``: est_j = the exact (c+1)-th largest of ``l_ij - alpha_i`` over
      every token of the global batch (all micro-batches, all ranks: the values are
      gathered at ``step()``), ``c = floor(T_global K / E)``.
    - ``"histogram"``: the same quantile resolved to a bin of fixed-bin histograms
      (:mod:`~moebal.routing.balancers.quantile_histogram`): ``options.bins`` bins over
      ``beta_j +- options.margin`` plus under/overflow bins (an estimate outside the range
      is its edge: beta moves at most ``margin`` per step); one integer all-reduce of the
      ``[E, bins + 2]`` counts and the token count. Exact bucket counts under any
      sharding of the tokens over ranks and micro-batches.

    State (buffers): ``beta_E``, ``num_updates``, and the accumulator of the mode:
    ``beta_sum_E`` and ``micro_batches``; ``pending_ET`` (the values of the micro-batches
    so far, ``[E, tokens]``); or ``counts_EB`` (int64 ``[E, bins + 2]``) and ``tokens``.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """ema     EMA weight of beta across steps, in [0, 1), 0 = off (flat ``quantile_ema``).
        mode    "micro_batch" (Megatron-LM), "global_batch" or "histogram"
                (``quantile_mode``).
        bins    histogram bins per expert (``quantile_bins``; histogram mode).
        margin  half-width of each expert's histogram range around its beta, in logit
                units (``quantile_margin``; histogram mode); resolution 2 margin / bins.
        """

        ema: float = 0.0
        mode: str = "micro_batch"
        bins: int = 1000
        margin: float = 1.0
        flat_names: ClassVar[dict[str, str]] = {
            "ema": "quantile_ema", "mode": "quantile_mode", "bins": "quantile_bins",
            "margin": "quantile_margin"}

        def validate(self) -> None:
            check_number("quantile_ema", self.ema, low=0.0, high=1.0, high_open=True)
            check_choice("quantile_mode", self.mode, MODES)
            check_int("quantile_bins", self.bins, minimum=1)
            check_number("quantile_margin", self.margin, low=0.0, low_open=True)

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__(config)
        E, mode = config.num_experts, self.options.mode
        self.register_buffer("beta_E", torch.zeros(E, dtype=torch.float32))
        if mode == "micro_batch":
            self.register_buffer("beta_sum_E", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))
        elif mode == "global_batch":
            self.register_buffer("pending_ET", torch.zeros(E, 0, dtype=torch.float32))
        else:
            if E * (self.options.bins + 2) > 2**20:  # float32 cell ids exact to 1/8 of a bin
                raise ValueError(
                    f"quantile_bins={self.options.bins!r}: num_experts * (bins + 2) must not "
                    f"exceed 2**20, got {E * (self.options.bins + 2)}")
            counts = torch.zeros(E, self.options.bins + 2, dtype=torch.int64)
            self.register_buffer("counts_EB", counts)
            self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._ws = Workspace()

    def choice_scores(self, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """``l - beta`` (logits, float32) with the beta of earlier steps."""
        return ctx.logits_TE.detach().float() - self.beta_E

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        logits_TE = ctx.logits_TE.detach().float()
        allowed_TE = ctx.allowed_TE
        T, E = logits_TE.shape
        if not self.training or top_k >= E:
            y_TE = torch.sub(logits_TE, self.beta_E, out=self._ws.get("y_TE", (T, E), logits_TE))
            if allowed_TE is not None:
                y_TE.masked_fill_(~allowed_TE, float("-inf"))
            return topk_indices(y_TE, top_k)
        mode = self.options.mode
        if mode == "micro_batch":
            indices_TK, est_E = quantile_dual_update(
                logits_TE, self.beta_E, top_k, self._ws, allowed_TE)
            # with groups an expert may lack c+1 candidates (or have too many forced ones)
            est_E = torch.where(est_E.isfinite(), est_E, self.beta_E)
            ctx.updates["beta_sum_E"] = self.beta_sum_E + est_E
            ctx.updates["micro_batches"] = self.micro_batches + 1
            return indices_TK
        indices_TK, alpha_T = admission(
            logits_TE, self.beta_E, top_k, allowed_TE, self._ws, sorted_=False)
        if mode == "global_batch":
            x_ET = excess_ET(logits_TE, alpha_T, allowed_TE, self._ws)
            ctx.updates["pending_ET"] = torch.cat([self.pending_ET, x_ET], dim=1)
        else:
            x_TE = torch.sub(logits_TE, alpha_T[:, None], out=self._ws.get("x_TE", (T, E), logits_TE))
            if allowed_TE is not None:
                x_TE.masked_fill_(~allowed_TE, float("-inf"))
            lo_E = hist.histogram_low(self.beta_E, self.options.margin)
            counts = hist.histogram_counts_TE(x_TE, lo_E, self.options.margin, self.options.bins)
            ctx.updates["counts_EB"] = self.counts_EB + counts
            ctx.updates["tokens"] = self.tokens + T
        return indices_TK

    def commit(self, updates: dict[str, torch.Tensor]) -> None:
        if "pending_ET" in updates:  # grows by each micro-batch's tokens: replaced, not copied
            updates = dict(updates)
            self._buffers["pending_ET"] = updates.pop("pending_ET")
        super().commit(updates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "pending_ET"
        if key in state_dict and "pending_ET" in self._buffers:  # its width is the tokens so far
            self._buffers["pending_ET"] = torch.empty_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def step(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        mode = self.options.mode
        if mode == "micro_batch":
            est_E, moved = self._micro_batch_estimate(group)
        elif mode == "global_batch":
            est_E, moved = self._global_estimate(group)
        else:
            est_E, moved = self._histogram_estimate(group)
        ema = self.options.ema
        new_E = ema * self.beta_E + (1.0 - ema) * est_E
        new_E = new_E - new_E.mean()
        # only move when some rank saw a micro-batch
        self.beta_E.copy_(torch.where(moved, new_E, self.beta_E))
        self.num_updates.add_(moved.long())

    def _micro_batch_estimate(self, group) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        # average over micro-batches here, then over ranks (ranks that saw none add 0)
        seen = (self.micro_batches > 0).float()[None]
        packed = torch.cat([self.beta_sum_E / self.micro_batches.clamp_min(1), seen])
        all_reduce_sum_(packed, group)
        ranks = packed[-1]
        self.beta_sum_E.zero_()
        self.micro_batches.zero_()
        return packed[:-1] / ranks.clamp_min(1.0), ranks > 0

    def _global_estimate(self, group) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        values_ET, sizes = all_gather_columns(self.pending_ET, group, fill=float("-inf"))
        tokens = sum(sizes)
        self._buffers["pending_ET"] = self.pending_ET.new_zeros(self.pending_ET.shape[0], 0)
        moved = torch.tensor(tokens > 0, device=self.beta_E.device)
        if tokens == 0:
            return self.beta_E, moved
        est_E = kth_largest(values_ET, (tokens * self.config.top_k) // values_ET.shape[0] + 1, 1)
        return torch.where(est_E.isfinite(), est_E, self.beta_E), moved

    def _histogram_estimate(self, group) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        packed = all_reduce_sum_(torch.cat([self.counts_EB.view(-1), self.tokens[None]]), group)
        counts_EB, tokens = packed[:-1].view_as(self.counts_EB), packed[-1]
        self.counts_EB.zero_()
        self.tokens.zero_()
        E, opts = counts_EB.shape[0], self.options
        rank = (tokens * self.config.top_k) // E + 1
        lo_E = hist.histogram_low(self.beta_E, opts.margin)
        est_E = hist.bin_value(hist.kth_largest_bin(counts_EB, rank), lo_E, opts.margin, opts.bins)
        return est_E, tokens > 0
