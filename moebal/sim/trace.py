"""Routing traces for the simulator: the generators (Zipf-skewed, drifting, bursty,
uniform) and the micro-batches of G sources a trace becomes.

A trace is a :class:`moebal.trace.RoutingTrace` (``Trace`` here, its former name):
``counts_PLRE`` — steps P, MoE layers L, source shards R (the data-parallel ranks that
produced the tokens), experts E — of token-expert assignments (a token routed to K experts
counts K times). Traces come from ``moebal train --trace`` (``load_trace``, docs/traces.md)
or from the generators here. The simulator needs one source per simulated GPU:
``microbatches`` turns the stream of shard count vectors into micro-batches of G sources.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from moebal.trace import RoutingTrace, load_trace, save_trace

Trace = RoutingTrace  # the former name of the simulator's trace class

GENERATORS = ("zipf", "drift", "burst", "uniform")


# ---------------------------------------------------------------------------------------
# synthetic traces
# ---------------------------------------------------------------------------------------
def zipf_popularity(num_experts: int, exponent: float, top_k: int = 1) -> np.ndarray:
    """Expert probabilities ``p_r ∝ 1 / r^exponent`` (rank r = 1..E), capped at ``1/top_k``.

    A token takes K distinct experts, so no expert can receive more than a ``1/K`` share of the
    assignments; the excess of capped experts is spread over the others in proportion
    (water-filling), which keeps the ordering.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts!r}")
    if not np.isfinite(exponent) or exponent < 0:
        raise ValueError(f"zipf exponent must be finite and >= 0, got {exponent!r}")
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k!r}")
    p = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    return _cap(p / p.sum(), 1.0 / top_k)


