"""The balancing systems the simulator compares, all on the same micro-batches.

Every system answers, for one micro-batch and one MoE layer of one group of GPUs (each GPU
is also the source of its own micro-batch's tokens): how many assignments each GPU
computes (``tokens_G``), who sends how many to whom (``flow_GG``, source row, destination
column, diagonal = stays local) and how long scheduling took (``sched_s``).

- ``plain_ep``: expert parallelism over all G GPUs, no replicas: expert e lives on GPU
  ``e mod G`` (E/G experts per GPU; needs E divisible by G).
- ``standard``: Megatron's EP x EDP: EP groups of ``ep`` GPUs, expert e on GPU ``e mod ep``
  of every group; a source's tokens go to the replica in its own EP group.
- ``eplb``: DeepSeek EPLB placement over each scheduling group, rebuilt every
  ``rebalance_every`` steps from the loads of the previous window (the standard system until
  the first rebuild); each source splits its tokens of an expert evenly over its replicas.
- ``lp_standard`` / ``lp_symmetric`` / ``lp_asymmetric``: per-micro-batch LP scheduling
  (``moebal.schedule.solve_schedule``) over that placement within each scheduling group;
  the asymmetric placement is built from history like eplb (symmetric until then).
- ``ideal``: a lower bound (``CostModel.ideal_layer_time``), computed by the simulator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moebal.schedule import build_placement, solve_schedule

SYSTEMS = (
    "plain_ep",
    "standard",
    "eplb",
    "lp_standard",
    "lp_symmetric",
    "lp_asymmetric",
    "ideal",
)
LP_PLACEMENT = {"lp_standard": "standard", "lp_symmetric": "symmetric", "lp_asymmetric": "asymmetric"}


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Cluster:
    """G GPUs in EP groups of ``ep_size``; ``sched_group`` GPUs (whole EP groups) are merged
    into one scheduling group, inside which tokens may go to any replica. Every GPU holds
    ``E / ep_size`` expert slots, so each expert has ``sched_group / ep_size`` replicas per
    scheduling group on average."""

    num_gpus: int
    num_experts: int
    ep_size: int
    sched_group: int

    def __post_init__(self) -> None:
        G = _int("num_gpus", self.num_gpus)
        E = _int("num_experts", self.num_experts)
        ep = _int("ep_size", self.ep_size)
        sg = _int("sched_group", self.sched_group)
        if E % ep:
            raise ValueError(f"num_experts={E} must be divisible by ep_size={ep}")
        if sg % ep:
            raise ValueError(f"sched_group={sg} must be a multiple of ep_size={ep}")
        if G % sg:
            raise ValueError(f"num_gpus={G} must be a multiple of sched_group={sg}")

    @property
    def slots_per_gpu(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def num_groups(self) -> int:
        return self.num_gpus // self.sched_group

    def supports(self, system: str) -> Optional[str]:
        """None when ``system`` can run on this cluster, else the reason it cannot."""
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
        if system == "plain_ep" and self.num_experts % self.num_gpus:
            return (
                f"plain EP needs the {self.num_experts} experts to divide over the"
                f" {self.num_gpus} GPUs"
            )
        return None


# ---------------------------------------------------------------------------------------
# token flows
# ---------------------------------------------------------------------------------------
def _even_split_flows(loads_RE: np.ndarray, hosts_EG: np.ndarray):
    """Every source splits its assignments of expert e evenly over e's hosts (the remainder
    goes to the hosts after the source's own index, cyclically).

    loads_RE int [R sources, E]; hosts_EG bool [E, G]. Returns (x_EG int64 [E, G], flow_RG
    int64 [R, G]). Here H indexes the hosts of an expert (at most the largest replica count).
    """
    loads_RE = np.asarray(loads_RE, dtype=np.int64)
    R, E = loads_RE.shape
    hosts_EG = np.asarray(hosts_EG, dtype=bool)
    G = hosts_EG.shape[1]
    r_E = hosts_EG.sum(1)
    if np.any(r_E == 0):
        raise ValueError(f"expert {int(np.flatnonzero(r_E == 0)[0])} has no replica")
    H = int(r_E.max())
    # hosts of each expert in index order, padded with the first host (masked out below)
    order_EH = np.argsort(~hosts_EG, axis=1, kind="stable")[:, :H]
    j_H = np.arange(H)
    valid_EH = j_H[None, :] < r_E[:, None]
    q_RE, rem_RE = np.divmod(loads_RE, r_E[None, :])
    s_R = np.arange(R)
    cyc_REH = (j_H[None, None, :] - s_R[:, None, None]) % r_E[None, :, None]
    share_REH = (q_RE[:, :, None] + (cyc_REH < rem_RE[:, :, None])) * valid_EH[None]
    dest_REH = np.broadcast_to(order_EH[None], share_REH.shape)
    idx = (s_R[:, None, None] * G + dest_REH).ravel()
    flow = np.bincount(idx, weights=share_REH.ravel(), minlength=R * G).reshape(R, G)
    x_EG = np.zeros((E, G), dtype=np.int64)
    e_idx = (np.arange(E)[:, None] * G + order_EH).ravel()
    x_EG.ravel()[:] = np.bincount(e_idx, weights=share_REH.sum(0).ravel(), minlength=E * G)
    return x_EG, flow.astype(np.int64)


# ---------------------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------------------
@dataclass
class Assignment:
    """One system's answer for one group, micro-batch and layer."""

    tokens_G: np.ndarray  # assignments computed per GPU
    flow_GG: np.ndarray  # source -> GPU assignments (diagonal stays local)
    sched_s: float = 0.0  # scheduling time charged to this layer


