"""Fixed-bin histograms of ``l_ij - alpha_i`` and the quantile read from their counts.

Pure functions on tensors, for the histogram form of quantile balancing
(:class:`~moebal.routing.balancers.quantile.QuantileBalancer` with ``mode="histogram"``).

Expert j's range is ``[lo_j, lo_j + 2 m)`` with ``lo_j = beta_j - m`` (``m`` the margin,
``beta`` the prices every rank holds alike, so every rank bins alike without seeing the
others' data), cut into ``B`` bins of width ``w = 2 m / B``, plus an underflow and an
overflow bin: ``[E, B + 2]`` counts, column 0 below the range, column ``B + 1`` at or
above it. The bin of a value is ``floor((x - lo_j) / w)`` clamped to ``-1..B``, computed
in float32 as one formula for every value (:func:`bin_of`), so the map is monotone and a
value lands in the same bin whichever rank or batch holds it (the edges are those of exact
arithmetic up to float32 rounding, under 2**-7 of a bin while ``E (B + 2) < 2**16``): the counts summed over batches and ranks are
exactly the counts of the pooled values, and the ``r``-th largest read from them is the
bin of the exact ``r``-th largest of the pooled values.
"""

from __future__ import annotations

import torch

from moebal.routing.kernels import expert_counts


def histogram_low(beta_E: torch.Tensor, margin: float) -> torch.Tensor:
    """``lo_j = beta_j - margin``: the lower edge of each expert's range (float32)."""
    return beta_E.float() - margin


def _cells(x: torch.Tensor, lo_E: torch.Tensor, margin: float, bins: int,
           out: torch.Tensor) -> torch.Tensor:
    """Each value's cell of the flat ``[E * (B + 2)]`` histogram, as an integral float.

    ``clamp(s x + c_j, o_j, o_j + B + 1)`` with ``s = B / (2 margin)``, ``o_j = j (B + 2)``
    and ``c_j = o_j + 1 - s lo_j``: its integer part is ``o_j`` + bin + 1 (``o_j`` under the
    range, ``o_j + B + 1`` over it). ``x`` is ``[T, E]`` (``lo_E`` along its last dim).
    Every bin map here goes through this one formula (two float32 operations per value).
    """
    E = x.shape[-1]
    scale = bins / (2.0 * margin)
    first_E = torch.arange(E, dtype=torch.float32, device=x.device) * (bins + 2)
    torch.add(first_E + (1.0 - scale * lo_E), x, alpha=scale, out=out)
    return out.clamp_(first_E, first_E + (bins + 1))


def bin_of(x_ET: torch.Tensor, lo_E: torch.Tensor, margin: float, bins: int) -> torch.Tensor:
    """The bin of each value, int64 in ``-1..bins`` (-1 under the range, ``bins`` over it)."""
    x_TE = x_ET.t()
    cell_TE = _cells(x_TE, lo_E, margin, bins, torch.empty_like(x_TE)).long()
    first_E = torch.arange(x_TE.shape[1], device=x_TE.device) * (bins + 2)
    return (cell_TE - first_E - 1).t()  # truncation is floor on these non-negative values


def histogram_counts_TE(
    x_TE: torch.Tensor, lo_E: torch.Tensor, margin: float, bins: int
) -> torch.Tensor:
    """``[E, bins + 2]`` int64 counts of the columns of ``x_TE`` (consumed as scratch).

    The same bins as :func:`bin_of` on ``x_TE.t()``, computed in place on the token-major
    layout (no transpose) and counted by one ``bincount`` over ``E * (bins + 2)`` cells.
    """
    E = x_TE.shape[1]
    cells = _cells(x_TE, lo_E, margin, bins, out=x_TE).view(-1).to(torch.int32)
    return expert_counts(cells, E * (bins + 2)).view(E, bins + 2)


def kth_largest_bin(counts_EB: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The bin (``-1..B``) of each row's ``k``-th largest value, from ``[E, B + 2]`` counts.

    ``k`` (>= 1, a scalar tensor or int) must not exceed the row's total count.
    """
    from_top_EB = counts_EB.flip(1).cumsum(1)
    above_E = (from_top_EB < k).sum(1)  # columns from the top holding fewer than k values
    return counts_EB.shape[1] - 2 - above_E


def bin_value(bin_E: torch.Tensor, lo_E: torch.Tensor, margin: float, bins: int) -> torch.Tensor:
    """A bin's representative value: its centre; the range's edge for under/overflow."""
    width = 2.0 * margin / bins
    return lo_E + (bin_E.to(lo_E.dtype) + 0.5).clamp_(0.0, float(bins)) * width
