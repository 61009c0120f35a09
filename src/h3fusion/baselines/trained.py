"""Baselines that need training, built from the same data and experts as H3Fusion.

    multitask-sft          one LoRA on FFN + attention of the base, trained on the same mixed
                           three-axis data for the same steps as the fusion stage: the plain
                           alternative to fusing (if H3Fusion does not beat it, the MoE adds nothing)
    h3fusion-authors-code  the authors' released code, reproduced with every compatibility switch
                           on: unscaled shared experts, a random frozen router, CrossEntropy on
                           probabilities as the gating loss, honest examples labelled harmless
"""

from __future__ import annotations

from pathlib import Path

from h3fusion.config import RunConfig
from h3fusion.runs import adapter_paths, expert_is_complete, multitask_dir, variant_dir

ATTENTION_AND_FFN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HELDOUT_PER_AXIS = 12


def train_multitask_sft(config: RunConfig, log=print) -> Path:
    from h3fusion.data import load_heldout_train, mixed_train
    from h3fusion.experts import train_lora_adapter

    out = multitask_dir(config)
    if expert_is_complete(out):
        log(f"[multitask-sft] complete at {out}, skipping")
        return out
    fusion = config.fusion
    heldout = [e for axis in config.experts for e in load_heldout_train(axis, config, HELDOUT_PER_AXIS)]
    return train_lora_adapter(
        config, "[multitask-sft]", out,
        examples=mixed_train(config, per_axis=fusion.examples_per_axis), heldout=heldout,
        target_modules=ATTENTION_AND_FFN, r=fusion.lora_r, alpha=fusion.lora_alpha, dropout=fusion.lora_dropout,
        train=fusion.train, meta={"baseline": "multitask-sft", "axes": list(config.experts)}, log=log,
    )


def authors_code_config(config: RunConfig) -> RunConfig:
    """The run's config with every switch that reproduces the released code, in its own run dir,
    reusing the run's experts."""
    return config.model_copy(update={
        "run_dir": str(variant_dir(config, "authors-code")),
        "moe": config.moe.model_copy(update={
            "router_init": "random", "adapters": {k: str(v) for k, v in adapter_paths(config).items()}}),
        "fusion": config.fusion.model_copy(update={"gate_loss": "authors_ce"}),
        "compat": config.compat.model_copy(update={
            "unscaled_shared_experts": True, "frozen_random_router": True, "honest_labelled_harmless": True}),
    })


def run_authors_code(config: RunConfig, log=print) -> Path:
    """Build and fuse the authors'-code variant; returns its fused model directory."""
    from h3fusion.build import build_run
    from h3fusion.fusion import fuse_run

    variant = authors_code_config(config)
    build_run(variant, log=lambda msg: log(msg.replace("[build]", "[authors-code build]")))
    return fuse_run(variant, log=lambda msg: log(msg.replace("[fuse]", "[authors-code fuse]")))
