"""Baselines the H3Fusion MoE is compared against, all built from the same experts: weight merges
(``merges``), ensembles (``ensembles``) and the trained multitask-sft / authors'-code systems (``trained``)."""

from h3fusion.baselines.merges import METHODS, dare, linear, merge_experts, svd_lora, task_arithmetic, ties

__all__ = ["METHODS", "dare", "linear", "merge_experts", "svd_lora", "task_arithmetic", "ties"]
