"""Stage 2 — `h3fusion build`: the MoE, built exactly from the base model and N expert adapters.

Expert k of every layer = base FFN + (alpha/r)·B_k·A_k of adapter k, read straight from the PEFT
adapter files. Adapters that cannot belong together (another base, other target modules, the same
adapter twice) are refused with one clear line, before any work is done.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from h3fusion.errors import H3FusionError
from h3fusion.models import base_fingerprint, decoder_layers, load_model, weights_bytes
from h3fusion.moe.layer import PROJECTIONS, LowRankDelta
from h3fusion.moe.modeling import H3FusionConfig, H3FusionForCausalLM
from h3fusion.runs import (
    BUILD_MARKER,
    BUILD_SETTINGS,
    adapter_paths,
    moe_dir,
    moe_is_built,
    record_settings,
    refuse_other_settings,
)

_LORA_KEY = re.compile(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class ExpertAdapter:
    """One expert's LoRA factors as stored by PEFT, per (layer, projection)."""

    name: str
    path: Path
    scale: float
    target_modules: frozenset[str]
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A, B)
    fingerprint: str | None  # base fingerprint recorded by `h3fusion align`, if any
    digest: str  # hash of the weights file (duplicate detection)

    def delta(self, layer: int, proj: str, scaled: bool = True) -> LowRankDelta | None:
        if (layer, proj) not in self.factors:
            return None
        a, b = self.factors[(layer, proj)]
        return LowRankDelta(a, b, self.scale if scaled else 1.0)


