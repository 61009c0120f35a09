"""The H3Fusion mixture of LoRA experts (one MoE MLP per decoder layer)."""

from h3fusion.moe.layer import PROJECTIONS, LowRankDelta, MoEMLP

__all__ = ["PROJECTIONS", "LowRankDelta", "MoEMLP"]