def generate_trace(
    kind: str = "zipf",
    *,
    steps: int = 8,
    layers: int = 2,
    shards: int = 32,
    experts: int = 64,
    tokens_per_shard: int = 4096,
    top_k: int = 2,
    exponent: float = 1.0,
    drift: float = 1.0,
    hot_experts: int = 4,
    hot_factor: float = 8.0,
    seed: int = 0,
) -> Trace:
    """A synthetic trace of ``tokens_per_shard * top_k`` assignments per (step, layer, shard).

    - ``zipf``: each layer has its own fixed popularity, Zipf with ``exponent`` over a random
      ordering of the experts; every shard draws its counts from it (multinomial).
    - ``drift``: like zipf, but the popularity rotates by ``drift`` experts per step (expert
      e at step t is as popular as expert ``e - round(t * drift) mod E`` at step 0).
    - ``burst``: Zipf background plus, every step and layer, ``hot_experts`` random experts
      whose weight is multiplied by ``hot_factor``.
    - ``uniform``: every expert gets exactly the same count (requires ``tokens_per_shard *
      top_k`` divisible by ``experts``) — the perfectly balanced trace.

    A multinomial draw may give one token the same expert twice; with K << E this is
    negligible, and the ``1/K`` cap keeps every count feasible in expectation.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown trace generator {kind!r}; choose from {GENERATORS}")
    for name, value in (("steps", steps), ("layers", layers), ("shards", shards),
                        ("experts", experts), ("tokens_per_shard", tokens_per_shard),
                        ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if top_k > experts:
        raise ValueError(f"top_k={top_k} exceeds experts={experts}")
    if hot_experts < 0 or hot_experts > experts:
        raise ValueError(f"hot_experts must be in [0, {experts}], got {hot_experts!r}")
    if not np.isfinite(hot_factor) or hot_factor <= 0:
        raise ValueError(f"hot_factor must be positive, got {hot_factor!r}")
    if not np.isfinite(drift):
        raise ValueError(f"drift must be finite, got {drift!r}")
    n = tokens_per_shard * top_k
    meta = dict(generator=kind, exponent=exponent, seed=seed, tokens_per_shard=tokens_per_shard)
    if kind == "uniform":
        if n % experts:
            raise ValueError(
                f"uniform trace needs tokens_per_shard*top_k ({n}) divisible by experts ({experts})"
            )
        counts = np.full((steps, layers, shards, experts), n // experts, dtype=np.int64)
        return Trace(counts, top_k=top_k, meta=meta)
    if kind == "drift":
        meta["drift"] = drift
    if kind == "burst":
        meta.update(hot_experts=hot_experts, hot_factor=hot_factor)
    rng = np.random.default_rng(seed)
    base = zipf_popularity(experts, exponent, 1)
    order_LE = np.stack([rng.permutation(experts) for _ in range(layers)])
    counts = np.empty((steps, layers, shards, experts), dtype=np.int64)
    cap = 1.0 / top_k
    for t in range(steps):
        for layer in range(layers):
            p = np.empty(experts)
            p[order_LE[layer]] = base
            if kind == "drift":
                p = np.roll(p, int(round(t * drift)))
            if kind == "burst" and hot_experts:
                hot = rng.choice(experts, size=hot_experts, replace=False)
                p[hot] *= hot_factor
            p /= p.sum()
            p = _cap(p, cap)
            counts[t, layer] = rng.multinomial(n, p, size=shards)
    return Trace(counts, top_k=top_k, meta=meta)


def _cap(p: np.ndarray, cap: float) -> np.ndarray:
    """Water-fill: no entry above ``cap``, the excess spread proportionally over the rest."""
    p = p.copy()
    for _ in range(p.size):
        over = p > cap + 1e-15
        if not over.any():
            break
        excess = (p[over] - cap).sum()
        p[over] = cap
        free = p < cap - 1e-15
        p[free] += excess * p[free] / p[free].sum()
    return p / p.sum()


# ---------------------------------------------------------------------------------------
# from a trace to the simulator's micro-batches
# ---------------------------------------------------------------------------------------
def microbatches(
    trace: Trace, num_gpus: int, tokens_per_gpu: Optional[int] = None, pool: int = 1
) -> np.ndarray:
    """Arrange a trace as micro-batches of ``num_gpus`` sources: [M, layers, G, experts].

    Every GPU of the simulated cluster is a data-parallel source with its own micro-batch.
    The trace's shard count vectors are taken in order (step by step, shard by shard) and
    grouped ``num_gpus`` at a time, separately per layer: with R shards and P steps there are
    ``floor(P * R / G)`` micro-batches; a trace recorded on G ranks maps one step to one
    micro-batch. Leftover vectors are dropped.

    ``pool``: every source is the sum of ``pool`` consecutive shard vectors (a GPU's
    micro-batch holds several of the recorded shards' sequences), so ``floor(P * R / (pool *
    G))`` micro-batches.

    ``tokens_per_gpu``: rescale every source's counts to ``tokens_per_gpu * top_k``
    assignments (largest-remainder rounding keeps integers and the exact total) so that a
    small training run's routing can be replayed at a realistic micro-batch size; the
    relative imbalance of each vector is kept.
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive integer, got {num_gpus!r}")
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1:
        raise ValueError(f"pool must be a positive integer, got {pool!r}")
    P, L, R, E = trace.counts_PLRE.shape
    # the N = P * R shard vectors of each layer, step by step, shard by shard
    counts_PLRE = trace.counts_PLRE.astype(np.int64, copy=False)
    stream_NLE = counts_PLRE.transpose(0, 2, 1, 3).reshape(P * R, L, E)
    N = (P * R) // pool
    stream_NLE = stream_NLE[: N * pool].reshape(N, pool, L, E).sum(1)
    M = N // num_gpus
    if M == 0:
        raise ValueError(
            f"the trace has {P} steps x {R} shards = {P * R} shard vectors, fewer than one"
            f" micro-batch of {num_gpus} GPUs x {pool} pooled vectors"
        )
    mb_MGLE = stream_NLE[: M * num_gpus].reshape(M, num_gpus, L, E)
    mb_MLGE = mb_MGLE.transpose(0, 2, 1, 3).copy()
    if tokens_per_gpu is not None:
        if isinstance(tokens_per_gpu, bool) or not isinstance(tokens_per_gpu, (int, np.integer)) or tokens_per_gpu < 1:
            raise ValueError(f"tokens_per_gpu must be a positive integer, got {tokens_per_gpu!r}")
        mb_MLGE = rescale_rows(mb_MLGE, int(tokens_per_gpu) * trace.top_k)
    return mb_MLGE


def rescale_rows(counts_XE: np.ndarray, total: int) -> np.ndarray:
    """Scale every last-axis row to sum to ``total`` (largest remainder rounding).

    All-zero rows are spread uniformly. Ties in the remainders go to the lower expert index,
    so the result is deterministic.
    """
    counts_XE = np.asarray(counts_XE, dtype=np.float64)
    shape = counts_XE.shape
    rows = counts_XE.reshape(-1, shape[-1])
    sums = rows.sum(1, keepdims=True)
    zero = sums[:, 0] == 0
    rows = rows.copy()
    rows[zero] = 1.0
    sums = rows.sum(1, keepdims=True)
    exact = rows * (total / sums)
    base = np.floor(exact).astype(np.int64)
    short = total - base.sum(1)
    frac = exact - base
    # rank remainders descending; stable sort keeps lower index first on ties
    order = np.argsort(-frac, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(shape[-1])[None, :].repeat(len(rows), 0), axis=1)
    base += (rank < short[:, None]).astype(np.int64)
    return base.reshape(shape)


__all__ = ["GENERATORS", "Trace", "generate_trace", "load_trace", "microbatches",
           "rescale_rows", "save_trace", "zipf_popularity"]
