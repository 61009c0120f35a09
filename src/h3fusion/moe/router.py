"""The MoE router's decision: Mixtral's routing over N experts.

``p = softmax(W_r x + expert_bias)`` over all N experts (logits in the activation dtype, softmax in fp32
or wider), keep the top-k, renormalise the kept weights to sum 1. The layer mixes its experts' outputs
with those weights; the full softmax ``p`` is what the gating loss and the routing statistics read.
"""

from __future__ import annotations

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

