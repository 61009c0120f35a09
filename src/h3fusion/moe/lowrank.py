"""Low-rank pieces shared by the MoE layer: one LoRA pair, the factors of all experts on one projection,
and the bool-mask dropout the fusion-stage LoRA applies to its inputs while training.

The fusion LoRA's inputs get dropout inside the MoE layer (and inside ``routed_swiglu``); the mask is
drawn as ``rand < 1 - p`` and kept as bool (one byte per element instead of ``nn.Dropout``'s four-byte
float noise, ~1.4x faster on CPU), with ``nn.Dropout``'s distribution and inverted scaling. The module
swap that gives the attention LoRA the same masks is the fusion stage's (``h3fusion.fusion_dropout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LowRankDelta:
    """One LoRA pair: ``delta_W = scale * B @ A``."""

    A: Tensor
    """[r, in_features]"""
    B: Tensor
    """[out_features, r]"""
    scale: float
    """alpha / r (the factor the authors' code drops)."""


class LowRank(NamedTuple):
    """One projection's factors for all experts: A [N, R, in], B [N, out, R] (scales folded into B);
    the last ``n_fusion`` ranks are the fusion LoRA (their input gets dropout while training)."""

    A: Tensor
    B: Tensor
    n_fusion: int


def dropout_mask(like: Tensor, p: float) -> Tensor | None:
    """A bool keep-mask shaped like ``like``, each element kept with probability 1 - p (None when p == 0)."""
    if p <= 0:
        return None
    return torch.rand(like.shape, device=like.device) < 1.0 - p


def dropped(x: Tensor, keep_mask: Tensor | None, p: float) -> Tensor:
    """Inverted dropout with a given mask (identity without one), scaled as ``nn.Dropout`` scales it."""
    return x if keep_mask is None else x * keep_mask / (1.0 - p)


def rank_acts(x: Tensor, a: Tensor, n_fusion: int, op, x_dropped: Tensor | None) -> Tensor:
    """``op(x, A)`` over the rank dim (A: [..., R, in]), with the last ``n_fusion`` (fusion LoRA) ranks
    fed ``x_dropped`` (dropout(x), while training) when given."""
    if n_fusion and x_dropped is not None:
        keep = a.shape[-2] - n_fusion
        parts = [op(x_dropped, a[..., keep:, :])]
        if keep:
            parts.insert(0, op(x, a[..., :keep, :]))
        return torch.cat(parts, dim=-1)
    return op(x, a)
