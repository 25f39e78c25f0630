"""Exact k-th largest value along the rows of a matrix, by a sampled bracket.

``torch.topk`` with a large k (the expert side of BIP and quantile balancing takes the
(c+1)-th largest of T values, c = T K / E) costs about 9 ns per element on CPU, however the
rows are laid out. :func:`bracket_kth_largest` gets the same value exactly in a few cheap
passes:

1. a sample of each row (one value in ``SAMPLE_STRIDE``, in runs of adjacent values) and
   its sorted top give two values ``hi >= lo`` whose ranks bracket the k-th largest with
   high probability;
2. one pass counts, per row, the values ``> hi`` (``above``) and marks those in
   ``[lo, hi]`` (a few percent of the row);
3. the marked values are gathered into a small padded matrix and the k-th largest of the
   row is the ``(k - above)``-th largest of them; leading ``+inf`` slots give every row the
   same rank, so that one ``torch.topk`` of the small matrix takes them all.

A row whose bracket misses (``above >= k``, or fewer than ``k`` values ``>= lo``: an
unlucky sample, or many ties) falls back to the full ``torch.topk`` for that row only, and
a matrix whose bracket holds too many values (heavy ties) falls back entirely: the result
is the exact k-th largest for every input without NaN (±inf included). Ties count with
multiplicity.

Measured (2-core CPU, torch 2.13, cold caches, one thread): 15-18% less time than
``torch.topk`` at 64 x 65536 and 64 x 131072, about the same at 64 x 16384 and more at
256 x 4096 (hence ``MIN_ROW``); on two threads
it loses under load (see ``MAX_THREADS``) and :func:`fast_kth_largest` then keeps to
``torch.topk``. docs/benchmarks.md, "Router", has the figures.
"""

from __future__ import annotations

import math

import torch

# one value in SAMPLE_STRIDE of each row is sampled, in runs of SAMPLE_RUN adjacent values,
# at least SAMPLE_MIN and at most SAMPLE_MAX of them (ns); the bracket then holds about
# 2 SPREAD sqrt(p (1 - p) / ns) of the row, p = k / n: 4% for p = 1/8 and ns = 1024
SAMPLE_STRIDE = 16
SAMPLE_MIN = 256
SAMPLE_MAX = 2048
SAMPLE_RUN = 16
# half-width of the bracket in standard deviations of the sampled rank (a row outside it,
# about 5% of rows, costs one torch.topk of that row)
SPREAD = 2.0
# rows shorter than this, or matrices smaller than MIN_SIZE, go to torch.topk directly:
# the fixed cost of the bracket's twenty-odd tensor operations does not pay off there (in
# the router benchmark, one thread, it was 4% slower to 4% faster at 64 x 16384 and up to
# 25% slower at 256 x 4096; 15-18% faster from 64 x 65536 on)
MIN_ROW = 65536
MIN_SIZE = 1 << 19
# the bracket runs only with at most this many intra-op threads, and only on CPU. Its passes
# are bound by memory and each is a parallel region, while torch.topk is one region bound
# by compute that splits the rows across threads: on two threads the bracket measured 20%
# faster with warm caches on a quiet machine, 14% slower in the router benchmark (cold
# caches) and several times slower when other processes held the cores (each region then
# waits for its second thread). On a GPU its host reads would sync.
MAX_THREADS = 1
# the bracket may hold at most this fraction of the matrix, else torch.topk for all rows
MAX_FILL = 0.25
# bool words summed at once by row_counts (each byte lane stays below 128)
LANE_CHUNK = 127


