"""Dev question for the next study (issue 18, routing target): can a router reach >= 0.90 prompt-level accuracy on
AlpacaEval-style instructions once some AlpacaEval instructions (a router pool, held out of any future test set)
are among the helpful axis's routing prompts? Linear read-outs (MiniLM logistic, TF-IDF logistic) fitted on the
axes' training prompts (stratified, 400 per axis) with and without K AlpacaEval instructions of a router pool,
scored on the AlpacaEval dev pool (evaluate.alpacaeval_dev's own 150, seed 805) and the other axes' dev prompts.
Prompts only: no answer, judgement or score is read. Both pools are test instructions of the running recipe-D study
(nothing of it is chosen here); a study using them would hold both out of its test set."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from h3fusion.config import load_config
from h3fusion.data import load_dev, load_train
from h3fusion.data.helpful import PAPER_N, alpacaeval_split, load_alpacaeval, proportional_sample
from h3fusion.data.prompts import prompt_text
from h3fusion.data.sampling import stratified_sample
from h3fusion.judges.embedder import Embedder

DEV_N = 150
POOL_SEED = 806
NAMES = {"helpful": "helpful (AlpacaEval dev pool)", "alpaca": "helpful (held-out Alpaca)"}


def main() -> None:
    config = load_config("configs/cpu-bench.yaml", [f"evaluate.alpacaeval_dev={DEV_N}"])
    axes = list(config.experts)
    records = load_alpacaeval(config)
    test, dev_ae = alpacaeval_split(config, records)
    rest = test[PAPER_N:]  # neither the paper's first 50 nor the dev pool
    pool = proportional_sample(rest, 300, POOL_SEED)
    train = {a: [e.instruction + (f"\n{e.input}" if e.input else "")
                 for e in stratified_sample(load_train(a, config), 400, config.seed)] for a in axes}
    dev = {a: [i + (f"\n{inp}" if inp else "") for i, inp in (prompt_text(r, axis=a) for r in load_dev(a, config, 200))]
           for a in axes if a != "helpful"}
    dev["helpful"] = [r["instruction"] for r in dev_ae]
    dev_alpaca = [i + (f"\n{inp}" if inp else "") for i, inp in
                  (prompt_text(r, axis="helpful") for r in load_dev("helpful", config.model_copy(update={
                      "evaluate": config.evaluate.model_copy(update={"alpacaeval_dev": 0})}), 200))]
    embed = Embedder()
    x_dev = {a: embed.encode(t) for a, t in dev.items()}
    x_alpaca = embed.encode(dev_alpaca)
    x_train = {a: embed.encode(t) for a, t in train.items()}
    x_pool = embed.encode([r["instruction"] for r in pool])
    result = {"dev_prompts": {NAMES.get(a, a): len(t) for a, t in dev.items()} | {NAMES["alpaca"]: len(dev_alpaca)},
              "router_pool": len(pool), "accuracy": "share of each dev set routed to its axis; K: router-pool prompts added"}
    for weights, k in ((w, k) for w in (None, "balanced") for k in (0, 50, 100, 200, 300)):
        texts = [t for a in axes for t in train[a]] + [r["instruction"] for r in pool[:k]]
        y = np.array([i for i, a in enumerate(axes) for _ in train[a]] + [axes.index("helpful")] * k)
        x = np.concatenate([x_train[a] for a in axes] + ([x_pool[:k]] if k else []))
        minilm = LogisticRegression(C=3, max_iter=3000, class_weight=weights).fit(x, y)
        tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts)
        ngram = LogisticRegression(C=10, max_iter=3000, class_weight=weights).fit(tfidf.transform(texts), y)
        predicted = {"minilm": {a: minilm.predict(x_dev[a]) for a in axes} | {"alpaca": minilm.predict(x_alpaca)},
                     "tfidf": {a: ngram.predict(tfidf.transform(dev[a])) for a in axes}
                     | {"alpaca": ngram.predict(tfidf.transform(dev_alpaca))}}
        for name, labels in predicted.items():
            row = {NAMES.get(a, a): round(float((labels[a] == i).mean()), 3) for i, a in enumerate(axes)}
            row[NAMES["alpaca"]] = round(float((labels["alpaca"] == axes.index("helpful")).mean()), 3)
            result.setdefault(f"{name}, class weights {weights or 'none'}", {})[f"K={k}"] = row
            print(name, weights, k, row, flush=True)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
