"""Selection kernels the balancers share: exact k-th largest values and top-k indices.

Pure functions on tensors. On CPU ``torch.topk`` costs about the same per element whatever
k is for short rows, and much less for small k on long rows; along dim 0 it is faster on a
contiguous transposed copy than in place (``torch.kthvalue`` measured slower than it for
every shape the balancers use). A large k on long rows (the expert side of BIP and quantile
balancing) goes to the sampled-bracket selection of :mod:`moebal.routing.select`, exact
and several times faster. :func:`expert_counts` counts tokens per expert without a host
synchronisation on accelerators.
"""

from __future__ import annotations

from typing import Optional

import torch

from moebal.routing.select import fast_kth_largest


def kth_largest(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The exact ``k``-th largest value of a 2-D ``x`` along ``dim`` (``k`` counts from 1).

    Ties count with multiplicity (the 2nd largest of ``[3, 3, 1]`` is 3). Returns ``x``
    with ``dim`` removed. ``k`` must be in ``1..x.shape[dim]``. ``x`` holds no NaN (the
    router rejects non-finite logits).
    """
    if x.dim() != 2 or dim not in (0, 1, -1, -2):
        raise ValueError(f"kth_largest takes a 2-D tensor and dim 0 or 1, got {tuple(x.shape)}, {dim}")
    dim = dim % 2
    n = x.shape[dim]
    if not 1 <= k <= n:
        raise ValueError(f"k={k!r} is outside 1..{n} along dim {dim}")
    if dim == 0:
        x = x.t().contiguous()
    if k == 1:
        return x.amax(dim=1)
    if k == n:
        return x.amin(dim=1)
    return fast_kth_largest(x, k)


def topk_indices(x_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row (distinct per row, in no set order)."""
    return torch.topk(x_TE, k, dim=-1, sorted=False).indices


def expert_counts(
    indices_N: torch.Tensor, num_experts: int, keep_N: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """int64 ``[num_experts]``: how many of the 1-D ``indices_N`` (each in
    ``0..num_experts-1``) name each expert, counting only where ``keep_N`` (bool, same
    shape) is True when given.

    ``torch.bincount`` on CPU; elsewhere :func:`scatter_counts`, since bincount (and
    boolean indexing) on CUDA read a value on the host to size their output.
    """
    if indices_N.device.type == "cpu":
        return torch.bincount(indices_N if keep_N is None else indices_N[keep_N],
                              minlength=num_experts)
    return scatter_counts(indices_N, num_experts, keep_N)


def scatter_counts(
    indices_N: torch.Tensor, num_experts: int, keep_N: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """What :func:`expert_counts` returns, by a scatter-add of ones (or of ``keep_N``) into
    zeros: no output size to read on the host (deterministic: integer sums)."""
    indices_N = indices_N.long()
    ones_N = torch.ones_like(indices_N) if keep_N is None else keep_N.long()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=indices_N.device)
    return counts_E.scatter_add_(0, indices_N, ones_N)


class Workspace:
    """Reusable scratch tensors, one per name, reallocated only when the shape changes.

    A balancer's per-batch intermediates (``s + b``, ``s - q``, ...) are as large as the
    score matrix; allocating a fresh one per batch costs, on CPU, about as much as the
    arithmetic (page faults of a new multi-megabyte block). Only for tensors that carry no
    gradient and do not outlive the call that fills them.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.shape != torch.Size(shape)
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf

    def clear(self) -> None:
        self._bufs.clear()
