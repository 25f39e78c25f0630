"""The simulator's cost model: expert compute and all-to-all time of one MoE layer.

Everything here is a closed formula on token counts (see docs/simulator.md for the
derivations and the basis of every default). For one micro-batch and one MoE layer, with
``n_g`` the token-expert assignments computed on GPU g::

    compute_g  = c0 + n_g * phi / R                       phi = 6 * D * F FLOPs (forward)
    bytes      = tokens * D * bytes_per_elem              per assignment sent
    dispatch_g = alpha + max( max(S_g^intra, R_g^intra) * b / B_intra,
                              max(S_g^inter, R_g^inter) * b / B_inter )
    combine_g  = dispatch_g                               (the same volumes, reversed)

S_g / R_g are the assignments GPU g sends to / receives from other GPUs of its node (intra) or
of other nodes (inter); tokens that stay on their GPU cost nothing. With ``passes="fwd_bwd"``
compute is multiplied by 3 (backward = 2 x forward FLOPs) and communication by 2 (the
backward pass has its own dispatch and combine). The layer time is the slowest GPU::

    sync="gpu":   T = max_g ( sched (+) dispatch_g + compute_g + combine_g )
    sync="stage": T = sched (+) max_g dispatch_g + max_g compute_g + max_g combine_g

where ``sched (+) d`` is ``sched + d`` without overlap and ``max(sched, d)`` with overlap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

PASSES = ("fwd", "fwd_bwd")
SYNC_MODES = ("gpu", "stage")

# Sustained bf16 rates of the SwiGLU expert computation, forward + backward (FLOP/s): measured
# with torch's grouped GEMM on 8 Mixtral-shaped experts (D=4096, F=14336) at 16384 tokens per
# GPU (docs/results/simulation/expert_timings_*.json). The dense peak of both chips is
# 989 TFLOP/s; H100 SXM and H200 share the GH100 die, so they compute alike.
H100_BF16_RATE = 550e12
H200_BF16_RATE = 565e12


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return value


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def expert_flops_per_token(d_model: int, ffn_hidden: int, passes: str = "fwd") -> float:
    """FLOPs of one token through one SwiGLU expert ``w2(silu(x w1) * (x w3))``.

    Three D x F matrix products at 2 FLOPs per multiply-add: ``6 * D * F`` forward; the
    backward pass computes the input and the weight gradients of each product, twice the
    forward, so ``passes="fwd_bwd"`` gives ``18 * D * F``. The element-wise SiLU and product
    (a few F FLOPs) are left out.
    """
    d_model = _positive_int("d_model", d_model)
    ffn_hidden = _positive_int("ffn_hidden", ffn_hidden)
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    return 6.0 * d_model * ffn_hidden * (3.0 if passes == "fwd_bwd" else 1.0)


def attention_flops_per_token(d_model: int, seq_len: int, passes: str = "fwd") -> float:
    """FLOPs per token of one causal self-attention block (the dense, balanced part).

    Q, K, V and output projections ``4 * 2 * D^2`` plus scores and weighted sum
    ``2 * 2 * S * D`` halved by the causal mask: ``8 D^2 + 2 S D`` forward, x3 with backward.
    """
    d_model = _positive_int("d_model", d_model)
    seq_len = _positive_int("seq_len", seq_len)
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    fwd = 8.0 * d_model * d_model + 2.0 * seq_len * d_model
    return fwd * (3.0 if passes == "fwd_bwd" else 1.0)


@dataclass(frozen=True)
class Hardware:
    """One GPU type and its interconnect.

    rate: sustained FLOP/s of the expert computation; compute_overhead_s: fixed time per
    expert computation per GPU and layer (kernel launches; 0 unless calibrated);
    intra_bw / inter_bw: bytes/s per direction per GPU over NVLink / the node's network
    (one NIC per GPU); bw_efficiency: the fraction of those link rates an all-to-all reaches;
    latency_s: fixed cost of one all-to-all.
    """

    name: str = "h100"
    rate: float = H100_BF16_RATE
    compute_overhead_s: float = 0.0
    intra_bw: float = 450e9
    inter_bw: float = 50e9
    bw_efficiency: float = 0.8
    latency_s: float = 20e-6

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _non_negative("compute_overhead_s", self.compute_overhead_s)
        _positive("intra_bw", self.intra_bw)
        _positive("inter_bw", self.inter_bw)
        _positive("bw_efficiency", self.bw_efficiency)
        if self.bw_efficiency > 1:
            raise ValueError(f"bw_efficiency must be in (0, 1], got {self.bw_efficiency!r}")
        _non_negative("latency_s", self.latency_s)

    def replace(self, **changes) -> "Hardware":
        return dataclasses.replace(self, **changes)


#: Defaults: H100 SXM / H200 SXM with NVLink 4 (900 GB/s both directions = 450 GB/s each way)
#: and one 400 Gb/s (50 GB/s) RDMA NIC per GPU, as in DGX/HGX H100 and H200 nodes.
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(name="h100", rate=H100_BF16_RATE),
    "h200": Hardware(name="h200", rate=H200_BF16_RATE),
}


@dataclass(frozen=True)
class ModelShape:
    """The MoE layer being simulated: model dim D, expert hidden F, top-K, bytes per element
    of the dispatched activations, and the sequence length (only for the attention share)."""

    d_model: int = 4096
    ffn_hidden: int = 14336
    top_k: int = 2
    bytes_per_elem: int = 2
    seq_len: int = 4096

    def __post_init__(self) -> None:
        _positive_int("d_model", self.d_model)
        _positive_int("ffn_hidden", self.ffn_hidden)
        _positive_int("top_k", self.top_k)
        _positive_int("bytes_per_elem", self.bytes_per_elem)
        _positive_int("seq_len", self.seq_len)


@dataclass(frozen=True)
class CostModel:
    """Turns per-GPU token counts and token flows into seconds.

    passes: "fwd" or "fwd_bwd" (compute x3, communication x2); sync: "gpu" (a layer takes
    its slowest GPU's dispatch + compute + combine) or "stage" (every all-to-all waits for
    the slowest GPU: the sum of the per-stage maxima); overlap: the scheduler runs while
    tokens are dispatched (charged as max(sched, dispatch) instead of the sum);
    include_attention: add the balanced attention block of every layer to every system.
    """

    hardware: Hardware = field(default_factory=Hardware)
    shape: ModelShape = field(default_factory=ModelShape)
    gpus_per_node: int = 8
    passes: str = "fwd_bwd"
    sync: str = "gpu"
    overlap: bool = False
    include_attention: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hardware, Hardware):
            raise TypeError(f"hardware must be a Hardware, got {self.hardware!r}")
        if not isinstance(self.shape, ModelShape):
            raise TypeError(f"shape must be a ModelShape, got {self.shape!r}")
        _positive_int("gpus_per_node", self.gpus_per_node)
        if self.passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}, got {self.passes!r}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")

    def replace(self, **changes) -> "CostModel":
        return dataclasses.replace(self, **changes)

    # -- per-token constants ---------------------------------------------------------------
    @property
    def seconds_per_token(self) -> float:
        """Compute seconds of one token-expert assignment (all passes)."""
        return expert_flops_per_token(self.shape.d_model, self.shape.ffn_hidden, self.passes) / (
            self.hardware.rate
        )

    @property
    def bytes_per_token(self) -> float:
        """Bytes of one dispatched token-expert assignment: ``D * bytes_per_elem``."""
        return float(self.shape.d_model * self.shape.bytes_per_elem)

    @property
    def comm_multiplier(self) -> int:
        return 2 if self.passes == "fwd_bwd" else 1

    @property
    def compute_multiplier(self) -> int:
        return 3 if self.passes == "fwd_bwd" else 1

    # -- the formulas ----------------------------------------------------------------------
    def compute_time(self, tokens_G: np.ndarray) -> np.ndarray:
        """Expert compute seconds of each GPU (all passes): ``m * c0 + n_g * phi_all / R``."""
        tokens_G = np.asarray(tokens_G, dtype=np.float64)
        return (
            self.compute_multiplier * self.hardware.compute_overhead_s
            + tokens_G * self.seconds_per_token
        )

    def link_volumes(self, flow_GG: np.ndarray, gpu_ids: Optional[np.ndarray] = None):
        """Per GPU (sent intra, received intra, sent inter, received inter) assignments.

        ``flow_GG[s, d]``: assignments that source GPU s sends to GPU d (the diagonal stays
        local and costs nothing). ``gpu_ids``: the global index of each row, which decides the
        node (``id // gpus_per_node``); default ``0..G-1``.
        """
        flow_GG = np.asarray(flow_GG, dtype=np.float64)
        if flow_GG.ndim != 2 or flow_GG.shape[0] != flow_GG.shape[1]:
            raise ValueError(f"flow must be a square [G, G] matrix, got shape {flow_GG.shape}")
        G = flow_GG.shape[0]
        if gpu_ids is None:
            gpu_ids = np.arange(G)
        node_G = np.asarray(gpu_ids) // self.gpus_per_node
        same_GG = node_G[:, None] == node_G[None, :]
        off = flow_GG * (1.0 - np.eye(G))
        intra = np.where(same_GG, off, 0.0)
        inter = np.where(same_GG, 0.0, off)
        return intra.sum(1), intra.sum(0), inter.sum(1), inter.sum(0)

    def dispatch_time(self, flow_GG: np.ndarray, gpu_ids: Optional[np.ndarray] = None) -> np.ndarray:
        """Seconds of one all-to-all (dispatch, or combine: the same volumes reversed) per GPU."""
        s_in, r_in, s_out, r_out = self.link_volumes(flow_GG, gpu_ids)
        hw = self.hardware
        b = self.bytes_per_token
        t_intra = np.maximum(s_in, r_in) * b / (hw.intra_bw * hw.bw_efficiency)
        t_inter = np.maximum(s_out, r_out) * b / (hw.inter_bw * hw.bw_efficiency)
        return hw.latency_s + np.maximum(t_intra, t_inter)

    def attention_time(self, tokens_per_gpu: float) -> float:
        """Seconds of the (balanced) attention block of one layer on one GPU."""
        if not self.include_attention:
            return 0.0
        return (
            tokens_per_gpu
            * attention_flops_per_token(self.shape.d_model, self.shape.seq_len, self.passes)
            / self.hardware.rate
        )

    def layer_time(
        self,
        tokens_G: np.ndarray,
        flow_GG: np.ndarray,
        sched_s: float = 0.0,
        gpu_ids: Optional[np.ndarray] = None,
    ) -> dict:
        """Time of one MoE layer for one micro-batch on the GPUs of one (scheduling) group.

        Returns ``{"time", "dispatch_G", "compute_G", "combine_G"}`` (seconds, all passes).
        """
        tokens_G = np.asarray(tokens_G, dtype=np.float64)
        if tokens_G.ndim != 1 or tokens_G.shape[0] != np.shape(flow_GG)[0]:
            raise ValueError(
                f"tokens_G {tokens_G.shape} does not match flow_GG {np.shape(flow_GG)}"
            )
        sched_s = _non_negative("sched_s", sched_s)
        one = self.dispatch_time(flow_GG, gpu_ids)
        m = self.comm_multiplier
        compute_G = self.compute_time(tokens_G)
        dispatch_G = m * one  # forward dispatch (+ backward's dispatch of gradients)
        combine_G = m * one
        if self.sync == "gpu":
            first = np.maximum(sched_s, one) if self.overlap else sched_s + one
            total_G = first + (m - 1) * one + compute_G + combine_G
            t = float(total_G.max())
        else:
            first = max(sched_s, float(one.max())) if self.overlap else sched_s + float(one.max())
            t = first + (m - 1) * float(one.max()) + float(compute_G.max()) + float(combine_G.max())
        return {"time": t, "dispatch_G": dispatch_G, "compute_G": compute_G, "combine_G": combine_G}

    def ideal_layer_time(self, loads_RE: np.ndarray, slots_per_gpu: int, num_gpus_total: int) -> float:
        """A lower bound on the layer time of every system (the "ideal" system).

        Perfectly balanced compute (every GPU computes the mean), no scheduling cost, and for
        each source GPU the least it must send: all its assignments except those of the
        ``slots_per_gpu`` experts it could host (its heaviest), over both links at once.
        ``loads_RE``: one row per GPU of the whole cluster (every GPU is a source).
        """
        loads_RE = np.asarray(loads_RE, dtype=np.float64)
        G, E = loads_RE.shape
        mean_tokens = loads_RE.sum() / G
        compute = float(self.compute_time(np.array([mean_tokens]))[0])
        must_send_S = min_sends(loads_RE, slots_per_gpu)
        hw = self.hardware
        bw = 0.0
        if self.gpus_per_node > 1 and num_gpus_total > 1:
            bw += hw.intra_bw * hw.bw_efficiency
        if num_gpus_total > self.gpus_per_node:
            bw += hw.inter_bw * hw.bw_efficiency
        comm = hw.latency_s + (must_send_S.mean() * self.bytes_per_token / bw if bw > 0 else 0.0)
        return compute + 2 * self.comm_multiplier * comm


def min_sends(loads_RE: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """The fewest assignments each source must send away: all of its assignments except
    those of the ``slots_per_gpu`` experts its own GPU could host (its heaviest)."""
    loads_RE = np.asarray(loads_RE, dtype=np.float64)
    E = loads_RE.shape[1]
    slots = min(int(slots_per_gpu), E)
    if slots >= E:
        return np.zeros(loads_RE.shape[0])
    if slots <= 0:
        return loads_RE.sum(1)
    top = -np.partition(-loads_RE, slots - 1, axis=1)[:, :slots]
    return loads_RE.sum(1) - top.sum(1)


def calibrate(
    tokens: Sequence[float],
    seconds: Sequence[float],
    flops_per_token: float,
    fit_overhead: bool = True,
) -> tuple[float, float]:
    """Fit the sustained rate from measured (tokens, seconds) pairs of expert computation.

    Least squares on ``seconds = c0 + tokens * flops_per_token / rate`` (``c0 = 0`` when
    ``fit_overhead`` is False, or when the fitted intercept would be negative). Works for any
    device: pairs measured on a CPU give a CPU rate, on a GPU a GPU rate.
    Returns ``(rate in FLOP/s, c0 in seconds)``.
    """
    t = np.asarray(tokens, dtype=np.float64)
    s = np.asarray(seconds, dtype=np.float64)
    if t.ndim != 1 or s.ndim != 1 or t.shape != s.shape:
        raise ValueError(f"tokens and seconds must be 1-D of one length, got {t.shape} and {s.shape}")
    if t.size < (2 if fit_overhead else 1):
        raise ValueError(f"need at least {2 if fit_overhead else 1} pairs, got {t.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))) or np.any(t < 0) or np.any(s < 0):
        raise ValueError("tokens and seconds must be finite and non-negative")
    flops_per_token = _positive("flops_per_token", flops_per_token)
    x = t * flops_per_token
    c0 = 0.0
    if fit_overhead and np.ptp(x) > 0:
        slope, c0 = np.polyfit(x, s, 1)
        if c0 < 0:
            c0 = 0.0
    if c0 == 0.0:
        denom = float(x @ x)
        if denom <= 0:
            raise ValueError("tokens are all zero: nothing to fit")
        slope = float(x @ s) / denom
    if slope <= 0:
        raise ValueError(f"the fitted time per FLOP is not positive ({slope!r}): check the pairs")
    return 1.0 / float(slope), float(c0)
