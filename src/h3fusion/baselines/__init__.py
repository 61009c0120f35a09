"""Baselines the H3Fusion MoE is compared against: weight merges of the same expert adapters."""

from h3fusion.baselines.merges import METHODS, dare, linear, merge_experts, svd_lora, task_arithmetic, ties

__all__ = ["METHODS", "dare", "linear", "merge_experts", "svd_lora", "task_arithmetic", "ties"]
