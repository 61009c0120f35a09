"""The harmless judge's request model: P(the request asks for harmful help | the prompt alone).

What it is: MiniLM (the cross-encoder's base, ``judges.crossenc``) fine-tuned for a quarter of an epoch on the
prompt alone,
a linear head on its mean-pooled output, fitted on harmful
requests -- Do-Not-Answer questions of its malicious-use, hateful and personal-privacy risk areas,
safety-tuned-llamas instructions, PKU-SafeRLHF prompts and the BeaverTails fitting prompts whose labelled answer
is unsafe -- against benign ones: Alpaca instructions that use alarming words (``harmless.ALARMING``), Alpaca
questions, a sample of other Alpaca instructions and TruthfulQA's train questions (user-style questions with
odd premises). Never a BeaverTails calibration, validation or evaluated prompt, never a prompt of the
contrastive set. The harmless judge reads the answer's harm through its cross-encoder and uses this model only
to lower that reading when the request itself is benign (``harmless.GATE``).

    request_rows(config, bt_fit) -> list[{prompt, harmful, source}]
    fit(rows, out, quick=False) -> figures      # writes crossenc.safetensors / .json and meta.json (no pickle)
    RequestModel(directory).p_harmful(prompts) -> np.ndarray

How far to trust it: the benign side of its fitting data is written in Alpaca's and TruthfulQA's styles, the
harmful side in red-teamers', so it partly reads style; a benign question about a violent topic ("how do I take
out enemy snipers in Call of Duty") can still read as harmful. A logistic regression on frozen MiniLM sentence
embeddings of the same rows told the contrastive set's safe from unsafe prompts far worse (dev AUROC 0.83; see
results/harmless-judge-v6/README.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.config import RunConfig
from h3fusion.data import harmless as harmless_data
from h3fusion.data import helpful as helpful_data
from h3fusion.data import honest as honest_data
from h3fusion.data.sources import data_root, norm, read_rows
from h3fusion.io import write_json
from h3fusion.judges.heads import sigmoid

VERSION = "2"
"""Bump when the request model's data rules, fitting or head change: it is part of its own cache key.
2: a quarter of an epoch instead of one (``SETTINGS["epochs"]``); the quick fit keeps its one epoch."""
DNA_FILE = "do_not_answer/data_en.csv"
DATA_FILES = (harmless_data.TEST_FILE, *harmless_data.LABELLED_FILES, harmless_data.SAFERLHF_FILE,
              harmless_data.REFUSALS_FILE, DNA_FILE, helpful_data.TRAIN_FILE, honest_data.GEN_FILE)
"""Every data file the request model reads: their contents are part of its cache key."""
DNA_HARMFUL = ("Malicious Uses", "Discrimination, Exclusion, Toxicity, Hateful, Offensive",
               "Compromise privacy by leaking or inferring private information (person/individual)")
"""Do-Not-Answer risk areas (or types of harm) whose questions ask for harmful help. Its other questions
(mental-health crises, treating the chatbot as a human, misinformation, facts about organisations) are often
benign requests whose answers can go wrong: not what this model tells apart."""
SETTINGS = {"safety_tuned_llamas": 1500, "alpaca_question": 2000, "alpaca_plain": 500, "seed": 0, "epochs": 0.25,
            "lr": 4e-5, "quick_share": 0.1, "quick_epochs": 1.0}
"""Seeded samples of safety-tuned-llamas instructions (harmful), Alpaca questions and other Alpaca instructions
(benign; every alarming Alpaca instruction is kept), about 7,400 prompts in all. A quarter of an epoch of
fine-tuning (``epochs``, ``lr``: 117 steps, ~2.5 min on one thread): one epoch (v6, 465 steps, final loss ~0.01)
learnt how a harmful request is worded more than what it asks for, and read "How do I kill the weeds ...?" as
harmful (P > 0.9 for 96% of the contrastive set's safe-target prompts); fewer steps tell the contrastive dev
split's safe prompts from its unsafe ones better (AUROC 0.883 -> 0.920, results/harmless-judge-v7). ``quick_share``:
the share of the rows a quick fit (``judges.fit_size: quick``) uses, for ``quick_epochs`` (its 47 steps, as in v6)."""


def request_rows(config: RunConfig, bt_fit: Sequence[dict[str, Any]], max_rows: int | None = None,
                 alarming: Any = None) -> list[dict[str, Any]]:
    """The request model's fitting rows, one per distinct prompt (harmful first where a prompt is both).

    ``bt_fit``: the harmless judge's BeaverTails *fitting* rows (never calibration, validation or evaluated ones);
    ``alarming``: the regex of alarming words (``harmless.ALARMING``)."""
    root = data_root(config)
    test_prompts = {norm(r["prompt"]) for r in read_rows(root / harmless_data.TEST_FILE)}
    harmful: list[tuple[str, str]] = []
    for r in read_rows(root / DNA_FILE):
        if r["risk_area"] in DNA_HARMFUL or r["types_of_harm"] in DNA_HARMFUL:
            harmful.append((r["question"], "do_not_answer"))
    rng = random.Random(SETTINGS["seed"])
    llamas = list(read_rows(root / harmless_data.REFUSALS_FILE))
    harmful += [(r["instruction"], "safety_tuned_llamas")
                for r in rng.sample(llamas, min(SETTINGS["safety_tuned_llamas"], len(llamas)))]
    harmful += [(r["prompt"], "pku_saferlhf") for r in read_rows(root / harmless_data.SAFERLHF_FILE)]
    bt = [(r["prompt"], "beavertails_test") for r in bt_fit if r["harmful"]]
    alarm, questions, plain = [], [], []
    for r in read_rows(root / helpful_data.TRAIN_FILE):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if str(r.get("input") or "").strip() else "")
        if alarming is not None and alarming.search(prompt):
            alarm.append(prompt)
        elif prompt.strip().endswith("?") and "\n" not in prompt.strip():
            questions.append(prompt)
        else:
            plain.append(prompt)
    benign = ([(p, "alpaca_alarming") for p in alarm]
              + [(p, "alpaca_question") for p in rng.sample(questions, min(SETTINGS["alpaca_question"], len(questions)))]
              + [(p, "alpaca") for p in rng.sample(plain, min(SETTINGS["alpaca_plain"], len(plain)))]
              + [(r["question"], "truthfulqa_train") for r in honest_data.split(config)[0]])
    seen: set[str] = set()
    rows = []
    for (prompt, source), harm in [(x, 1) for x in harmful + bt] + [(x, 0) for x in benign]:
        key = norm(prompt)
        # the BeaverTails fitting prompts are test-set prompts the judge may fit on; no other source may hold one
        if not prompt.strip() or key in seen or (source != "beavertails_test" and key in test_prompts):
            continue
        seen.add(key)
        rows.append({"prompt": prompt.strip(), "harmful": harm, "source": source})
    if max_rows is not None:
        rows = random.Random(SETTINGS["seed"]).sample(rows, min(max_rows, len(rows)))
    return rows


def fit(rows: Sequence[dict[str, Any]], out: Path, quick: bool = False,
        log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Fine-tune the model on ``rows`` (a seeded ``quick_share`` of them when ``quick``) and write it to ``out``;
    returns its fitting figures (also in ``meta.json``)."""
    from h3fusion.judges.crossenc import CrossEncoder

    if quick:
        rows = random.Random(SETTINGS["seed"]).sample(list(rows), max(2, int(len(rows) * SETTINGS["quick_share"])))
    model = CrossEncoder()
    epochs = SETTINGS["quick_epochs"] if quick else SETTINGS["epochs"]
    model.train([r["prompt"] for r in rows], [""] * len(rows), [r["harmful"] for r in rows], epochs=epochs,
                lr=SETTINGS["lr"], seed=SETTINGS["seed"], log=log, what="request model")
    model.save(out)
    figures = {"rows": len(rows), "harmful": sum(r["harmful"] for r in rows),
               "by_source": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})}}
    write_json(out / "meta.json", {"component": "harmless request model", "version": VERSION, "settings": SETTINGS,
                                   "fitted_on": figures})
    return figures


class RequestModel:
    """P(the request asks for harmful help) of prompts, from a fitted directory (``fit``)."""

    FILES = ("crossenc.safetensors", "crossenc.json")

    def __init__(self, directory: Path):
        from h3fusion.judges.crossenc import CrossEncoder

        self.model = CrossEncoder(Path(directory))

    def p_harmful(self, prompts: Sequence[str]) -> np.ndarray:
        if not len(prompts):
            return np.zeros(0)
        return sigmoid(self.model.predict_logit([str(p).strip() for p in prompts], [""] * len(prompts)))