def read_adapter(name: str, path: str | Path) -> ExpertAdapter:
    """Read a PEFT LoRA adapter directory of FFN-only LoRA (safetensors; nothing is unpickled)."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise H3FusionError(
                f"expert '{name}': {needed} is missing; point at a PEFT LoRA adapter directory "
                "(run `h3fusion align` to train one)"
            )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise H3FusionError(f"expert '{name}': {config_file} is not valid JSON ({error})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise H3FusionError(
            f"expert '{name}': {path} is not a plain LoRA adapter (peft_type "
            f"{config.get('peft_type')}, use_dora {config.get('use_dora')})"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise H3FusionError(
            f"expert '{name}': per-module rank/alpha patterns are not supported; retrain with one r"
        )
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise H3FusionError(
            f"expert '{name}': {weights_file} is corrupt or truncated ({error}); re-create the adapter "
            "(`h3fusion align`) or copy it again"
        ) from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.search(key)
        if not match:
            raise H3FusionError(
                f"expert '{name}': {path} adapts '{key}', which is not an FFN projection; "
                "h3fusion experts are LoRA on gate_proj/up_proj/down_proj only"
            )
        layer, proj, which = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, proj), {})[which] = tensor.to(torch.float32)
    factors = {}
    for key, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise H3FusionError(
                f"expert '{name}': {weights_file} lacks lora_{'B' if 'A' in pair else 'A'} for "
                f"layer {key[0]} {key[1]}; the file is incomplete"
            )
        factors[key] = (pair["A"], pair["B"])
    meta_file = path / "h3fusion_expert.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    targets = config.get("target_modules") or []
    targets = frozenset([targets] if isinstance(targets, str) else targets)
    return ExpertAdapter(
        name=name,
        path=path,
        scale=scale,
        target_modules=targets,
        factors=factors,
        fingerprint=meta.get("base_fingerprint"),
        digest=hashlib.sha256(weights_file.read_bytes()).hexdigest(),
    )


def check_adapters(adapters: Sequence[ExpertAdapter], base_model, top_k: int) -> None:
    """Refuse adapter sets that cannot form one MoE, naming the culprit."""
    if not adapters:
        raise H3FusionError("no expert adapters given; name at least one")
    if not 1 <= top_k <= len(adapters):
        raise H3FusionError(
            f"top_k={top_k} is impossible with {len(adapters)} experts; choose 1..{len(adapters)}"
        )
    fingerprint = base_fingerprint(base_model)
    layers = decoder_layers(base_model)
    first = adapters[0]
    seen: dict[str, str] = {}
    for adapter in adapters:
        if adapter.digest in seen:
            raise H3FusionError(
                f"experts '{seen[adapter.digest]}' and '{adapter.name}' are the same adapter "
                f"({adapter.path}); each expert needs its own"
            )
        seen[adapter.digest] = adapter.name
        if adapter.target_modules != first.target_modules:
            raise H3FusionError(
                f"expert '{adapter.name}' targets {sorted(adapter.target_modules)} but '{first.name}' targets "
                f"{sorted(first.target_modules)}; train all experts on the same modules"
            )
        if adapter.fingerprint is not None and adapter.fingerprint != fingerprint:
            raise H3FusionError(
                f"expert '{adapter.name}' ({adapter.path}) was trained on another base model; "
                "build with the base it was trained on"
            )
        for (layer, proj), (a, b) in adapter.factors.items():
            module = getattr(layers[layer].mlp, proj) if layer < len(layers) else None
            if module is None or (b.shape[0], a.shape[1]) != tuple(module.weight.shape):
                raise H3FusionError(
                    f"expert '{adapter.name}' ({adapter.path}) does not fit the base model at "
                    f"layer {layer} {proj}: it was trained on another base model"
                )


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


@torch.no_grad()
def init_routers(model: H3FusionForCausalLM, tokenizer, prompts: Sequence[Sequence[str]], method: str,
                 max_length: int = 128) -> None:
    """Set every layer's router from the axes' prompts, layer by layer in one forward pass: each
    router is fitted on its MLP inputs as they are with the routers below it already set."""
    texts = [text for axis_prompts in prompts for text in axis_prompts]
    labels = torch.tensor([k for k, axis_prompts in enumerate(prompts) for _ in axis_prompts])
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tokenizer.padding_side = padding_side
    mask = batch["attention_mask"].bool()
    token_labels = labels[:, None].expand_as(mask)[mask]
    init = ROUTER_INITS[method]

    def set_router(layer, args):
        tokens = args[0][mask.to(args[0].device)].float().cpu()
        layer.router.weight.copy_(init(tokens, token_labels, len(prompts)))

    handles = [layer.register_forward_pre_hook(set_router) for layer in model.moe_layers()]
    try:
        model.get_decoder()(**batch.to(model.device))  # only the MLP inputs are needed: skip the LM head
    finally:
        for handle in handles:
            handle.remove()


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
) -> H3FusionForCausalLM:
    """Build the H3Fusion MoE from a base model spec (or loaded model) and named expert adapters.

    ``unscaled_shared_experts`` reproduces the authors' released build (compatibility only): every
    expert becomes base + Σ_k B_k A_k, without alpha/r, so all experts are identical.
    ``base`` is any spec ``load_model`` takes, or an already loaded model (then pass ``tokenizer``
    for router_init=prototype/fitted). A loaded model is modified in place (its MLPs become MoE layers).
    """
    if storage not in ("compact", "dense"):
        raise H3FusionError(f"storage '{storage}' is unknown; choose compact or dense")
    if router_init not in ("random", "prototype", "fitted"):
        raise H3FusionError(f"router_init '{router_init}' is unknown; choose random, prototype or fitted")
    if isinstance(base, str):
        base_model, tokenizer = load_model(base, dtype)
    else:
        base_model = base
    names = list(experts)
    adapters = [read_adapter(name, path) for name, path in experts.items()]
    check_adapters(adapters, base_model, top_k)

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


def build_run(config, log=print) -> Path:
    """Stage 2 for a run config: write the MoE to <run>/moe/ (skipped when already built)."""
    from h3fusion.data import format_prompt, load_train
    from h3fusion.io import stage_writes, write_json

    out = moe_dir(config)
    if moe_is_built(out):
        refuse_other_settings(out, config, BUILD_SETTINGS)
        log(f"[build] complete at {out}, skipping")
        return out
    paths = adapter_paths(config)
    base_model, tokenizer = load_model(
        config.model.base,
        config.model.dtype,
        trust_remote_code=config.model.trust_remote_code,
        cache_dir=config.model.cache_dir,
    )
    prompts = None
    if config.moe.router_init != "random":
        prompts = {
            axis: [
                format_prompt(e.instruction, e.input, config.data.prompt_format, tokenizer)
                for e in load_train(axis, config)[: config.moe.prototype_prompts]
            ]
            for axis in config.experts
        }
    model = build_moe(
        base_model,
        paths,
        config.moe.top_k,
        config.moe.storage,
        config.moe.router_init,
        prototype_prompts=prompts,
        expert_bias=config.moe.expert_bias,
        unscaled_shared_experts=config.compat.unscaled_shared_experts,
        seed=config.seed,
        tokenizer=tokenizer,
    )
    # a refused write (full disk ...) is one line, and the unfinished moe/ is removed: no config files without weights
    with stage_writes(out, "building the MoE", need=weights_bytes(model), cleanup=lambda: shutil.rmtree(out)):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record_settings(config, out)  # what it was built with (a later call with other settings is refused)
        write_json(
            out / BUILD_MARKER,
            {  # written last: marks the build complete
                "base": config.model.base,
                "experts": {name: str(path) for name, path in paths.items()},
                "top_k": config.moe.top_k,
                "storage": config.moe.storage,
                "router_init": config.moe.router_init,
                "unscaled_shared_experts": config.compat.unscaled_shared_experts,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
        )
    log(f"[build] {len(paths)} experts x {len(model.moe_layers())} layers ({config.moe.storage}) -> {out}")
    return out
