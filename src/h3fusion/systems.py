"""The systems a run compares, by name, and how to load each one for generation.

    base               the base model
    expert-<axis>      the base with that axis's LoRA expert merged in
    h3fusion           the fused MoE (<run>/fused)
    h3fusion-unfused   the MoE before fusion training (<run>/moe): exact experts, initialised router; a
                       diagnostic (baselines.unfused)
    merge-<method>     the base plus a weight merge of the expert deltas (linear, task-arithmetic, ties, dare)
    ensemble-logits    the experts' mean next-token distribution (baselines.ensembles)
    ensemble-rerank    each prompt's best-judged expert answer (assembled by `evaluate`, nothing to load)
    oracle-routed      each axis's prompts answered by that axis's expert: the routing ceiling, a diagnostic
                       (assembled by `evaluate`, nothing to load; baselines.oracle)
    multitask-sft      the base with one multi-task LoRA merged in (baselines.trained)
    h3fusion-authors-code  the fused MoE as the authors' released code builds and trains it

One system is resident at a time: callers load, use and drop it.
"""

from __future__ import annotations

from pathlib import Path

from h3fusion.baselines.oracle import ORACLE
from h3fusion.baselines.unfused import UNFUSED
from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError
from h3fusion.models import is_adapter_dir, load_model
from h3fusion.runs import (
    adapter_paths,
    assembled_file,
    expert_is_complete,
    fused_dir,
    fused_is_complete,
    generated_file,
    moe_dir,
    moe_is_built,
    multitask_dir,
)


def system_names(config: RunConfig) -> list[str]:
    baselines = config.baselines
    return ["base", *(f"expert-{axis}" for axis in config.experts), "h3fusion",
            *([UNFUSED] if baselines.unfused else []),
            *(f"merge-{method}" for method in baselines.merges),
            *(f"ensemble-{kind}" for kind in baselines.ensembles), ORACLE,
            *(["multitask-sft"] if baselines.multitask_sft else []),
            *(["h3fusion-authors-code"] if baselines.authors_code else [])]


def generated_systems(config: RunConfig) -> list[str]:
    """The systems that generate answers themselves (all but those assembled from the experts' answers)."""
    return [name for name in system_names(config) if name not in assembled_systems()]


def assembled_systems() -> tuple[str, ...]:
    """The systems `evaluate` assembles from the experts' answers (they have no model to load)."""
    from h3fusion.baselines.ensembles import RERANK

    return (RERANK, ORACLE)


def answers_file(config: RunConfig, system: str, axis: str) -> Path:
    """A system's answers on an axis: what `generate` wrote, or what `evaluate` assembled for it."""
    return (assembled_file if system in assembled_systems() else generated_file)(config, system, axis)


def system_source(config: RunConfig, name: str) -> Path | str:
    """Where a system's weights come from (for messages and provenance)."""
    if name == "base":
        return config.model.base
    if name.startswith("expert-") and name[7:] in config.experts:
        return adapter_paths(config)[name[7:]]
    if name == "h3fusion":
        return fused_dir(config)
    if name == UNFUSED and config.baselines.unfused:
        return moe_dir(config)
    if name.startswith("merge-") and name[6:] in config.baselines.merges:
        return adapter_paths(config)
    if name.startswith("ensemble-") and name[9:] in config.baselines.ensembles or name == ORACLE:
        return adapter_paths(config)
    if name == "multitask-sft" and config.baselines.multitask_sft:
        return multitask_dir(config)
    if name == "h3fusion-authors-code" and config.baselines.authors_code:
        from h3fusion.baselines.trained import authors_code_config

        return fused_dir(authors_code_config(config))
    raise H3FusionError(f"unknown system '{name}'; this run has {', '.join(system_names(config))}")


def load_system(config: RunConfig, name: str):
    """(model, tokenizer) of a named system, ready for generation."""
    source = system_source(config, name)
    if name in assembled_systems():
        raise H3FusionError(f"system {name} is assembled from the experts' answers at evaluation; it has no model")
    model_kwargs = dict(trust_remote_code=config.model.trust_remote_code, cache_dir=config.model.cache_dir)
    if name == "base":
        return load_model(config.model.base, config.model.dtype, **model_kwargs)
    if name.startswith("merge-"):  # merged in memory (seconds): nothing to store but the answers
        from h3fusion.baselines import merge_experts

        method = name[6:]
        base, tokenizer = load_model(config.model.base, config.model.dtype, **model_kwargs)
        merged = merge_experts(base, source, method, tokenizer=tokenizer,
                               **config.baselines.merge_params.get(method, {}))
        return merged.eval(), tokenizer
    if name.startswith("ensemble-"):
        from h3fusion.baselines.ensembles import load_logit_ensemble

        return load_logit_ensemble(config)
    if name.startswith("expert-") or name == "multitask-sft":
        ours = Path(source).resolve().is_relative_to(config.run_path.resolve())  # else a given moe.adapters dir
        if not (expert_is_complete(Path(source)) if ours else is_adapter_dir(source)):
            raise H3FusionError(f"system {name}: no adapter at {source}; run `h3fusion align` (experts) or "
                                "`h3fusion run --stage baselines` first")
        # the run's base, not the path the adapter recorded: the run may have moved since
        return load_model(str(source), config.model.dtype, base=config.model.base, **model_kwargs)
    if name == UNFUSED:
        if not moe_is_built(Path(source)):
            raise H3FusionError(f"system {name}: no built MoE at {source}; run `h3fusion build` first")
    elif not fused_is_complete(Path(source)):
        raise H3FusionError(f"system {name}: no finished model at {source}; run `h3fusion fuse` first")
    model, tokenizer = load_model(str(source), config.model.dtype)
    # the runtime dials come from the config, so they can change without re-fusing
    model.set_expert_bias(config.moe.expert_bias)
    model.set_top_k(config.moe.top_k)
    return model, tokenizer
