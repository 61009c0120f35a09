"""Fusion stage: dropout with bool masks for the attention LoRA's inputs (PEFT's ``nn.Dropout`` swapped out).

``nn.Dropout`` on CPU draws its noise with ``bernoulli_`` into a float tensor and keeps that float
noise for backward: four bytes per element, and in a fusion step (attention LoRA on q/k/v/o plus the
experts' fusion LoRA) its random numbers were ~9% of the step's time. Here the mask is drawn as
``rand < 1 - p`` (~1.4x faster on CPU) and kept as bool (one byte per element); the result has the
same distribution and the same inverted-dropout scaling. The mask primitives live in
``h3fusion.moe.lowrank``, which the MoE layer's fusion LoRA uses the same way.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor, nn

from h3fusion.moe.lowrank import dropout_mask, dropped


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) that draws and keeps a bool mask."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return dropped(x, dropout_mask(x, self.p), self.p)


class SharedInputDropout(MaskDropout):
    """``MaskDropout`` that, called again on the very same input tensor, returns the same dropped tensor.

    Shared by the LoRA layers of sibling projections that read one input (an attention block's q, k and
    v all read the normed hidden state): they then see one mask and autograd keeps one dropped copy
    instead of three, as PEFT does for models with a fused qkv projection. Only weak references are
    held, so nothing outlives the forward/backward that uses it."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self._last: tuple[weakref.ref, int, weakref.ref] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self._last is not None:
            source, version, out = self._last[0](), self._last[1], self._last[2]()
            if source is x and version == x._version and out is not None:
                return out
        out = super().forward(x)
        self._last = (weakref.ref(x), x._version, weakref.ref(out))
        return out


def use_mask_dropout(model: nn.Module, shared: Sequence[str] = ("q_proj", "k_proj", "v_proj")) -> int:
    """Swap every ``nn.Dropout`` held in a PEFT LoRA layer's ``lora_dropout`` for ``MaskDropout`` (same p);
    LoRA layers named in ``shared`` under one parent module get one ``SharedInputDropout`` per adapter.

    Returns how many were swapped. Only the LoRA input dropouts are touched: the base model's own
    dropout layers (attention dropout, ...) stay as they are."""
    swapped = 0
    for parent in model.modules():
        siblings: dict[tuple[str, float], SharedInputDropout] = {}
        for child_name, module in parent.named_children():
            holder = getattr(module, "lora_dropout", None)
            if not isinstance(holder, nn.ModuleDict):
                continue
            for name, drop in list(holder.items()):
                if type(drop) is not nn.Dropout or drop.p == 0:
                    continue
                if child_name in shared:
                    replacement = siblings.setdefault((name, drop.p), SharedInputDropout(drop.p))
                else:
                    replacement = MaskDropout(drop.p)
                replacement.train(drop.training)
                holder[name] = replacement
                swapped += 1
    return swapped
