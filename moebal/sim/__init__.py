"""Cluster simulator: replay routing traces on a modelled cluster under each balancing system.

- ``cost``: the cost model (expert compute, all-to-all, layer time, ideal bound, calibration)
- ``trace``: routing traces (load, save, generate) and their micro-batches
- ``systems``: plain EP, Megatron's standard EP x EDP, EPLB, LP scheduling, token flows
- ``simulate``: run the systems on the same micro-batches
- ``validate``: compare predictions with measured per-rank times of a real run
"""

from moebal.sim.cost import HARDWARE, CostModel, Hardware, ModelShape, calibrate
from moebal.sim.simulate import SimResult, simulate
from moebal.sim.systems import SYSTEMS, Cluster
from moebal.sim.trace import Trace, generate_trace, load_trace, microbatches, save_trace

__all__ = [
    "HARDWARE",
    "CostModel",
    "Hardware",
    "ModelShape",
    "calibrate",
    "SimResult",
    "simulate",
    "SYSTEMS",
    "Cluster",
    "Trace",
    "generate_trace",
    "load_trace",
    "microbatches",
    "save_trace",
]