class PlainEP:
    """EP over all GPUs of the cluster, no replicas."""

    name = "plain_ep"

    def __init__(self, cluster: Cluster) -> None:
        reason = cluster.supports(self.name)
        if reason:
            raise ValueError(reason)
        self.group_size = cluster.num_gpus

    def assign(self, group: int, layer: int, step: int, loads_RE: np.ndarray) -> Assignment:
        R, E = loads_RE.shape
        G = self.group_size
        flow = loads_RE.reshape(R, E // G, G).sum(1)  # expert e = k*G + g lives on GPU g
        return Assignment(flow.sum(0), flow)


class Standard:
    """Megatron EP x EDP: tokens of a source go to the replica in its own EP group."""

    name = "standard"

    def __init__(self, cluster: Cluster) -> None:
        self.group_size = cluster.sched_group
        self.ep = cluster.ep_size

    def assign(self, group: int, layer: int, step: int, loads_RE: np.ndarray) -> Assignment:
        R, E = loads_RE.shape
        ep = self.ep
        per_local_RI = loads_RE.reshape(R, E // ep, ep).sum(1)  # e = k*ep + i on local GPU i
        flow = np.zeros((R, R // ep, ep), dtype=np.int64)
        flow[np.arange(R), np.arange(R) // ep, :] = per_local_RI
        flow = flow.reshape(R, R)
        return Assignment(flow.sum(0), flow)


class _Rebalancing:
    """Keeps per-layer load history and rebuilds a placement every ``rebalance_every``
    steps from the loads of the last window (one row per step and scheduling group)."""

    def __init__(self, cluster: Cluster, rebalance_every: int, seed: int) -> None:
        self.cluster = cluster
        self.group_size = cluster.sched_group
        self.rebalance_every = _int("rebalance_every", rebalance_every)
        self.seed = seed
        self._window: dict[int, list] = {}
        self._placement: dict[int, object] = {}
        self._built_at: dict[int, int] = {}

    def observe(self, layer: int, loads_RE: np.ndarray) -> None:
        """Add one step's loads of a layer (one row per scheduling group) to the window."""
        self._window.setdefault(layer, []).append(np.asarray(loads_RE, dtype=np.int64))

    def placement_for(self, layer: int, step: int):
        due = step // self.rebalance_every
        if self._built_at.get(layer) != due:
            window = self._window.pop(layer, None)
            if due == 0 or not window:
                if layer not in self._placement:
                    self._placement[layer] = self.initial_placement(layer)
            else:
                self._placement[layer] = self.placement_from_history(layer, np.concatenate(window))
            self._built_at[layer] = due
        return self._placement[layer]


class EPLB(_Rebalancing):
    """DeepSeek EPLB placement over each scheduling group, tokens split evenly over replicas."""

    name = "eplb"

    def initial_placement(self, layer: int):
        return None  # the standard placement, routed as Megatron does

    def placement_from_history(self, layer: int, loads_RE: np.ndarray):
        c = self.cluster
        p = build_placement("eplb", c.sched_group, c.num_experts, c.slots_per_gpu,
                            loads_E=loads_RE, seed=self.seed + layer)
        return p.holds_EG

    def __init__(self, cluster: Cluster, rebalance_every: int, seed: int) -> None:
        super().__init__(cluster, rebalance_every, seed)
        self._standard = Standard(cluster)

    def assign(self, group: int, layer: int, step: int, loads_RE: np.ndarray) -> Assignment:
        hosts = self.placement_for(layer, step)
        if hosts is None:  # before the first re-placement: Megatron's standard routing
            return self._standard.assign(group, layer, step, loads_RE)
        x_EG, flow = _even_split_flows(loads_RE, hosts)
        return Assignment(x_EG.sum(0), flow)


class LPScheduled(_Rebalancing):
    """Per-micro-batch LP over a placement within each scheduling group."""

    def __init__(
        self,
        cluster: Cluster,
        placement: str,
        rebalance_every: int = 10,
        seed: int = 0,
        sched_time_s: Optional[float] = None,
    ) -> None:
        super().__init__(cluster, rebalance_every, seed)
        self.placement_name = placement
        self.name = "lp_" + placement
        self.sched_time_s = sched_time_s
        self.solve_seconds: list[float] = []
        self._prev: dict[tuple[int, int], object] = {}

    def initial_placement(self, layer: int):
        c = self.cluster
        name = "symmetric" if self.placement_name == "asymmetric" else self.placement_name
        return build_placement(name, c.sched_group, c.num_experts, c.slots_per_gpu, seed=self.seed + layer)

    def placement_from_history(self, layer: int, loads_RE: np.ndarray):
        if self.placement_name != "asymmetric":  # fixed placement: history is not used
            return self._placement.get(layer) or self.initial_placement(layer)
        c = self.cluster
        return build_placement("asymmetric", c.sched_group, c.num_experts, c.slots_per_gpu,
                               loads_E=loads_RE, seed=self.seed + layer)

    def assign(self, group: int, layer: int, step: int, loads_RE: np.ndarray) -> Assignment:
        placement = self.placement_for(layer, step)
        key = (group, layer)
        prev = self._prev.get(key)
        if prev is not None and prev[0] is not placement:
            prev = None  # re-placed: the previous plan does not apply
        t0 = time.perf_counter()
        plan = solve_schedule(placement, loads_RE, prev=None if prev is None else prev[1])
        elapsed = time.perf_counter() - t0
        self._prev[key] = (placement, plan)
        self.solve_seconds.append(elapsed)
        G = loads_RE.shape[0]
        src, _, dst, n = plan.sends.T
        flow = np.bincount(src * G + dst, weights=n, minlength=G * G).astype(np.int64).reshape(G, G)
        sched = elapsed if self.sched_time_s is None else self.sched_time_s
        return Assignment(plan.load_G, flow, sched)


def make_system(
    name: str,
    cluster: Cluster,
    *,
    rebalance_every: int = 10,
    seed: int = 0,
    sched_time_s: Optional[float] = None,
):
    """Build one system by name (``ideal`` is computed by the simulator, not here)."""
    if name not in SYSTEMS or name == "ideal":
        raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS[:-1]}")
    if name == "plain_ep":
        return PlainEP(cluster)
    if name == "standard":
        return Standard(cluster)
    if name == "eplb":
        return EPLB(cluster, rebalance_every, seed)
    return LPScheduled(
        cluster,
        LP_PLACEMENT[name],
        rebalance_every=rebalance_every,
        seed=seed,
        sched_time_s=sched_time_s,
    )
