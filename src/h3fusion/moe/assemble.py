"""Assembling the H3Fusion MoE from a base model and N expert adapters (the library behind `h3fusion build`).

Expert k of every layer = base FFN + (alpha/r)·B_k·A_k of adapter k, read straight from the PEFT
adapter files (``h3fusion.adapters``). Adapters that cannot belong together (another base, other target
modules, the same adapter twice) are refused with one clear line, before any work is done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from h3fusion.adapters import ExpertAdapter, check_adapters, read_adapter
from h3fusion.errors import H3FusionError
from h3fusion.models import decoder_layers, load_model
from h3fusion.moe.lowrank import PROJECTIONS, LowRankDelta
from h3fusion.moe.modeling import H3FusionConfig, H3FusionForCausalLM
from h3fusion.moe.router import ROUTING_MODES
from h3fusion.moe.router_init import ROUTER_INITS, init_routers


def build_moe(
    base,
    experts: Mapping[str, str | Path],
    top_k: int = 2,
    storage: str = "compact",
    router_init: str = "random",
    *,
    prototype_prompts: Mapping[str, Sequence[str]] | None = None,
    expert_bias: Mapping[str, float] | None = None,
    unscaled_shared_experts: bool = False,
    dtype=None,
    seed: int = 0,
    tokenizer=None,
    routing: str = "token",
    template_ids: Sequence[Sequence[int]] = (),
) -> H3FusionForCausalLM:
    """Build the H3Fusion MoE from a base model spec (or loaded model) and named expert adapters.

    ``unscaled_shared_experts`` reproduces the authors' released build (compatibility only): every
    expert becomes base + Σ_k B_k A_k, without alpha/r, so all experts are identical.
    ``base`` is any spec ``load_model`` takes, or an already loaded model (then pass ``tokenizer``
    for router_init=prototype/fitted). A loaded model is modified in place (its MLPs become MoE layers).
    ``routing``: ``token``, ``sequence`` or ``sequence-shared`` (``h3fusion.moe.router``); ``template_ids``: the prompt
    format's fixed pieces as token ids (``h3fusion.moe.content``), what the model counts as template.
    """
    if storage not in ("compact", "dense"):
        raise H3FusionError(f"storage '{storage}' is unknown; choose compact or dense")
    if routing not in ROUTING_MODES:
        raise H3FusionError(f"routing '{routing}' is unknown; choose {', '.join(ROUTING_MODES)}")
    if router_init != "random" and router_init not in ROUTER_INITS:
        raise H3FusionError(f"router_init '{router_init}' is unknown; choose random, prototype or fitted")
    if isinstance(base, str):
        base_model, tokenizer = load_model(base, dtype)
    else:
        base_model = base
    names = list(experts)
    adapters = [read_adapter(name, path) for name, path in experts.items()]
    check_adapters(adapters, base_model, tokenizer)
    if not 1 <= top_k <= len(adapters):
        raise H3FusionError(f"top_k={top_k} is impossible with {len(adapters)} experts; choose 1..{len(adapters)}")

    if router_init != "random":
        if tokenizer is None or not prototype_prompts:
            raise H3FusionError(f"router_init={router_init} needs a tokenizer and prompts for every expert")
        missing = [n for n in names if not prototype_prompts.get(n)]
        if missing:
            raise H3FusionError(f"router_init={router_init}: no prompts for expert(s) {missing}")

    deltas = []
    for i in range(len(decoder_layers(base_model))):
        layer = []
        for adapter in adapters:
            if unscaled_shared_experts:  # every expert = base + Σ_k B_k A_k (concatenated along rank)
                layer.append(_summed_unscaled(adapters, i))
            else:
                layer.append({p: d for p in PROJECTIONS if (d := adapter.delta(i, p)) is not None})
        deltas.append(layer)
    bias = [float((expert_bias or {}).get(n, 0.0)) for n in names]
    config = H3FusionConfig(
        base_config=base_model.config.to_dict(),
        expert_names=names,
        num_experts_per_tok=top_k,
        storage=storage,
        expert_bias=bias,
        routing=routing,
        template_ids=template_ids,
    )
    torch.manual_seed(seed)  # the random router init is reproducible
    model = H3FusionForCausalLM(config, base_model=base_model, expert_deltas=deltas).eval()
    if router_init != "random":  # fitted on the MoE itself, so each layer sees the routing below it
        init_routers(model, tokenizer, [prototype_prompts[n] for n in names], router_init)
    return model


def _summed_unscaled(adapters: Sequence[ExpertAdapter], layer: int) -> dict[str, LowRankDelta]:
    summed = {}
    for proj in PROJECTIONS:
        parts = [d for a in adapters if (d := a.delta(layer, proj, scaled=False)) is not None]
        if parts:
            summed[proj] = LowRankDelta(
                torch.cat([d.A for d in parts], 0), torch.cat([d.B for d in parts], 1), 1.0
            )
    return summed
