"""Routing diagnostics: where each axis's prompts go, per layer and per sample.

They count a prompt's content tokens only, never its template (``H3FusionForCausalLM.set_routing_inputs``);
for a model that knows no template, every real token. For any MoE model and prompts grouped by axis:
* ``layer_expert_mean`` [layers x experts]: mean router probability over the axis's content tokens
  (the paper's heat-map);
* ``sample_means`` [samples x experts]: each prompt's routing averaged over its tokens and layers
  (the paper's "activation intensity" histograms, which show how gamma_k shifts expert k's share);
* ``accuracy``: share of prompts whose mean routing peaks on the axis's own expert;
* ``gate_loss``: the gating loss on these prompts, -log of their mean routing mass on that expert.

Their pictures are drawn on the report side (``h3fusion.routing_plots``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from h3fusion.moe.modeling import moe_layers
from h3fusion.tokens import prompt_batch


def content_mask(model) -> torch.Tensor | None:
    """[B, T] bool: the content tokens of the model's latest forward (None before any)."""
    layers = moe_layers(model)
    return layers[0].routing_inputs.content_mask if layers else None


def mean_router_probs(model, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """p_bar [B, N]: each sequence's router probabilities averaged over its ``token_mask`` tokens (default:
    the content tokens of the latest forward) and all layers."""
    layers = moe_layers(model)
    token_mask = content_mask(model) if token_mask is None else token_mask
    batch, length = token_mask.shape
    mask = token_mask.to(torch.float32)
    total = 0
    for layer in layers:
        probs = layer.router_probs.view(batch, length, -1)  # [B, T, N]
        total = total + (probs * mask[..., None]).sum(dim=1)
    return total / (mask.sum(dim=1, keepdim=True) * len(layers))


@torch.no_grad()
def routing_stats(model, tokenizer, prompts: Mapping[str, Sequence[str]], batch_size: int = 8,
                  max_length: int = 256) -> dict:
    """Routing statistics per axis (see the module docstring); axes are matched to experts by name.

    Prompts are truncated to ``max_length`` tokens: routing is a per-token statistic, and on a CPU
    the forward passes over long prompts would dominate the cost.
    """
    names = list(model.config.expert_names)
    layers = moe_layers(model)
    was_training = model.training
    model.eval()
    stats = {}
    try:
        for axis, texts in prompts.items():
            layer_sums = torch.zeros(len(layers), len(names))
            tokens = 0.0
            samples = []
            for start in range(0, len(texts), batch_size):
                batch = prompt_batch(tokenizer, texts[start:start + batch_size], "right", max_length).to(model.device)
                model.decoder_forward(**batch)  # routing needs no LM head: skip the vocab-sized logits
                tokens_mask = content_mask(model)
                mask = tokens_mask.to(torch.float32)
                for i, layer in enumerate(layers):
                    probs = layer.router_probs.view(*mask.shape, -1).float()
                    layer_sums[i] += (probs * mask[..., None]).sum(dim=(0, 1)).cpu()
                tokens += float(mask.sum())
                samples.append(mean_router_probs(model, tokens_mask).float().cpu())
            sample_means = torch.cat(samples)
            target = names.index(axis) if axis in names else None
            stats[axis] = {
                "n": len(texts),
                "layer_expert_mean": (layer_sums / tokens).tolist(),
                "sample_means": sample_means.tolist(),
                "mean_probs": sample_means.mean(dim=0).tolist(),
                "accuracy": None if target is None else float((sample_means.argmax(dim=1) == target).float().mean()),
                # the fusion stage's gating loss on these prompts: -log of the mean mass on the axis's expert
                "gate_loss": None if target is None else float(-sample_means[:, target].clamp_min(1e-9).log().mean()),
            }
    finally:
        model.train(was_training)
    return {"experts": names, "axes": stats}


@torch.no_grad()
def answer_routing(model, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> torch.Tensor:
    """[layers x experts]: mean router probability over an answer's tokens, layer by layer.

    One teacher-forced pass over prompt + answer (through the decoder only, as ``routing_stats``):
    the answer's positions route exactly as they did while it was generated, current bias and top-k
    included (the probabilities are the softmax before top-k; sequence routing decides from the prompt).
    """
    layers = moe_layers(model)
    ids = torch.tensor([[*prompt_ids, *answer_ids]], device=model.device)
    was_training = model.training
    model.eval()
    try:
        model.decoder_forward(ids, prompt_length=len(prompt_ids))
    finally:
        model.train(was_training)
    start = len(prompt_ids)
    return torch.stack([layer.router_probs.view(ids.shape[1], -1)[start:].float().mean(dim=0).cpu()
                        for layer in layers])


def layer_bands(per_layer: torch.Tensor, bands: int = 3) -> list[tuple[str, list[float]]]:
    """(label, mean over its layers per expert) of the early / middle / late thirds of the layers."""
    names = {1: ["all"], 2: ["early", "late"], 3: ["early", "middle", "late"]}[min(bands, len(per_layer), 3)]
    out, first = [], 0
    for name, rows in zip(names, torch.tensor_split(per_layer, len(names)), strict=True):
        out.append((f"{name} (layers {first}-{first + len(rows) - 1})", rows.mean(dim=0).tolist()))
        first += len(rows)
    return out
