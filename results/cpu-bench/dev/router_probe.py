"""Dev measurement: how well can any router tell the three axes' prompts apart? (issue 18, routing target)

A router decides from hidden states; this asks how far a *linear* read-out of the MoE's MLP inputs, pooled over a
prompt's content tokens (what sequence routing decides from, and a fitted router's init), can separate the dev
prompts by axis, per layer and per number of training prompts per axis; and, as a reference that owes nothing to
SmolLM2, a logistic regression on MiniLM sentence embeddings and on TF-IDF n-grams of the same prompts. Fitted on
the axes' training prompts (the stratified sample the router init draws), scored on the dev split (held-out Alpaca
instructions, BeaverTails dev prompts, held-out TruthfulQA train questions): no test prompt is read.

    H3FUSION_DATA_DIR=../shared/data .venv/bin/python results/cpu-bench/dev/router_probe.py runs/dev-fuse-token2/moe

writes router_probe.json beside this file (a few minutes on one thread).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM, AutoTokenizer

import h3fusion  # noqa: F401  (registers the MoE model class)
from h3fusion.config import load_config
from h3fusion.data import format_prompt, load_dev, load_train
from h3fusion.data.prompts import prompt_text
from h3fusion.data.sampling import stratified_sample
from h3fusion.judges.embedder import Embedder
from h3fusion.moe.router import pooled_rows
from h3fusion.moe.router_init import fitted_router

RECIPE_C = ["data.honest_dev_questions=60", "data.helpful_train_size=1200", "data.helpful_question_share=0.4",
            "data.helpful_min_words=80", "data.harmless_train_size=1200", "data.harmless_refusal_share=0.25"]
PER_AXIS = (32, 100, 400)
LAYERS = (0, 10, 20, 29)


def pooled_inputs(model, tokenizer, texts: list[str], batch: int = 16) -> list[torch.Tensor]:
    """Per MoE layer, [len(texts), H]: each prompt's MLP input averaged over its content tokens."""
    layers = model.moe_layers()
    caught: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: caught.__setitem__(i, pooled_rows(args[0], m.routing_inputs.decision_mask)))
        for i, layer in enumerate(layers)]
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    tokenizer.padding_side = "right"
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True, truncation=True,
                                max_length=128)
                model.decoder_forward(enc["input_ids"], enc["attention_mask"])
                for i in range(len(layers)):
                    out[i].append(caught[i].float())
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(rows) for rows in out]


def per_axis_accuracy(pred: np.ndarray, y: np.ndarray, n: int) -> list[float]:
    return [round(float((pred[y == k] == k).mean()), 3) for k in range(n)]


def main(moe_dir: str) -> None:
    torch.set_num_threads(1)
    config = load_config("configs/cpu-bench.yaml", RECIPE_C)
    axes = list(config.experts)
    train = {a: stratified_sample(load_train(a, config), max(PER_AXIS), config.seed) for a in axes}
    dev = {a: [prompt_text(r, axis=a) for r in load_dev(a, config, 200)] for a in axes}
    y_train = np.array([k for k, a in enumerate(axes) for _ in train[a]])
    y_dev = np.array([k for k, a in enumerate(axes) for _ in dev[a]])
    # the first n of each axis's stratified sample (the sample is drawn in strata order, so any prefix is stratified)
    first = {n: np.concatenate([np.flatnonzero(y_train == k)[:n] for k in range(len(axes))]) for n in PER_AXIS}
    result: dict = {"axes": axes, "moe": moe_dir, "train_prompts": {a: len(train[a]) for a in axes},
                    "dev_prompts": {a: len(dev[a]) for a in axes}, "hidden_state_linear": {}}

    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    x_train = pooled_inputs(model, tokenizer, [format_prompt(e.instruction, e.input) for a in axes for e in train[a]])
    x_dev = pooled_inputs(model, tokenizer, [format_prompt(i, inp) for a in axes for i, inp in dev[a]])
    for n, rows in first.items():
        for layer in LAYERS:
            w = fitted_router(x_train[layer][rows], torch.from_numpy(y_train[rows]), len(axes))
            pred = (x_dev[layer] @ w.T).argmax(1).numpy()
            result["hidden_state_linear"][f"{n} per axis, layer {layer}"] = per_axis_accuracy(pred, y_dev, len(axes))

    plain_train = [e.instruction + (f"\n{e.input}" if e.input else "") for a in axes for e in train[a]]
    plain_dev = [i + (f"\n{inp}" if inp else "") for a in axes for i, inp in dev[a]]
    embed = Embedder()
    minilm = LogisticRegression(C=3, max_iter=2000).fit(embed.encode(plain_train), y_train)
    result["minilm_logistic"] = per_axis_accuracy(minilm.predict(embed.encode(plain_dev)), y_dev, len(axes))
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(plain_train)
    ngram = LogisticRegression(C=10, max_iter=2000).fit(tfidf.transform(plain_train), y_train)
    result["tfidf_logistic"] = per_axis_accuracy(ngram.predict(tfidf.transform(plain_dev)), y_dev, len(axes))
    out = Path(__file__).with_name("router_probe.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/dev-fuse-token2/moe")
