"""The MoE language model: config, transformer, MoE layer and grouped experts."""

from moebal.model.config import ModelConfig
from moebal.model.experts import GroupedExperts, grouped_matmul, grouped_mm_works
from moebal.model.model import (
    Attention,
    Block,
    MoELayer,
    MoEModel,
    ModelOutput,
    RMSNorm,
    SwiGLU,
)

__all__ = [
    "Attention",
    "Block",
    "GroupedExperts",
    "MoELayer",
    "MoEModel",
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "SwiGLU",
    "grouped_matmul",
    "grouped_mm_works",
]
