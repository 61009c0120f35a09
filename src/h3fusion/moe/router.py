"""The MoE router's decision: Mixtral's routing over N experts, per token or per sequence.

``p = softmax(W_r x + expert_bias)`` over all N experts (logits in the activation dtype, softmax in fp32
or wider), keep the top-k, renormalise the kept weights to sum 1. The layer mixes its experts' outputs
with those weights; the full softmax ``p`` is what the gating loss and the routing statistics read.

``token`` routing (the paper, Mixtral) decides for every token from its own hidden state. ``sequence``
routing decides once per sequence from the mean hidden state of its prompt's content tokens (each
layer from its own MLP inputs) and keeps that decision, experts and weights, for every later token,
through cached decoding too. ``sequence-shared`` takes that decision once per sequence for the whole
model: the first MoE layer decides from its MLP inputs and every later layer follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Routing(NamedTuple):
    """One forward's routing over T tokens."""

    probs: Tensor
    """[T, N] the full softmax (fp32 or wider, with grad)."""
    weights: Tensor
    """[T, k] the kept experts' renormalised weights, in the activation dtype."""
    indices: Tensor
    """[T, k] the kept experts."""


def route(x: Tensor, router_weight: Tensor, expert_bias: Tensor, top_k: int) -> Routing:
    """Mixtral routing of tokens ``x`` [T, H]: softmax over all N (fp32+), top-k, renormalise."""
    acc = torch.promote_types(x.dtype, torch.float32)
    logits = F.linear(x, router_weight.to(x.dtype))
    probs = torch.softmax(logits.to(acc) + expert_bias.to(acc), dim=-1)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return Routing(probs, top_w.to(x.dtype), top_i)


def expert_groups(weights: Tensor, indices: Tensor, num_experts: int) -> list[tuple[int, Tensor, Tensor]]:
    """(expert, token indices, routing weights) for every expert with routed tokens (one host sync)."""
    top_k = indices.shape[-1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens = order // top_k
    kept = weights.reshape(-1)[order]
    groups, start = [], 0
    for e, c in enumerate(counts):
        if c:
            groups.append((e, tokens[start : start + c], kept[start : start + c]))
        start += c
    return groups


ROUTING_MODES = ("token", "sequence", "sequence-shared")


@dataclass
class RoutingInputs:
    """What the model tells its MoE layers about the current forward's tokens [B, T]; one object shared by
    every layer of a model, set before each forward (``H3FusionForCausalLM.set_routing_inputs``)."""

    content_mask: Tensor | None = None
    """The tokens that are content: not the prompt template, not padding (the gating loss and the routing
    statistics count these)."""
    decision_mask: Tensor | None = None
    """Sequence routing: the tokens each sequence's decision is pooled from (its prompt's content)."""
    continuing: bool = False
    """A cached decoding step: sequence routing keeps the decision it took on the prompt."""
    shared_decision: Routing | None = None
    """``sequence-shared`` routing: the decision the deciding (first) layer took in this forward, which the
    other layers follow; the model clears it before each forward."""


def pooled_rows(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """[B, H]: each row's mean hidden state over its ``mask`` tokens (all tokens without a mask), in fp32+."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if mask is None:
        return hidden.to(acc).mean(dim=1)
    weights = mask.to(acc).unsqueeze(-1)  # [B, T, 1]
    return (hidden.to(acc) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def route_sequences(hidden: Tensor, mask: Tensor | None, router_weight: Tensor, expert_bias: Tensor,
                    top_k: int) -> Routing:
    """One routing decision per row of ``hidden`` [B, T, H], from its pooled ``mask`` tokens: Routing over B rows."""
    return route(pooled_rows(hidden, mask).to(hidden.dtype), router_weight, expert_bias, top_k)


def per_token(decision: Routing, tokens: int) -> Routing:
    """A per-row decision [B, ...] repeated for each of the row's ``tokens`` tokens: Routing over B·T tokens."""
    if tokens == 1:  # a decoding step: the rows are the tokens
        return decision
    def spread(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(t.shape[0], tokens, t.shape[-1]).reshape(-1, t.shape[-1])

    return Routing(spread(decision.probs), spread(decision.weights), spread(decision.indices))
