"""Token dispatch for the routed experts: from a token's K expert choices to rows sorted by
expert, and back.

A dispatcher has two calls (as torchtitan's token dispatchers):

    x_ND, counts_E, meta = dispatcher.dispatch(x_TD, routing)   # rows sorted by expert
    y_ND = experts.run_sorted(x_ND, counts_E)                   # one grouped matmul each
    out_TD = dispatcher.combine(y_ND, meta)                     # gate-weighted, per token

``meta`` is frozen: everything ``combine`` needs, computed once by ``dispatch``.
:class:`LocalDispatcher` keeps every row on this process; the expert-parallel dispatcher of
``moebal.parallel`` sends them to other ranks and builds on the same permutation helpers:

- :func:`sort_slots`: the kept slots sorted by expert (one stable argsort), their tokens
  and the count per expert;
- :func:`sort_runs`: rows that come in consecutive runs (one run per entry of a count
  matrix) reordered by a key per run, stably;
- :func:`inverse_permutation`: the permutation that undoes another;
- :func:`combine_rows`: gate-weight rows and sum them onto their tokens.

Shapes: T tokens, K slots per token, E experts, N routed rows (N <= T*K: the kept slots),
D model width; slot ``t*K + k`` is the k-th choice of token t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.routing import Routing


@dataclass(frozen=True)
class SortedSlots:
    """The kept slots of a batch sorted by expert (ties by slot, i.e. token order).

    slot_N    int64 [N]: the slot (``t*K + k``) of each routed row.
    token_N   int64 [N]: its token, ``slot_N // K``.
    counts_E  int64 [E]: rows per expert; expert e's rows are the e-th run.
    """

    slot_N: torch.Tensor
    token_N: torch.Tensor
    counts_E: torch.Tensor


def sort_slots(indices_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int) -> SortedSlots:
    """The kept slots of ``indices_TK`` (expert ids, [T, K]) sorted by expert, stably.

    ``kept_TK`` (bool [T, K]) marks the slots capacity kept; all of them when dropless.
    """
    K = indices_TK.shape[1]
    expert_TK = indices_TK.reshape(-1)  # the T*K slots flattened, token-major
    if bool(kept_TK.all()):  # dropless
        slot_N = torch.argsort(expert_TK, stable=True)
    else:  # capacity dropped some slots: sort only the kept ones
        kept_N = torch.nonzero(kept_TK.reshape(-1)).squeeze(1)
        slot_N = kept_N[torch.argsort(expert_TK[kept_N], stable=True)]
    counts_E = torch.bincount(expert_TK[slot_N], minlength=num_experts)
    token_N = torch.div(slot_N, K, rounding_mode="floor")
    return SortedSlots(slot_N, token_N, counts_E)


def sort_runs(run_counts: torch.Tensor, run_keys: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: the stable permutation that orders rows by the key of their run.

    The rows come as consecutive runs, ``run_counts[c]`` rows in run c (1-D; empty runs
    allowed, ``total = run_counts.sum()``); entry n of the result is the old index of the
    n-th row once runs are ordered by ``run_keys`` (rows of one run, and runs of one key,
    keep their order).
    """
    run_N = torch.repeat_interleave(torch.arange(len(run_counts), device=run_counts.device),
                                    run_counts, output_size=total)
    return torch.argsort(run_keys[run_N], stable=True)


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    """int64 [N]: ``inv`` with ``inv[perm_N[n]] = n``, so ``x[perm_N][inv] == x``."""
    inv_N = torch.empty_like(perm_N)
    inv_N[perm_N] = torch.arange(len(perm_N), device=perm_N.device)
    return inv_N


def combine_rows(y_ND: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor,
                 num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """``out_TD[t] = sum over rows n of token t of weight_N[n] * y_ND[n]``, in ``dtype``.

    The sum runs in ``y_ND``'s dtype (rows of several experts meet here), then casts.
    """
    y_ND = y_ND * weight_N.to(y_ND.dtype).unsqueeze(1)
    out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1]).index_add_(0, token_N, y_ND)
    return out_TD.to(dtype)


@dataclass(frozen=True)
class LocalDispatch:
    """What :meth:`LocalDispatcher.combine` needs from :meth:`LocalDispatcher.dispatch`.

    token_N   int64 [N]: the token of each routed row.
    weight_N  [N]: its gate weight.
    num_tokens, dtype: T and the dtype of ``x_TD`` (those of the output).
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int
    dtype: torch.dtype


class LocalDispatcher:
    """Every routed row on this process: sort by expert, then combine per token.

    Not a module: no parameters, no buffers, no state between calls.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, LocalDispatch]:
        """``(x_ND, counts_E, meta)``: the tokens' rows sorted by expert, rows per expert."""
        slots = sort_slots(routing.indices_TK, routing.kept_TK, self.num_experts)
        weight_N = routing.weights_TK.reshape(-1)[slots.slot_N]
        meta = LocalDispatch(slots.token_N, weight_N, x_TD.shape[0], x_TD.dtype)
        return x_TD.index_select(0, slots.token_N), slots.counts_E, meta

    def combine(self, y_ND: torch.Tensor, meta: LocalDispatch) -> torch.Tensor:
        """``out_TD``: each token's rows weighted by their gate weights and summed."""
        return combine_rows(y_ND, meta.token_N, meta.weight_N, meta.num_tokens, meta.dtype)


__all__ = [
    "LocalDispatch",
    "LocalDispatcher",
    "SortedSlots",
    "combine_rows",
    "inverse_permutation",
    "sort_runs",
    "sort_slots",
]
