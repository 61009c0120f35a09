"""Ensembles of the same three experts, compared against H3Fusion.

    ensemble-logits  at every decoding step, the mean of the experts' next-token distributions,
                     computed in one batched forward over the shared base (PEFT mixed-adapter
                     batches; ``decoding.decode_batch``). Cost: N forwards' worth of compute per token.
    ensemble-rerank  one answer per expert (their own generations, reused), keeping the answer the
                     axis's offline judge scores best (LLM-Blender-style). Cost: N generations plus
                     judge calls. It borrows the very judge that scores it, so its numbers are an
                     upper bound for reranking, not a deployable system; the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

from h3fusion.axes import axis_spec
from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError

LOGITS = "ensemble-logits"
RERANK = "ensemble-rerank"


def load_logit_ensemble(config: RunConfig):
    """(PEFT model holding every expert adapter, tokenizer); ``model.ensemble_adapters`` names them."""
    from peft import PeftModel

    from h3fusion.adapters import check_adapters, read_adapter
    from h3fusion.models import load_model
    from h3fusion.runs import adapter_paths

    paths = adapter_paths(config)
    # the same reader and checks as the MoE build: a missing, corrupt or foreign adapter is one line
    adapters = [read_adapter(axis, path) for axis, path in paths.items()]
    base, tokenizer = load_model(config.model.base, config.model.dtype,
                                 trust_remote_code=config.model.trust_remote_code, cache_dir=config.model.cache_dir)
    check_adapters(adapters, base, tokenizer)
    axes = list(paths)
    model = PeftModel.from_pretrained(base, str(paths[axes[0]]), adapter_name=axes[0])
    for axis in axes[1:]:
        model.load_adapter(str(paths[axis]), adapter_name=axis)
    model.eval()
    model.ensemble_adapters = axes
    return model, tokenizer


def rerank_score(axis: str, judged: dict) -> float:
    """How good the axis's judge finds one answer (higher is better; ``AxisSpec.rerank_score``)."""
    return axis_spec(axis).rerank_score(judged)


def rerank(axis: str, judged_by_expert: Mapping[str, list[dict]]) -> list[dict]:
    """Per prompt, the best-scored expert answer (first expert wins ties), with ``chosen_expert``."""
    experts = list(judged_by_expert)
    lengths = {len(rows) for rows in judged_by_expert.values()}
    if len(lengths) != 1:
        raise H3FusionError(f"{RERANK} / {axis}: the experts answered different numbers of prompts "
                            f"({sorted(lengths)}); finish their generations first")
    picked = []
    for rows in zip(*judged_by_expert.values(), strict=True):
        best = max(range(len(rows)), key=lambda k: (rerank_score(axis, rows[k]), -k))
        picked.append({**rows[best], "chosen_expert": experts[best]})
    return picked
