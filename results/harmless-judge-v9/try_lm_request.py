"""A SmolLM2 request model for the harmless judge's gate (issue 17, after v8): tried on the contrastive DEV split
and the judge's BeaverTails calibration slice only, exactly as ``results/harmless-judge-v7/try_request.py`` judges
its MiniLM variants (same cached v5 cross-encoder readings, same gate grid and rule); never the contrastive test
split, never the BeaverTails validation rows.

The request model here is SmolLM2-135M-Instruct (the embedded default) with a one-logit classification head on
its last token and LoRA on every projection, fine-tuned on the same ~7,400 request rows as v7's MiniLM model
(``request.request_rows``). The question it tests: does a larger language model's prior tell "How do I kill a
Python process?" from a harmful request better than MiniLM, whose fine-tuning learns the two sides' styles?

    export H3FUSION_DATA_DIR=... H3FUSION_CACHE=...   TRY_DIR=/tmp/judge7
    PYTHONPATH=src python results/harmless-judge-v7/try_request.py prepare       # the cross-encoder's readings, once
    PYTHONPATH=src:results/harmless-judge-v7 python results/harmless-judge-v9/try_lm_request.py NAME epochs=0.25 lr=2e-4 r=8

Per variant it prints one JSON line (``try_request.judge``'s figures, plus the fit's rows and time) and writes
``$TRY_DIR/NAME.json``. The fitted weights stay in ``$TRY_DIR/NAME/`` (safetensors, never committed).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import try_request as v7

from h3fusion.config import RunConfig
from h3fusion.judges import fit as judge_fit
from h3fusion.judges import harmless, request
from h3fusion.models import resolve_model_path

MAX_TOKENS = 64


def text(prompt: str) -> str:
    return f"Request: {str(prompt).strip()}\nDoes this request ask for help to cause harm?"


def load(r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    model = LlamaForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora), tokenizer


def logits(model, tokenizer, prompts, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            enc = tokenizer([text(p) for p in prompts[i:i + batch]], return_tensors="pt", padding=True, truncation=True,
                            max_length=MAX_TOKENS)
            out.append(model(**enc).logits[:, 0].float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def fit(name: str, opts: dict[str, str]):
    config = judge_fit.exclusion_config(RunConfig())
    data = harmless.split(config)
    rows = request.request_rows(config, [r for r in data.fit if r["source"] == "beavertails_test"], None,
                                harmless.ALARMING)
    model, tokenizer = load(int(opts.get("r", 8)))
    batch, epochs, lr = int(opts.get("batch", 32)), float(opts.get("epochs", 0.25)), float(opts.get("lr", 2e-4))
    steps = max(1, math.ceil(epochs * len(rows) / batch))
    order = list(range(len(rows)))
    random.Random(int(opts.get("seed", 0))).shuffle(order)
    order = (order * math.ceil(steps * batch / len(order) + 1))[:steps * batch]
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                                 * max(0.0, 1 - s / steps))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        enc = tokenizer([text(rows[i]["prompt"]) for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=MAX_TOKENS)
        y = torch.tensor([float(rows[i]["harmful"]) for i in idx])
        loss = loss_fn(model(**enc).logits[:, 0], y)
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
    out = v7.SCRATCH / name
    model.save_pretrained(out)  # safetensors
    fitted = {"rows": len(rows), "harmful": sum(r["harmful"] for r in rows), "steps": steps,
              "fit_s": round(time.perf_counter() - start)}
    return model, tokenizer, fitted


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    name, opts = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    model, tokenizer, fitted = fit(name, opts)
    cache: dict[str, float] = {}

    def p_request(_model_dir, prompts):
        todo = sorted({p for p in prompts if p not in cache})
        cache.update(zip(todo, 1 / (1 + np.exp(-logits(model, tokenizer, todo))), strict=True))
        return np.array([cache[p] for p in prompts])

    v7.p_request = p_request  # try_request.judge reads its request model through this
    figures = v7.judge(v7.SCRATCH / name, quick=False)
    (v7.SCRATCH / f"{name}.json").write_text(json.dumps({"name": name, "opts": opts, "fitted": fitted, **figures},
                                                        indent=1))
    print(json.dumps({"name": name, "opts": opts, "fitted": fitted, **{k: v for k, v in figures.items() if k != "rows"}}))


if __name__ == "__main__":
    main()
