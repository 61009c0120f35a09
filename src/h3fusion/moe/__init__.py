"""The H3Fusion mixture of LoRA experts, as a library: the MoE layer (router + compact or dense expert
store), building it from adapters, router initialisation, the transformers model classes, routing
diagnostics and the Mixtral export. Nothing here reads run configs or run directories."""

from h3fusion.moe.compact import CompactMoEMLP
from h3fusion.moe.dense import DenseMoEMLP
from h3fusion.moe.layer import MoEMLP
from h3fusion.moe.lowrank import PROJECTIONS, LowRankDelta

__all__ = ["PROJECTIONS", "CompactMoEMLP", "DenseMoEMLP", "LowRankDelta", "MoEMLP"]
