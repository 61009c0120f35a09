"""Dropout with bool masks, for the fusion stage's LoRA inputs.

``nn.Dropout`` on CPU draws its noise with ``bernoulli_`` into a float tensor and keeps that float
noise for backward: four bytes per element, and in a fusion step (attention LoRA on q/k/v/o plus the
experts' fusion LoRA) its random numbers were ~9% of the step's time. Here the mask is drawn as
``rand < 1 - p`` (~1.4x faster on CPU) and kept as bool (one byte per element); the result has the
same distribution and the same inverted-dropout scaling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dropout_mask(like: Tensor, p: float) -> Tensor | None:
    """A bool keep-mask shaped like ``like``, each element kept with probability 1 - p (None when p == 0)."""
    if p <= 0:
        return None
    return torch.rand(like.shape, device=like.device) < 1.0 - p


def dropped(x: Tensor, keep_mask: Tensor | None, p: float) -> Tensor:
    """Inverted dropout with a given mask (identity without one), scaled as ``nn.Dropout`` scales it."""
    return x if keep_mask is None else x * keep_mask / (1.0 - p)


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) that draws and keeps a bool mask."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return dropped(x, dropout_mask(x, self.p), self.p)


def use_mask_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` held in a PEFT LoRA layer's ``lora_dropout`` for ``MaskDropout`` (same p).

    Returns how many were swapped. Only the LoRA input dropouts are touched: the base model's own
    dropout layers (attention dropout, ...) stay as they are."""
    swapped = 0
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for name, drop in list(holder.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                replacement = MaskDropout(drop.p)
                replacement.train(drop.training)
                holder[name] = replacement
                swapped += 1
    return swapped
