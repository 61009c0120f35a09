"""Router initialisation for a freshly built MoE: ``random`` (nn.Linear's init, seeded), ``prototype``
(each axis's mean MLP input, centred) or ``fitted`` (a logistic regression from MLP inputs to axes).

Each layer's router is set from the axes' prompts in one forward pass, layer by layer, so it is fitted
on its MLP inputs as they are with the routers below it already set. It is fitted on what it will decide
from: under token routing each content token's MLP input (template tokens are the same in every prompt and
the gating loss ignores them too), under sequence routing each prompt's mean over its content tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from h3fusion.moe.modeling import H3FusionForCausalLM
from h3fusion.moe.router import RoutingInputs, pooled_rows
from h3fusion.tokens import prompt_batch


def prototype_router(x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Router rows from expert prototypes: each axis's mean MLP input over its tokens, centred
    across axes, unit norm (mergekit's "hidden" gate, per layer)."""
    means = torch.stack([x[y == k].mean(dim=0) for k in range(n)])
    centred = means - means.mean(dim=0, keepdim=True) if n > 1 else means
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-6)


def fitted_router(x: torch.Tensor, y: torch.Tensor, n: int, l2: float = 1e-5, iterations: int = 100) -> torch.Tensor:
    """Router rows fitted as a multinomial logistic regression (no intercept, like the router) from
    each token's MLP input to its prompt's axis: a discriminative prototype. Mean vectors alone are
    dominated by what all prompts share (the template) and route nearly uniformly."""
    scale = x.norm(dim=1).mean()  # ridge relative to the hidden-state scale
    w = torch.zeros(n, x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T, y) + l2 * (w**2).sum() * scale**2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach()


ROUTER_INITS = {"prototype": prototype_router, "fitted": fitted_router}


def router_samples(hidden: torch.Tensor, inputs: RoutingInputs, labels: torch.Tensor,
                   routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP inputs, axis labels) a router is fitted on, from one layer's inputs ``hidden`` [B, T, H] of B
    prompts labelled ``labels`` [B]: each content token (token routing) or each prompt's pooled content
    tokens (sequence routings, as ``router.route_sequences`` pools them)."""
    if routing != "token":
        return pooled_rows(hidden, inputs.decision_mask).float().cpu(), labels
    mask = inputs.content_mask.to(hidden.device)
    return hidden[mask].float().cpu(), labels.to(mask.device)[:, None].expand_as(mask)[mask].cpu()


@torch.no_grad()
def init_routers(model: H3FusionForCausalLM, tokenizer, prompts: Sequence[Sequence[str]], method: str,
                 max_length: int = 128) -> None:
    """Set every layer's router from the axes' prompts, layer by layer in one forward pass: each
    router is fitted on its MLP inputs as they are with the routers below it already set."""
    texts = [text for axis_prompts in prompts for text in axis_prompts]
    labels = torch.tensor([k for k, axis_prompts in enumerate(prompts) for _ in axis_prompts])
    batch = prompt_batch(tokenizer, texts, "right", max_length)
    init = ROUTER_INITS[method]

    def set_router(layer, args):  # the forward has set the routing inputs (content and decision masks)
        x, y = router_samples(args[0], layer.routing_inputs, labels, layer.routing)
        layer.router.weight.copy_(init(x, y, len(prompts)))

    handles = [layer.register_forward_pre_hook(set_router) for layer in model.moe_layers()]
    try:
        batch = batch.to(model.device)
        model.decoder_forward(batch["input_ids"], batch["attention_mask"])  # only the MLP inputs are needed
    finally:
        for handle in handles:
            handle.remove()
