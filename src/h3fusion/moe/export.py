"""`h3fusion export --format mixtral`: the fused model as a standard Mixtral checkpoint.

H3Fusion's routing (softmax over all experts, top-k, renormalise) is exactly Mixtral's block, so a
Llama/Mistral-based fused model becomes a ``MixtralForCausalLM`` that vLLM, llama.cpp and TGI serve
as is: each expert's merged weights (base + its delta) are written out, the router copied.
Attention LoRA must already be merged (``h3fusion fuse`` writes merged models). A sequence-routed model
is refused: Mixtral has no way to keep one prompt-level decision for a whole answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from h3fusion.errors import H3FusionError
from h3fusion.moe.configuration import H3FusionConfig
from h3fusion.moe.modeling import H3FusionForCausalLM

MIXTRAL_FAMILIES = ("llama", "mistral")
# config fields Mixtral shares with Llama/Mistral; everything else takes Mixtral-specific values below
_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "rope_parameters")


def mixtral_config(config: H3FusionConfig):
    """The ``MixtralConfig`` an h3fusion model's config exports to, or one H3FusionError saying why it cannot: read
    from the config alone, so ``h3fusion export`` refuses before it loads any weights."""
    from transformers import MixtralConfig

    if config.routing != "token":
        raise H3FusionError(f"cannot export a sequence-routed model as Mixtral (moe.routing: {config.routing}; "
                            "Mixtral routes every token on its own); keep the h3fusion format, or build with "
                            "moe.routing: token")
    base = config.make_base_config()
    family = base.model_type
    if family not in MIXTRAL_FAMILIES:
        raise H3FusionError(f"cannot export a {family}-based model as Mixtral (only {', '.join(MIXTRAL_FAMILIES)} "
                            "bases share Mixtral's attention); keep the h3fusion format for this model")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(base, flag, False):
            raise H3FusionError(f"cannot export as Mixtral: the base has {flag}=True, which Mixtral cannot hold")
    if any(abs(b) > 0 for b in config.expert_bias):
        raise H3FusionError("cannot export as Mixtral with a non-zero expert bias (Mixtral routers have no bias); "
                            "set_expert_bias to zeros first")
    fields = {k: getattr(base, k) for k in _SHARED_FIELDS if getattr(base, k, None) is not None}
    return MixtralConfig(
        **fields,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        sliding_window=None,  # Mixtral's attention must not window where the base did not
        router_jitter_noise=0.0,
        output_router_logits=False,
        attention_dropout=0.0,
        architectures=["MixtralForCausalLM"],
    )


def check_exportable(model_dir: str | Path) -> None:
    """Refuse, from ``model_dir``'s saved config alone, an h3fusion model that cannot become a Mixtral (another
    base family, sequence routing, an expert bias); anything else (no config, another model type, a config that
    does not parse) is left to loading, which reports it."""
    saved = Path(model_dir) / "config.json"
    try:
        fields = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(fields, dict) or fields.get("model_type") != H3FusionConfig.model_type:
        return
    try:
        config = H3FusionConfig.from_dict(fields)  # the fields already read: no second read of the file
    except Exception:  # noqa: BLE001 - a config loading cannot read either: loading reports it in its own words
        return
    mixtral_config(config)


@torch.no_grad()
def export_mixtral(model: H3FusionForCausalLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a Mixtral checkpoint (safetensors) to ``out_dir``; returns the directory."""
    from transformers import MixtralForCausalLM

    if any("lora_" in name for name, _ in model.named_parameters()):
        raise H3FusionError("the model still carries unmerged LoRA layers; export a model saved by `h3fusion fuse`")
    config = mixtral_config(model.config)
    dtype = dtype or model.dtype
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(config)
    state = {}
    source = model.model.state_dict()
    for key, value in source.items():
        if ".mlp." not in key:
            state[key] = value.to(dtype)
    for i, layer in enumerate(model.moe_layers()):
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = layer.router.weight.to(dtype)
        n = layer.num_experts
        state[prefix + "experts.gate_up_proj"] = torch.stack([
            torch.cat([layer.expert_weight(k, "gate_proj", dtype), layer.expert_weight(k, "up_proj", dtype)])
            for k in range(n)
        ])
        state[prefix + "experts.down_proj"] = torch.stack([layer.expert_weight(k, "down_proj", dtype) for k in range(n)])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = mixtral.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise H3FusionError(f"Mixtral export does not fit this model: missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}")
    if config.tie_word_embeddings:
        mixtral.tie_weights()
    mixtral.generation_config = model.generation_config
    out_dir = Path(out_dir)
    mixtral.save_pretrained(out_dir)
    return out_dir
