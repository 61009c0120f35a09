"""Expert adapters for MoE tests: real PEFT LoRA adapters on the tiny Llama with non-zero B."""

from __future__ import annotations

from pathlib import Path

import torch

from h3fusion.io import write_json
from h3fusion.models import base_fingerprint, load_model
from h3fusion.runs import EXPERT_META


def make_adapter(base_dir: Path, out: Path, seed: int, targets=("gate_proj", "up_proj", "down_proj"),
                 r: int = 4, alpha: float = 8.0) -> Path:
    """Save a stock PEFT LoRA adapter with random (non-zero) A and B, plus h3fusion's expert meta."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(base_dir))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    write_json(out / EXPERT_META, {"base_fingerprint": base_fingerprint(peft_model.get_base_model())})
    return out
