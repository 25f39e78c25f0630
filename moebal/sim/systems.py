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
  ``rebalance_every`` steps from the loads of the previous window (standard placement until
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
def _northwest(sup_EA: np.ndarray, dem_EB: np.ndarray) -> np.ndarray:
    """Per expert, the north-west-corner transport of supply A onto demand B: [E, A, B].

    Moves ``min(sum sup, sum dem)`` per expert, sources and destinations in index order
    (deterministic)."""
    cs = np.cumsum(sup_EA, axis=1)
    cd = np.cumsum(dem_EB, axis=1)
    cs0 = cs - sup_EA
    cd0 = cd - dem_EB
    lo = np.maximum(cs0[:, :, None], cd0[:, None, :])
    hi = np.minimum(cs[:, :, None], cd[:, None, :])
    return np.maximum(hi - lo, 0)


def route_flows(loads_SE: np.ndarray, x_EG: np.ndarray, node_G: np.ndarray) -> np.ndarray:
    """Which source sends how many assignments to which GPU, given what each GPU computes.

    ``loads_SE[s, e]``: assignments of expert e produced on GPU s (sources are the group's
    GPUs, S == G); ``x_EG[e, g]``: assignments of e computed on g (column sums of the
    expert's supply and demand agree). Locality first: a source keeps what its own GPU
    computes, then sends within its node, then across nodes (north-west corner in index
    order at each tier). Returns ``flow_GG`` (int64, diagonal = kept local).
    """
    sup = np.asarray(loads_SE, dtype=np.int64).T.copy()  # [E, S]
    dem = np.asarray(x_EG, dtype=np.int64).copy()  # [E, G]
    E, G = dem.shape
    if sup.shape != (E, G):
        raise ValueError(f"loads_SE {np.shape(loads_SE)} does not match x_EG {dem.shape}")
    if not np.array_equal(sup.sum(1), dem.sum(1)):
        bad = int(np.flatnonzero(sup.sum(1) != dem.sum(1))[0])
        raise ValueError(
            f"expert {bad}: {sup[bad].sum()} assignments produced but {dem[bad].sum()} computed"
        )
    local = np.minimum(sup, dem)
    flow = np.diag(local.sum(0))
    sup -= local
    dem -= local
    chunk = max(1, int(4_000_000 // max(1, G * G)))
    node_G = np.asarray(node_G)
    for node in np.unique(node_G):
        idx = np.flatnonzero(node_G == node)
        if idx.size < 2:
            continue
        for a in range(0, E, chunk):
            f = _northwest(sup[a : a + chunk][:, idx], dem[a : a + chunk][:, idx])
            flow[np.ix_(idx, idx)] += f.sum(0)
            sup[a : a + chunk, idx] -= f.sum(2)
            dem[a : a + chunk, idx] -= f.sum(1)
    for a in range(0, E, chunk):
        f = _northwest(sup[a : a + chunk], dem[a : a + chunk])
        flow += f.sum(0)
    return flow


def _even_split_flows(loads_SE: np.ndarray, hosts_EG: np.ndarray):
    """Every source splits its assignments of expert e evenly over e's hosts (the remainder
    goes to the hosts after the source's own index, cyclically). Returns (x_EG, flow_GG)."""
    loads_SE = np.asarray(loads_SE, dtype=np.int64)
    S, E = loads_SE.shape
    hosts_EG = np.asarray(hosts_EG, dtype=bool)
    G = hosts_EG.shape[1]
    r_E = hosts_EG.sum(1)
    if np.any(r_E == 0):
        raise ValueError(f"expert {int(np.flatnonzero(r_E == 0)[0])} has no replica")
    R = int(r_E.max())
    # hosts of each expert in index order, padded with the first host (masked out below)
    order = np.argsort(~hosts_EG, axis=1, kind="stable")[:, :R]  # [E, R]
    j_R = np.arange(R)
    valid_ER = j_R[None, :] < r_E[:, None]
    q_SE, rem_SE = np.divmod(loads_SE, r_E[None, :])
    s_S = np.arange(S)
    cyc_SER = (j_R[None, None, :] - s_S[:, None, None]) % r_E[None, :, None]
    share_SER = (q_SE[:, :, None] + (cyc_SER < rem_SE[:, :, None])) * valid_ER[None]
    dest_SER = np.broadcast_to(order[None], share_SER.shape)
    idx = (s_S[:, None, None] * G + dest_SER).ravel()
    flow = np.bincount(idx, weights=share_SER.ravel(), minlength=S * G).reshape(S, G)
    x_EG = np.zeros((E, G), dtype=np.int64)
    e_idx = (np.arange(E)[:, None] * G + order).ravel()
    x_EG.ravel()[:] = np.bincount(e_idx, weights=share_SER.sum(0).ravel(), minlength=E * G)
    return x_EG, flow.astype(np.int64)


def standard_hosts(num_gpus: int, num_experts: int, ep_size: int) -> np.ndarray:
    """``hosts_EG`` of Megatron's placement: expert e on GPU ``e mod ep`` of every EP group."""
    e = np.arange(num_experts)[:, None]
    g = np.arange(num_gpus)[None, :]
    return (e % ep_size) == (g % ep_size)


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

    def assign(self, group: int, layer: int, step: int, loads_SE: np.ndarray) -> Assignment:
        S, E = loads_SE.shape
        G = self.group_size
        flow = loads_SE.reshape(S, E // G, G).sum(1)  # expert e = k*G + g lives on GPU g
        return Assignment(flow.sum(0), flow)


class Standard:
    """Megatron EP x EDP: tokens of a source go to the replica in its own EP group."""

    name = "standard"

    def __init__(self, cluster: Cluster) -> None:
        self.group_size = cluster.sched_group
        self.ep = cluster.ep_size

    def assign(self, group: int, layer: int, step: int, loads_SE: np.ndarray) -> Assignment:
        S, E = loads_SE.shape
        ep = self.ep
        per_local_SI = loads_SE.reshape(S, E // ep, ep).sum(1)  # e = k*ep + i on local GPU i
        flow = np.zeros((S, S // ep, ep), dtype=np.int64)
        flow[np.arange(S), np.arange(S) // ep, :] = per_local_SI
        flow = flow.reshape(S, S)
        return Assignment(flow.sum(0), flow)


class _Rebalancing:
    """Keeps per-layer load history and rebuilds a placement every ``rebalance_every``
    steps from the loads of the last window."""

    def __init__(self, cluster: Cluster, rebalance_every: int, seed: int) -> None:
        self.cluster = cluster
        self.group_size = cluster.sched_group
        self.rebalance_every = _int("rebalance_every", rebalance_every)
        self.seed = seed
        self._window: dict[int, np.ndarray] = {}
        self._placement: dict[int, object] = {}
        self._built_at: dict[int, int] = {}

    def observe(self, layer: int, loads_E: np.ndarray) -> None:
        """Add one step's cluster-wide loads of a layer to the history window."""
        w = self._window.get(layer)
        self._window[layer] = loads_E.astype(np.int64) if w is None else w + loads_E

    def placement_for(self, layer: int, step: int):
        due = step // self.rebalance_every
        if self._built_at.get(layer) != due:
            window = self._window.pop(layer, None)
            if due == 0 or window is None:
                if layer not in self._placement:
                    self._placement[layer] = self.initial_placement(layer)
            else:
                self._placement[layer] = self.placement_from_history(layer, window)
            self._built_at[layer] = due
        return self._placement[layer]


class EPLB(_Rebalancing):
    """DeepSeek EPLB placement over each scheduling group, tokens split evenly over replicas."""

    name = "eplb"

    def initial_placement(self, layer: int):
        c = self.cluster
        return standard_hosts(c.sched_group, c.num_experts, c.ep_size)

    def placement_from_history(self, layer: int, loads_E: np.ndarray):
        from moebal.sim import _schedule_api as api

        c = self.cluster
        p = api.build_placement("eplb", c.sched_group, c.num_experts, c.slots_per_gpu, loads_E, self.seed + layer)
        return api.hosts_EG(p)

    def assign(self, group: int, layer: int, step: int, loads_SE: np.ndarray) -> Assignment:
        hosts = self.placement_for(layer, step)
        x_EG, flow = _even_split_flows(loads_SE, hosts)
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
        gpus_per_node: int = 8,
    ) -> None:
        super().__init__(cluster, rebalance_every, seed)
        self.placement_name = placement
        self.name = "lp_" + placement
        self.sched_time_s = sched_time_s
        self.gpus_per_node = gpus_per_node
        self.solve_seconds: list[float] = []
        self._prev: dict[tuple[int, int], object] = {}

    def initial_placement(self, layer: int):
        from moebal.sim import _schedule_api as api

        c = self.cluster
        name = "symmetric" if self.placement_name == "asymmetric" else self.placement_name
        return api.build_placement(name, c.sched_group, c.num_experts, c.slots_per_gpu, None, self.seed + layer)

    def placement_from_history(self, layer: int, loads_E: np.ndarray):
        from moebal.sim import _schedule_api as api

        if self.placement_name != "asymmetric":
            return self._placement[layer]
        c = self.cluster
        return api.build_placement("asymmetric", c.sched_group, c.num_experts, c.slots_per_gpu, loads_E, self.seed + layer)

    def assign(self, group: int, layer: int, step: int, loads_SE: np.ndarray) -> Assignment:
        from moebal.sim import _schedule_api as api

        placement = self.placement_for(layer, step)
        key = (group, layer)
        t0 = time.perf_counter()
        x_EG, flow, plan = api.solve(placement, loads_SE, self._prev.get(key))
        elapsed = time.perf_counter() - t0
        self._prev[key] = plan
        self.solve_seconds.append(elapsed)
        if flow is None:
            G = loads_SE.shape[0]
            node_G = (group * G + np.arange(G)) // self.gpus_per_node
            flow = route_flows(loads_SE, x_EG, node_G)
        sched = elapsed if self.sched_time_s is None else self.sched_time_s
        return Assignment(x_EG.sum(0), flow, sched)


def make_system(
    name: str,
    cluster: Cluster,
    *,
    rebalance_every: int = 10,
    seed: int = 0,
    sched_time_s: Optional[float] = None,
    gpus_per_node: int = 8,
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
        gpus_per_node=gpus_per_node,
    )
