"""Stage 2 — `h3fusion build`: the run's MoE, built from the base model and the run's expert adapters.

Reads the run config and ``<run>/experts/<axis>/`` (or ``moe.adapters``), and for a router_init other
than random ``moe.prototype_prompts`` training prompts of each axis (a stratified, de-duplicated sample:
``h3fusion.data.sampling``); writes ``<run>/moe/``
(the model, its tokenizer, ``config.yaml`` and ``h3fusion_build.json``, the completion marker). The
MoE itself is assembled by the library, ``h3fusion.moe.assemble.build_moe``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from h3fusion.models import load_model, weights_bytes
from h3fusion.moe.assemble import build_moe
from h3fusion.moe.content import template_token_ids
from h3fusion.runs import (
    BUILD_MARKER,
    BUILD_SETTINGS,
    adapter_paths,
    moe_dir,
    moe_is_built,
    record_settings,
    refuse_other_settings,
)


def prompt_template_ids(config, tokenizer) -> list[list[int]]:
    """The run's prompt format's fixed pieces as token ids: what the MoE counts as template, not content."""
    from h3fusion.data.prompts import template_pieces

    return template_token_ids(tokenizer, template_pieces(config.data.prompt_format, tokenizer))


def build_run(config, log=print) -> Path:
    """Stage 2 for a run config: write the MoE to <run>/moe/ (skipped when already built)."""
    from h3fusion.data import format_prompt, load_train
    from h3fusion.data.sampling import stratified_sample
    from h3fusion.io import stage_writes, write_json

    out = moe_dir(config)
    if moe_is_built(out):
        refuse_other_settings(out, config, BUILD_SETTINGS)
        log(f"[build] complete at {out}, skipping")
        return out
    paths = adapter_paths(config)
    base_model, tokenizer = load_model(
        config.model.base,
        config.model.dtype,
        trust_remote_code=config.model.trust_remote_code,
        cache_dir=config.model.cache_dir,
    )
    prompts = None
    if config.moe.router_init != "random":
        prompts = {
            axis: [
                format_prompt(e.instruction, e.input, config.data.prompt_format, tokenizer)
                for e in stratified_sample(load_train(axis, config), config.moe.prototype_prompts, config.seed)
            ]
            for axis in config.experts
        }
    model = build_moe(
        base_model,
        paths,
        config.moe.top_k,
        config.moe.storage,
        config.moe.router_init,
        prototype_prompts=prompts,
        expert_bias=config.moe.expert_bias,
        unscaled_shared_experts=config.compat.unscaled_shared_experts,
        seed=config.seed,
        tokenizer=tokenizer,
        routing=config.moe.routing,
        template_ids=prompt_template_ids(config, tokenizer),
    )
    # a refused write (full disk ...) is one line, and the unfinished moe/ is removed: no config files without weights
    with stage_writes(out, "building the MoE", need=weights_bytes(model), cleanup=lambda: shutil.rmtree(out)):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record_settings(config, out)  # what it was built with (a later call with other settings is refused)
        write_json(
            out / BUILD_MARKER,
            {  # written last: marks the build complete
                "base": config.model.base,
                "experts": {name: str(path) for name, path in paths.items()},
                "top_k": config.moe.top_k,
                "storage": config.moe.storage,
                "router_init": config.moe.router_init,
                "routing": config.moe.routing,
                "unscaled_shared_experts": config.compat.unscaled_shared_experts,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
        )
    log(f"[build] {len(paths)} experts x {len(model.moe_layers())} layers ({config.moe.storage}) -> {out}")
    return out
