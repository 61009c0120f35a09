"""The fused model's card (``<run>/fused/README.md``): how it was made and its results, ready for ``push_to_hub``."""

from __future__ import annotations

from pathlib import Path

from h3fusion import runs
from h3fusion.config import RunConfig
from h3fusion.report.tables import FUSED, judges_line, results_table


def _hub_id(base: str) -> str | None:
    """The hub id a model card can name as base_model (the embedded default is SmolLM2-135M-Instruct)."""
    if base == "smollm2-135m":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if "/" in base and not Path(base).exists() and not base.startswith((".", "/", "~")):
        return base
    return None


def write_model_card(config: RunConfig, results: dict) -> Path | None:
    """``<run>/fused/README.md``: how the model was made and its results, ready for ``push_to_hub``."""
    from h3fusion.io import write_text

    fused = runs.fused_dir(config)
    if not runs.fused_is_complete(fused):  # no finished fused model (its marker is written last)
        return None
    systems = results["systems"]
    shown = {k: v for k, v in systems.items() if k in (FUSED, "base") or k.startswith("expert-")}
    f = config.fusion
    text = "\n".join([
        "---",
        "library_name: transformers",
        f"base_model: {_hub_id(config.model.base)}" if _hub_id(config.model.base) else "# base_model: a local model",
        "tags: [h3fusion, mixture-of-experts, alignment, lora]",
        "---",
        "",
        f"# {config.name}: an H3Fusion model",
        "",
        f"A mixture-of-experts fusion of {len(config.experts)} separately aligned LoRA experts "
        f"({', '.join(config.experts)}) on `{config.model.base}`, made with "
        "h3fusion (the H3Fusion method, EACL 2026). Each decoder layer's MLP holds the base FFN once plus "
        f"one low-rank delta per expert (storage `{config.moe.storage}`) and a top-{config.moe.top_k} router "
        f"(initialised `{config.moe.router_init}`).",
        "",
        "## How it was made",
        "",
        f"- experts: LoRA r={config.lora.r}, alpha={config.lora.alpha} on {', '.join(config.lora.target_modules)}; "
        f"{config.train.epochs} epoch(s), lr {config.train.lr}",
        f"- fusion: loss = LM + {f.gate_lambda}·L_gate ({f.gate_loss}) + Σ γ_k R_k (γ default {f.gamma_default}); "
        f"{f.examples_per_axis} examples per axis; attention LoRA {f.attention_lora}; router trained {f.train_router}",
        f"- seed {config.seed}; the full config is `config.yaml` beside this card",
        "",
        "## Results",
        "",
        *results_table({"systems": shown}),
        "",
        judges_line(results),
        "",
        "## Use",
        "",
        "```python",
        "import h3fusion  # registers the h3fusion model type with the Auto classes",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        "model.set_expert_bias({'harmless': 1.0})  # optional: lean on an expert at inference",
        "```",
        "",
        "`h3fusion export --format mixtral` converts it to a stock Mixtral checkpoint (same logits).",
        "",
        "## Limitations",
        "",
        "Scores come from the judges named above; the offline judges are stand-ins for the paper's GPT-4, "
        "beaver-dam-7b and GPT-3 judges, with their measured agreement stated. A small model's alignment is shallow.",
        "",
    ])
    out = runs.model_card_file(config)
    write_text(out, text)
    return out
