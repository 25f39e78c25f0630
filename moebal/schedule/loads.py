"""Load arrays checked at the public entries of the schedule package.

Totals are tested in float64 (no int64 wrap-around) and, when too large, named exactly (in
Python integers), so that a sum which would overflow is never reported as a small number.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MAX_TOTAL = 2**50  # token totals stay far from int64 and float64-exact limits


def exact_total(arr: np.ndarray) -> int:
    """The sum of integer-valued ``arr`` in Python integers (an int64 sum can wrap around)."""
    return sum(int(v) for v in np.asarray(arr).ravel().tolist())


def _check_total(arr: np.ndarray, limit: int, what: str) -> None:
    if float(arr.sum(dtype=np.float64)) >= limit:
        raise ValueError(what.format(total=exact_total(arr)))


def schedule_loads(
    num_experts: int, num_gpus: int, loads: object
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(loads_E, loads_RE or None) as int64 from int [E] or int [R, E] loads (R = G sources).

    Accepts integers, integer-valued floats and torch tensors; raises ValueError naming the
    first bad entry (wrong shape, not an integer, negative) or the exact total when it
    reaches 2^50.
    """
    E, G = num_experts, num_gpus
    if hasattr(loads, "detach"):  # a torch tensor
        loads = loads.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(loads)
    if arr.shape not in ((E,), (G, E)):
        raise ValueError(
            f"loads must have shape [{E}] (per expert) or [{G}, {E}] (per source GPU and "
            f"expert) for this placement, got {arr.shape}"
        )
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"loads must be integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        ok = np.isfinite(arr) & (arr == np.floor(arr))
        if not ok.all():
            bad = np.argwhere(~ok)[0].tolist()
            raise ValueError(f"loads must be integers; loads{bad} = {arr[tuple(bad)].item()!r}")
    if (arr < 0).any():
        bad = np.argwhere(arr < 0)[0].tolist()
        raise ValueError(f"loads must be non-negative; loads{bad} = {arr[tuple(bad)].item()!r}")
    _check_total(arr, MAX_TOTAL, "total load {total} is too large (limit 2^50 tokens)")
    arr = arr.astype(np.int64)
    if arr.ndim == 2:
        return arr.sum(0), arr
    return arr, None


def expert_loads(num_experts: int, loads_E: np.ndarray) -> np.ndarray:
    """int64 [E] from one non-negative integer count per expert (total below 2^53)."""
    arr = np.asarray(loads_E)
    if arr.shape != (num_experts,):
        raise ValueError(
            f"loads_E must have shape [{num_experts}] (one count per expert), got {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"loads_E must be numeric, got {arr.dtype}")
    ok = np.isfinite(arr) & (arr >= 0) & (arr == np.floor(arr))
    if not ok.all():
        e = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"loads must be non-negative integers; expert {e} has {arr[e]!r}")
    _check_total(arr, 2**53, "densest_subset: total load {total} must stay below 2^53")
    return arr.astype(np.int64)


def load_history(loads_E: Optional[np.ndarray], num_experts: int, builder: str) -> np.ndarray:
    """A placement builder's load history as int64 [P steps, E] (one [E] vector is one step)."""
    E = num_experts
    if loads_E is None:
        raise ValueError(
            f"{builder} placement needs a load history: pass loads_E ([E] or [steps, E])"
        )
    arr = np.asarray(loads_E)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != E:
        raise ValueError(
            f"{builder} placement: loads_E must have shape [{E}] or [steps, {E}], got {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{builder} placement: loads_E must be numeric, got {arr.dtype}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.floor(arr)):
        bad = arr[~(np.isfinite(arr) & (arr >= 0) & (arr == np.floor(arr)))][0]
        raise ValueError(f"{builder} placement: loads must be non-negative integers, got {bad!r}")
    _check_total(arr, 2**62, builder + " placement: total load {total} of the history is too large")
    return arr.astype(np.int64)