def topk_kth_largest(x_RN: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of each row of a 2-D ``x_RN`` by ``torch.topk`` on the smaller side."""
    n = x_RN.shape[1]
    if k <= n - k + 1:
        return torch.topk(x_RN, k, dim=1, sorted=False).values.amin(dim=1)
    return torch.topk(x_RN, n - k + 1, dim=1, largest=False, sorted=False).values.amax(dim=1)


def sample_bracket(x_RN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi_R, lo_R)``, ``hi >= lo``: sampled values whose ranks bracket the k-th largest.

    The sample is ``ns`` values of the row (see ``SAMPLE_*``); the k-th largest of the row
    sits near rank ``j = k ns / n`` of the sample, with a standard deviation of about
    ``sqrt(j (1 - j / ns))`` sample ranks; ``hi`` and ``lo`` are the sample's values
    ``SPREAD`` of those deviations above and below. Any ``hi >= lo`` keeps the result
    exact; a good bracket only makes it fast.
    """
    R, n = x_RN.shape
    size = max(SAMPLE_MIN, min(SAMPLE_MAX, n // SAMPLE_STRIDE))
    # runs of SAMPLE_RUN adjacent values, one run per block: a sixteenth of the memory
    # (a strided sample would touch every cache line of the row)
    block = SAMPLE_RUN * max(1, n // size)
    sample_RS = (
        x_RN[:, : n // block * block].unflatten(1, (-1, block))[:, :, :SAMPLE_RUN]
        .reshape(R, -1)
    )
    ns = sample_RS.shape[1]
    j = k * ns / n
    half = SPREAD * math.sqrt(j * max(0.0, 1.0 - j / ns)) + 1.0
    a = min(ns, max(1, math.floor(j - half)))  # sample rank of hi (counted from the top)
    b = min(ns, max(a, math.ceil(j + half)))  # sample rank of lo
    if b <= ns - a + 1:
        top_RB = torch.topk(sample_RS, b, dim=1, sorted=True).values
        return top_RB[:, a - 1], top_RB[:, b - 1]
    bottom_RA = torch.topk(sample_RS, ns - a + 1, dim=1, largest=False, sorted=True).values
    return bottom_RA[:, ns - a], bottom_RA[:, ns - b]


def row_counts(mask_RN: torch.Tensor) -> torch.Tensor:
    """The number of ``True`` in each row of a 2-D bool ``mask_RN`` (int64).

    ``mask.sum(dim=1)`` first widens every bool to int64; here each run of four bools is
    read as one int32 and summed in chunks of ``LANE_CHUNK``, so that every byte lane
    holds a count below 128 with no carry into the next, and the lanes are added at the
    end: about half the time of the plain sum on CPU.
    """
    R, n = mask_RN.shape
    words = n // 4 // LANE_CHUNK * LANE_CHUNK
    if words == 0 or mask_RN.stride(1) != 1 or (mask_RN.stride(0) | mask_RN.storage_offset()) % 4:
        return mask_RN.sum(dim=1)
    lanes_RC = (
        mask_RN[:, : 4 * words].view(torch.uint8).view(torch.int32)
        .unflatten(1, (-1, LANE_CHUNK)).sum(dim=2, dtype=torch.int32)
    )
    count_RC = lanes_RC & 0xFF
    for shift in (8, 16, 24):
        count_RC += (lanes_RC >> shift) & 0xFF
    return count_RC.sum(dim=1, dtype=torch.int64) + mask_RN[:, 4 * words :].sum(dim=1)


def bracket_kth_largest(
    x_RN: torch.Tensor, k: int, hi_R: torch.Tensor, lo_R: torch.Tensor
) -> torch.Tensor:
    """The exact k-th largest of each row of ``x_RN``, searched between ``lo_R <= hi_R``.

    Exact for any bracket: rows it misses take the full ``torch.topk``. ``k`` in ``1..n``.
    """
    R, n = x_RN.shape
    above_RN = x_RN > hi_R[:, None]
    inside_RN = (x_RN >= lo_R[:, None]).logical_xor_(above_RN)  # lo <= x <= hi
    above_R = row_counts(above_RN)
    inside_R = row_counts(inside_RN)
    rank_R = k - above_R  # the k-th largest is the rank-th largest inside the bracket
    hit_R = (rank_R >= 1) & (rank_R <= inside_R)
    rank_R = rank_R.masked_fill_(~hit_R, 1)
    # the common rank t: t - rank leading +inf slots in each row, then the row's bracket
    t = int(rank_R.max())
    lead_R = t - rank_R
    width = int((lead_R + inside_R).max())
    if width == 0 or int(inside_R.sum()) > MAX_FILL * R * n:  # an empty or a crowded bracket
        return topk_kth_largest(x_RN, k)
    rows_M, cols_M = inside_RN.nonzero().unbind(1)  # row-major: rows_M is sorted
    values_M = x_RN[rows_M, cols_M]
    starts_R = torch.cumsum(inside_R, 0) - inside_R - lead_R
    slots_M = torch.arange(values_M.numel(), device=x_RN.device) - starts_R[rows_M]
    pad_RW = x_RN.new_full((R, width), -math.inf)
    pad_RW.masked_fill_(torch.arange(width, device=x_RN.device) < lead_R[:, None], math.inf)
    pad_RW[rows_M, slots_M] = values_M
    kth_R = topk_kth_largest(pad_RW, t)
    if not bool(hit_R.all()):
        miss_R = (~hit_R).nonzero().squeeze(1)
        kth_R[miss_R] = topk_kth_largest(x_RN[miss_R], k)
    return kth_R


def fast_kth_largest(x_RN: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of each row of a 2-D ``x_RN`` (no NaN), ``k`` in ``1..n``.

    Rows shorter than ``MIN_ROW``, matrices smaller than ``MIN_SIZE``, a ``k`` within
    ``n / 32`` of either end (where ``torch.topk`` is cheap), non-float dtypes, tensors off
    the CPU and more than ``MAX_THREADS`` intra-op threads go to ``torch.topk``; the rest
    take :func:`bracket_kth_largest` with the :func:`sample_bracket` of the rows.
    """
    R, n = x_RN.shape
    small = n < MIN_ROW or R * n < MIN_SIZE or 32 * min(k, n - k + 1) < n
    where = x_RN.device.type != "cpu" or torch.get_num_threads() > MAX_THREADS
    if small or where or not x_RN.is_floating_point():
        return topk_kth_largest(x_RN, k)
    hi_R, lo_R = sample_bracket(x_RN, k)
    return bracket_kth_largest(x_RN, k, hi_R, lo_R)
