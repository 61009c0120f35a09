"""Expert adapters as PEFT writes them: the one reader of their files, shared by the MoE build, the
weight merges and the logit ensemble.

``read_adapter`` reads an FFN-only LoRA adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``; nothing is unpickled) into per-(layer, projection) factors;
``check_adapters`` refuses adapter sets that cannot be used together on one base model (another base,
other target modules, the same adapter twice), naming the culprit in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from h3fusion.errors import H3FusionError
from h3fusion.models import base_fingerprint, decoder_layers
from h3fusion.moe.lowrank import LowRankDelta
from h3fusion.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_META, missing_adapter_files
from h3fusion.tokens import check_prompt_prefix

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
    by_h3fusion: bool = False  # `h3fusion align` trained it (its h3fusion_expert.json is there)
    prompt_prefix: list[int] | None = None  # the ids it saw in front of every prompt, where align recorded them

    def delta(self, layer: int, proj: str, scaled: bool = True) -> LowRankDelta | None:
        if (layer, proj) not in self.factors:
            return None
        a, b = self.factors[(layer, proj)]
        return LowRankDelta(a, b, self.scale if scaled else 1.0)


def read_adapter(name: str, path: str | Path) -> ExpertAdapter:
    """Read a PEFT LoRA adapter directory of FFN-only LoRA (safetensors; nothing is unpickled)."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    missing = missing_adapter_files(path)
    if missing:
        raise H3FusionError(
            f"expert '{name}': {path / missing[0]} is missing; point moe.adapters.{name} at a complete PEFT LoRA "
            "adapter directory, or leave it out for `h3fusion align` to train one"
        )
    config = _json_object(name, config_file)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise H3FusionError(
            f"expert '{name}': {path} is not a plain LoRA adapter (peft_type "
            f"{config.get('peft_type')}, use_dora {config.get('use_dora')})"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise H3FusionError(
            f"expert '{name}': per-module rank/alpha patterns are not supported; retrain with one r"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1 and isinstance(alpha, int | float)
            and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise H3FusionError(f"expert '{name}': {config_file} needs a positive integer 'r' and a positive number "
                            f"'lora_alpha' (it has r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}); "
                            "re-create the adapter or copy it again")
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
    meta_file = path / EXPERT_META
    meta = _json_object(name, meta_file) if meta_file.is_file() else {}
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
        by_h3fusion=bool(meta),
        prompt_prefix=meta.get("prompt_prefix_ids"),
    )


def _json_object(name: str, path: Path) -> dict:
    """An adapter's JSON file read as an object, or one line naming the file (not a traceback)."""
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise H3FusionError(f"expert '{name}': {path} is unreadable ({error.strerror or error}); check its "
                            "permissions, or copy the adapter again") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise H3FusionError(f"expert '{name}': {path} is not valid JSON ({error}); re-create the adapter or copy "
                            "it again") from None
    if not isinstance(value, dict):
        raise H3FusionError(f"expert '{name}': {path} holds a {type(value).__name__}, not a JSON object; re-create "
                            "the adapter or copy it again")
    return value

def check_adapters(adapters: Sequence[ExpertAdapter], base_model, tokenizer=None) -> None:
    """Refuse adapter sets that cannot be used together on ``base_model`` (and, given its ``tokenizer``, prompts
    encoded as it encodes them: ``h3fusion.tokens``), naming the culprit."""
    if not adapters:
        raise H3FusionError("no expert adapters given; name at least one")
    for adapter in adapters if tokenizer is not None else ():
        check_prompt_prefix(f"expert '{adapter.name}' ({adapter.path})", adapter.prompt_prefix, adapter.by_h3fusion,
                            tokenizer)
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

