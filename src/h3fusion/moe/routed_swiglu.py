"""One expert's routed SwiGLU plus its down-projection rank activations, saving little for backward.

In the compact layer's training path each expert computes, on the T_e tokens routed to it::

    h = silu(g) * u * w                     g, u: [T_e, I]; w: routing weights [T_e]
    z = [h @ A_keep^T,  dropout(h) @ A_fusion^T]     A: the expert's down-projection A factors [R, I]

Written with autograd ops this saves six [T_e, I] float tensors per expert for backward (g, silu(g),
u, silu(g)*u, h and dropout(h); seven with ``nn.Dropout``'s float noise): with top-2 routing that is
12-14 intermediate-size activations per token and layer, almost three times an expert LoRA step's, and
it made the fusion step's peak memory 1.8x the LoRA step's. ``routed_swiglu`` saves only g, u, w and a bool dropout mask,
and recomputes the rest in backward; the recomputation is element-wise, so it costs little time.

Used only with a SiLU activation (Llama, Mistral, Qwen2, SmolLM2 ...); ``MoEMLP`` keeps the plain
autograd path for any other ``act_fn``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from h3fusion.moe.lowrank import dropout_mask, dropped, rank_acts


def is_silu(act_fn: nn.Module) -> bool:
    """True for ``nn.SiLU`` and transformers' ``SiLUActivation`` (the kernel hard-codes SiLU)."""
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


class _RoutedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, w: Tensor, a: Tensor, n_fusion: int, keep_mask: Tensor | None,
                p: float):
        h = _hidden(g, u, w)
        z = rank_acts(h, a, n_fusion, torch.nn.functional.linear, None if keep_mask is None else dropped(h, keep_mask, p))
        ctx.save_for_backward(g, u, w, a, keep_mask)
        ctx.n_fusion, ctx.p = n_fusion, p
        return h, z

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_z: Tensor | None):
        g, u, w, a, keep_mask = ctx.saved_tensors
        n_fusion, p = ctx.n_fusion, ctx.p
        keep = a.shape[0] - n_fusion
        sig = torch.sigmoid(g)
        act = g * sig
        hu = act * u  # silu(g) * u, before the routing weight
        dh = torch.zeros_like(g) if grad_h is None else grad_h.clone()
        grad_a = None
        if grad_z is not None:
            if keep:
                dh.addmm_(grad_z[:, :keep], a[:keep])
            if n_fusion:
                d_fusion = grad_z[:, keep:] @ a[keep:]
                dh += dropped(d_fusion, keep_mask, p)
            if ctx.needs_input_grad[3]:
                h = hu * w.unsqueeze(-1)
                grad_a = torch.empty_like(a)
                if keep:
                    torch.mm(grad_z[:, :keep].t(), h, out=grad_a[:keep])
                if n_fusion:
                    torch.mm(grad_z[:, keep:].t(), dropped(h, keep_mask, p), out=grad_a[keep:])
        grad_w = (dh * hu).sum(dim=-1) if ctx.needs_input_grad[2] else None
        dhu = dh * w.unsqueeze(-1)
        grad_u = dhu * act if ctx.needs_input_grad[1] else None
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        grad_g = dhu * u * sig * (1 + g * (1 - sig)) if ctx.needs_input_grad[0] else None
        return grad_g, grad_u, grad_w, grad_a, None, None, None


def _hidden(g: Tensor, u: Tensor, w: Tensor) -> Tensor:
    return torch.nn.functional.silu(g) * u * w.unsqueeze(-1)


def routed_swiglu(g: Tensor, u: Tensor, w: Tensor, a: Tensor, n_fusion: int = 0, dropout: float = 0.0,
                  keep_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(h, z)``: ``h = silu(g) * u * w[:, None]`` and ``z = [h A_keep^T, dropout(h) A_fusion^T]``.

    ``a`` is [R, I] whose last ``n_fusion`` rows are the fusion LoRA's A (fed dropout(h) with drop
    probability ``dropout``; pass ``keep_mask`` to fix the mask, else one is drawn). Same values and
    gradients as the autograd composition, with only g, u, w and the mask saved for backward.
    """
    if keep_mask is None and n_fusion and dropout > 0:
        keep_mask = dropout_mask(g, dropout)
    if not n_fusion:
        keep_mask = None
    return _RoutedSwiGLU.apply(g, u, w, a, n_fusion, keep_mask, float(dropout))
