"""Selection kernels the balancers share: exact k-th largest values and top-k indices.

Pure functions on tensors. ``torch.topk`` on CPU handles each short row on its own and is
slow for many rows of a few dozen experts; ``torch.kthvalue`` is slow on long axes. These
helpers pick, by shape, the fastest exact way measured here (see ``moebal bench router``).
"""

from __future__ import annotations

import torch


def kth_largest(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The exact ``k``-th largest value of ``x`` along ``dim`` (``k`` counts from 1).

    Ties count with multiplicity (the 2nd largest of ``[3, 3, 1]`` is 3). Returns ``x`` with
    ``dim`` removed. ``k`` must be in ``1..x.shape[dim]``.
    """
    n = x.shape[dim]
    if not 1 <= k <= n:
        raise ValueError(f"k={k!r} is outside 1..{n} along dim {dim}")
    if k == 1:
        return x.amax(dim=dim)
    if k == n:
        return x.amin(dim=dim)
    if min(k, n - k + 1) <= 16:
        if k <= n - k + 1:
            return torch.topk(x, k, dim=dim, sorted=True).values.select(dim, k - 1)
        return torch.topk(x, n - k + 1, dim=dim, largest=False, sorted=True).values.select(
            dim, n - k
        )
    return torch.kthvalue(x, n - k + 1, dim=dim).values


def topk_indices(x_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row (distinct per row, in no set order)."""
    return torch.topk(x_TE, k, dim=-1, sorted=False).indices
