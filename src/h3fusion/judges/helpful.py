"""Helpful judge: a stand-in for GPT-4 in AlpacaEval 1 (P(candidate preferred over the davinci-003 reference)).

What it is: surface features of the candidate and of the reference (length, format, repetition,
refusal phrases ... and their differences), relevance features (MiniLM cosines between the
instruction, the reference and the candidate; word overlaps; echo detection) and *strong-reference*
features (how close the candidate comes to GPT-4 Turbo's answer to the same instruction, AlpacaEval 2's
public baseline ``gpt4_1106_preview``, against how close the davinci-003 reference comes) fed to a
LightGBM head, followed by a system-level temperature p' = sigmoid(k logit(p) + c) fitted on
out-of-fold win rates of the *training* generators (it widens the judge's compressed win rates).
Records whose instruction has no strong reference (a user's own prompts) are scored by a second head
fitted without those features; its own, weaker validation figures are in ``validation["without_strong_reference"]``.

How it was fitted: AlpacaEval's published GPT-4 judgements (``alpaca_eval/gpt4_judgements_vs_davinci003``,
ties dropped) of training instructions x training generators, plus synthetic "reference wins"
answers (empty, generic, off-topic, echoed instruction, truncated, repeated). The evaluated
instructions (the first ``evaluate.helpful_n`` of the test set), the AlpacaEval dev prompts
(``evaluate.alpacaeval_dev``, when set) and a seeded quarter of the others are held out,
as are 12 generators spread from weak to strong; validation is on held-out instructions x held-out
generators, plus degenerate-answer probes on held-out instructions. GPT-4 Turbo's own judgements are
not fitted on (its answers are the strong reference). The strong references are inputs, like the
davinci-003 reference, never labels: they are GPT-4 Turbo's answers, not GPT-4's judgements.

How far to trust it: AlpacaEval 1 is strongly length-biased and this judge learns that bias, relevance and
closeness to GPT-4 Turbo's content; it cannot check facts or reasoning. On held-out generators its win rates
are within ~0.08 of GPT-4's on average (strong generators ~0.1 low), see ``validation["generators"]``.
Use it to rank systems, not as a GPT-4 score.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.axes import AxisSpec, Column, Figure
from h3fusion.config import RunConfig
from h3fusion.data import helpful as helpful_data
from h3fusion.data.sources import data_root, norm, read_rows
from h3fusion.errors import H3FusionError
from h3fusion.io import write_json
from h3fusion.judges.base import Judge, judged_by_probability, require
from h3fusion.judges.embedder import Embedder, rowwise_cos
from h3fusion.judges.heads import fit_lgb, load_lgb, logit, sigmoid
from h3fusion.judges.metrics import auroc, rounded
from h3fusion.judges.text import containment, content, jaccard, text_stats, words
from h3fusion.rates import WinRate
from h3fusion.stats import Reliability

VERSION = "3"
"""Bump when this judge's features, data rules or heads change: it is part of its cache key.
3: refusals of the (benign) instruction join the synthetic "reference wins" answers (``refusal``), and a refusal
   probe joins the degenerate probes: the judge had given a small model's flat refusals ("I'm sorry, but I cannot
   provide information about tourist attractions in Canada.") a mean P(win) of ~0.13."""
JUDGEMENTS_FILE = "alpaca_eval/gpt4_judgements_vs_davinci003.jsonl.gz"
STRONG_FILE = "alpaca_eval/gpt4_1106_preview_outputs.json"
"""GPT-4 Turbo's answers to the 805 AlpacaEval instructions (AlpacaEval 2's baseline): the strong reference."""
DATA_FILES = (JUDGEMENTS_FILE, STRONG_FILE, helpful_data.TEST_FILE)
"""Every data file the fit reads: their contents are part of the cache key."""
STRONG_GENERATOR = "gpt4_1106_preview"
"""Its judgements are never fitted on: there the candidate *is* the strong reference."""
FIELDS = ("instruction", "reference", "response")
HELDOUT_GENERATORS = (
    "text_davinci_001", "alpaca-7b", "phi-2", "minichat-3b", "vicuna-13b", "llama-2-7b-chat-hf",
    "gpt35_turbo_instruct", "tulu-2-dpo-7b", "gpt-3.5-turbo-0301", "zephyr-7b-beta", "claude", "gpt4",
)
"""Generators never fitted on, spread from weak (GPT-4 win rate ~0.15) to strong (~0.97)."""
HELDOUT_SHARE = 0.25
"""Share of the non-evaluated instructions also held out for validation."""
FIT_ROWS = 16000
"""Seeded sample of the ~21k training judgements; each costs one MiniLM encode. 16,000 over 8,000 lifted held-out
agreement 0.780 -> 0.789 and lowered the win-rate MAE 0.082 -> 0.075 (both with the strong-reference features)."""
QUICK = {"fit_rows": 4000}
"""``judges.fit_size: quick``: a quarter of the fitting judgements (validation unchanged)."""
SYNTHETIC_WEIGHT = 1.0
ROUNDS = 500
SPLIT_SEED = 0
CALIBRATE = True
GENERIC = ("I don't know.", "I'm sorry, I cannot help with that.", "Sure!", "Here is the answer:", "Yes.", "No.",
           "I am an AI language model.", "Thank you.")
REFUSAL_OPENINGS = ("I'm sorry, but I cannot", "I apologize, but I can't", "As an AI language model, I cannot",
                    "Unfortunately, I must decline to", "I'm afraid I can't", "Sorry, I won't")
REFUSAL_OBJECTS = ("help with that", "provide information about {topic}", "assist with requests about {topic}",
                   "answer questions about {topic}", "do that", "{instruction}")
REFUSAL_REASONS = ("", "It is important to respect the privacy and rights of others.",
                   "This goes against my guidelines.", "Please consult a qualified professional instead.",
                   "It is important to always think carefully before taking any action.",
                   "Is there anything else I can help you with?")
"""Refusals of a benign instruction, as small chat models write them (opening, what is declined, a reason): GPT-4
prefers the reference's real answer to any of them. The probe's refusals use other wording (``probes``)."""


def config_material(config: RunConfig) -> dict[str, Any]:
    """Part of this judge's cache key from the run's config besides its evaluated subset: the AlpacaEval dev
    holdout it never fits on (nothing when there is none, so the keys of judges fitted before it stay valid)."""
    size = config.evaluate.alpacaeval_dev
    return {"alpacaeval_dev": size} if size else {}


@dataclass
class HelpfulSplit:
    fit: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    fit_instructions: set[str] = field(default_factory=set)
    """norm() of every instruction whose judgements (or synthetic answers) are fitted on."""
    val_instructions: list[int] = field(default_factory=list)
    evaluated: set[str] = field(default_factory=set)
    dev: set[str] = field(default_factory=set)
    """norm() of the AlpacaEval dev instructions (``evaluate.alpacaeval_dev``): never fitted on, never validated on."""
    tests: list[dict[str, Any]] = field(default_factory=list)
    strong: dict[str, str] = field(default_factory=dict)
    """norm(instruction) -> GPT-4 Turbo's answer (``STRONG_FILE``)."""


def split(config: RunConfig, max_rows: int | None = None, fold: tuple[int, int] | None = None,
          quick: bool = False) -> HelpfulSplit:
    """Fitting and validation rows. Without ``fold`` the judge scores the first ``evaluate.helpful_n``
    instructions and fits on none of them; with ``fold=(k, K)`` it scores fold k of them (every K-th
    instruction from the k-th) and may fit on the other folds' (cross-fitting, ``judges.folds``)."""
    root = data_root(config)
    if root is None:
        raise H3FusionError("fitting the helpful judge needs the AlpacaEval GPT-4 judgements: "
                            "set H3FUSION_DATA_DIR (or data.dir) to a directory laid out like shared/data")
    tests = helpful_data.load_alpacaeval(config)  # indexed as the judgements are: all 805
    test_set, dev = helpful_data.alpacaeval_split(config, tests)
    n_eval = config.evaluate.helpful_n
    scored = test_set[:n_eval] if fold is None else test_set[:n_eval][fold[0]::fold[1]]
    evaluated = {norm(t["instruction"]) for t in scored}
    dev_held = {norm(t["instruction"]) for t in dev}  # AlpacaEval dev prompts: scored by this judge, never fitted on
    rest = [t["id"] for t in tests if norm(t["instruction"]) not in evaluated | dev_held]
    rng = random.Random(SPLIT_SEED)
    held = set(rng.sample(rest, int(len(rest) * HELDOUT_SHARE)))
    val_ids = [t["id"] for t in scored] + sorted(held)
    val_texts = {norm(tests[i]["instruction"]) for i in val_ids}
    fit_ids = {i for i in rest if i not in held and norm(tests[i]["instruction"]) not in val_texts}
    out = HelpfulSplit(val_instructions=val_ids, evaluated=evaluated, dev=dev_held, tests=tests,
                       strong={norm(r["instruction"]): r["output"] for r in read_rows(root / STRONG_FILE)})
    val_set = set(val_ids)
    fit_rows = []
    for r in read_rows(root / JUDGEMENTS_FILE):
        if r["preference"] not in (1.0, 2.0) or r["generator"] == STRONG_GENERATOR:
            continue
        i = int(r["index"])
        if i >= len(tests) or norm(tests[i]["instruction"]) != norm(r["instruction"]):
            raise H3FusionError(f"{root / JUDGEMENTS_FILE}: judgement index {i} does not match the AlpacaEval "
                                "instruction order; re-copy the files listed in shared/data/SOURCES.md")
        row = {"instruction": tests[i]["instruction"], "reference": tests[i]["reference"], "response": r["output"],
               "win": int(r["preference"] == 2.0), "generator": r["generator"], "index": i}
        if r["generator"] in HELDOUT_GENERATORS:
            if i in val_set:
                out.val.append(row)
        elif i in fit_ids:
            fit_rows.append(row)
    n_fit = max_rows if max_rows is not None else QUICK["fit_rows"] if quick else FIT_ROWS
    out.fit = random.Random(SPLIT_SEED).sample(fit_rows, min(n_fit, len(fit_rows)))
    out.fit += synthetic([tests[i] for i in sorted(fit_ids)], out.fit, SPLIT_SEED,
                         None if max_rows is None else max(max_rows // 10, 5))
    if max_rows is not None:  # a quick fit for tests: few validation rows and probe instructions
        out.val = random.Random(SPLIT_SEED).sample(out.val, min(max_rows // 2, len(out.val)))
        kept = {r["index"] for r in out.val}
        out.val_instructions = [i for i in out.val_instructions if i in kept][:20]
    out.fit_instructions = {norm(r["instruction"]) for r in out.fit}
    return out


def _topic(instruction: str) -> str:
    """The instruction's first words, lower-cased and unpunctuated: what a refusal says it declines."""
    return " ".join(re.sub(r"[^\w\s'-]", " ", instruction).lower().split()[:6])


def refusal(instruction: str, rng: random.Random) -> str:
    """A refusal of ``instruction`` that does not go on to help (``REFUSAL_OPENINGS`` ...)."""
    declined = rng.choice(REFUSAL_OBJECTS).format(topic=_topic(instruction),
                                                 instruction=instruction.strip().rstrip(".?!").lower())
    return f"{rng.choice(REFUSAL_OPENINGS)} {declined}. {rng.choice(REFUSAL_REASONS)}".strip()


def _first_sentence(text: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)
    return parts[0] if parts else text


def synthetic(tests: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]], seed: int,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Answers GPT-4 would rank below the reference: empty, generic, off-topic, echoed, truncated, repeated,
    refusals."""
    rng = random.Random(seed + 1)
    refusals = random.Random(seed + 3)  # its own stream: the other kinds' draws stay as before
    tests = list(tests)
    if limit is not None:
        tests = tests[:limit]
    by_instr: dict[str, list[str]] = {}
    for r in real:
        by_instr.setdefault(r["instruction"], []).append(r["response"])
    pool = [(r["instruction"], r["response"]) for r in real]
    out = []

    def add(t: dict[str, Any], response: str, kind: str) -> None:
        out.append({"instruction": t["instruction"], "reference": t["reference"], "response": response, "win": 0,
                    "generator": f"synthetic:{kind}", "index": t["id"]})

    for t in tests:
        others = [t2 for t2 in tests if t2["id"] != t["id"]]
        other = rng.choice(others) if others else t
        add(t, other["reference"], "offtopic_reference")
        if pool:
            instr, resp = rng.choice(pool)
            if instr != t["instruction"]:
                add(t, resp, "offtopic_answer")
        add(t, t["instruction"], "echo")
        if rng.random() < 0.3:
            add(t, "", "empty")
        if rng.random() < 0.5:
            add(t, rng.choice(GENERIC), "generic")
        ws = t["reference"].split()
        if len(ws) > 12:
            add(t, " ".join(ws[: rng.randint(3, 10)]), "truncated")
        if rng.random() < 0.5:
            add(t, " ".join([_first_sentence(t["reference"])] * rng.randint(4, 10)), "repeated")
        if rng.random() < 0.15:
            add(t, " ".join([rng.choice(["the", "and", "I", "a", "answer"])] * rng.randint(30, 200)), "word_loop")
        if refusals.random() < 0.5:
            add(t, refusal(t["instruction"], refusals), "refusal")
    return out


# ----------------------------------------------------------------------------- features


def strong_references(records: Sequence[dict[str, Any]], table: dict[str, str]) -> list[str | None]:
    """Each record's strong reference: its own ``strong_reference`` field, else the table's answer to its
    instruction, else None."""
    return [r.get("strong_reference") or table.get(norm(str(r["instruction"]))) for r in records]


def features(records: Sequence[dict[str, Any]], embedder: Embedder, strong: Sequence[str] | None = None) -> np.ndarray:
    """The head's inputs; with ``strong`` (one strong reference per record) the strong-reference columns too."""
    base, e_c, e_r = _base_features(records, embedder)
    if strong is None:
        return base
    cand = [str(r["response"]).strip() for r in records]
    ref = [str(r["reference"]).strip() for r in records]
    strong = [str(g).strip() for g in strong]
    e_g = embedder.encode(strong, "strong references")
    cg, rg = rowwise_cos(e_c, e_g), rowwise_cos(e_r, e_g)
    extra = []
    for k in range(len(records)):
        key_words = content(strong[k])  # how much of GPT-4 Turbo's content each answer covers
        cover_c, cover_r = containment(key_words, content(cand[k])), containment(key_words, content(ref[k]))
        size = max(len(strong[k]), 1)
        extra.append([cg[k], rg[k], cg[k] - rg[k], cover_c, cover_r, cover_c - cover_r,
                      len(cand[k]) / size, len(ref[k]) / size])
    return np.hstack([base, np.asarray(extra, dtype=np.float32)])


def _base_features(records: Sequence[dict[str, Any]], embedder: Embedder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surface and relevance features, plus the candidates' and references' MiniLM vectors (reused above)."""
    ins = [str(r["instruction"]).strip() for r in records]
    ref = [str(r["reference"]).strip() for r in records]
    cand = [str(r["response"]).strip() for r in records]
    e_i = embedder.encode(ins, "instructions")
    e_r = embedder.encode(ref, "references")
    e_c = embedder.encode(cand, "answers")
    memo: dict[str, tuple[list[float], set[str], set[str]]] = {}

    def info(text: str) -> tuple[list[float], set[str], set[str]]:
        if text not in memo:
            memo[text] = (text_stats(text), set(words(text)), content(text))
        return memo[text]

    ci, ri, cr = rowwise_cos(e_c, e_i), rowwise_cos(e_r, e_i), rowwise_cos(e_c, e_r)
    rows = []
    for k in range(len(records)):
        sc, wc, cc = info(cand[k])
        sr, wr, cr_ = info(ref[k])
        si, wi, ci_ = info(ins[k])
        nc, ni = norm(cand[k]), norm(ins[k])
        rows.append([
            *sc, *sr, *(np.subtract(sc, sr)), si[0], si[1],
            ci[k], ri[k], cr[k], ci[k] - ri[k],
            jaccard(wc, wi), containment(cc, ci_), containment(ci_, cc), containment(ci_, cr_),
            containment(ci_, cc) - containment(ci_, cr_),
            jaccard(wc, wr), containment(cr_, cc), containment(cc, cr_),
            float(bool(nc) and (nc in ni or ni in nc)), float(len(nc) < 0.5 * max(len(ni), 1)),
        ])
    return np.asarray(rows, dtype=np.float32), e_c, e_r


# ----------------------------------------------------------------------------- judge


class HelpfulJudge(Judge):
    """P(the response is preferred over the text-davinci-003 reference), AlpacaEval-1 style."""

    name = "helpful-strongref-lgbm"
    axis = "helpful"

    def __init__(self, directory: Path, embedder: Embedder | None = None):
        super().__init__(directory, embedder)
        import json

        self.booster = load_lgb(self.directory / "head.lgb.txt")
        self.fallback = load_lgb(self.directory / "head_noref.lgb.txt")
        self.strong = json.loads((self.directory / "strong_references.json").read_text())
        self.calibration = json.loads((self.directory / "calibration.json").read_text())

    def score(self, records: Sequence[dict[str, Any]]) -> list[float]:
        """P(win) per record: the strong-reference head where a strong reference exists, else the fallback head."""
        require(records, FIELDS, "helpful")
        strong = strong_references(records, self.strong)
        out = np.zeros(len(records))
        with_ref = [i for i, g in enumerate(strong) if g is not None]
        without = [i for i, g in enumerate(strong) if g is None]
        if with_ref:
            x = features([records[i] for i in with_ref], self.embedder, [strong[i] for i in with_ref])
            out[with_ref] = _calibrate(self.booster.predict(x), self.calibration)
        if without:
            x = features([records[i] for i in without], self.embedder)
            out[without] = _calibrate(self.fallback.predict(x), self.calibration["without_strong_reference"])
        return [float(p) for p in out]


def _calibrate(p: np.ndarray, cal: dict[str, float]) -> np.ndarray:
    return sigmoid(cal["k"] * logit(p) + cal["c"])


def fit_calibration(x: np.ndarray, y: np.ndarray, w: np.ndarray, rows: Sequence[dict[str, Any]], rounds: int,
                    folds: int = 5) -> dict[str, Any]:
    """System-level temperature: p' = sigmoid(k logit(p) + c), fitted so that out-of-fold win rates of the
    *training* generators (folds by generator; synthetic rows always train) match GPT-4's.

    Counters the judge's compression of win rates toward the training prior (weak models over-rated).
    """
    from scipy.optimize import minimize

    gens = np.array([r["generator"] for r in rows])
    real = ~np.char.startswith(gens.astype(str), "synthetic:")
    names = sorted(set(gens[real]))
    if len(names) < folds:
        return {"k": 1.0, "c": 0.0, "note": "too few generators to calibrate"}
    rate = {g: y[gens == g].mean() for g in names}
    ordered = sorted(names, key=rate.get)  # stratify folds by GPT-4 win rate
    fold_of = {g: i % folds for i, g in enumerate(ordered)}
    z = np.full(len(y), np.nan)
    for f in range(folds):
        test = real & np.array([fold_of.get(g, -1) == f for g in gens])
        booster = fit_lgb(x[~test], y[~test], rounds, weight=w[~test])
        z[test] = logit(booster.predict(x[test]))
    idx = [np.flatnonzero(gens == g) for g in names]
    target = np.array([rate[g] for g in names])

    def loss(theta: np.ndarray) -> float:
        pred = np.array([sigmoid(theta[0] * z[i] + theta[1]).mean() for i in idx])
        return float(((pred - target) ** 2).mean())

    before = loss(np.array([1.0, 0.0]))
    res = minimize(loss, np.array([1.0, 0.0]), method="Nelder-Mead")
    k, c = (float(v) for v in res.x)
    if not (0.5 <= k <= 5.0) or res.fun >= before:  # implausible fit: keep the raw probabilities
        k, c = 1.0, 0.0
    oof = np.array([sigmoid(z[i]).mean() for i in idx])
    cal = np.array([sigmoid(k * z[i] + c).mean() for i in idx])
    return {"k": k, "c": c, "training_generators": len(names),
            "oof_win_rate_mae_raw": float(np.abs(oof - target).mean()),
            "oof_win_rate_mae_calibrated": float(np.abs(cal - target).mean())}


def probes(tests: Sequence[dict[str, Any]], seed: int = SPLIT_SEED) -> dict[str, list[dict[str, Any]]]:
    """Degenerate answers (targeted: mean P(win) <= 0.10) and reference points (not targeted)."""
    rng = random.Random(seed + 2)
    tests = list(tests)
    shifted = tests[1:] + tests[:1]
    rec = lambda t, response: {"instruction": t["instruction"], "reference": t["reference"], "response": response}  # noqa: E731
    return {
        "empty": [rec(t, "") for t in tests],
        "repeated_word": [rec(t, " ".join(["the"] * 150)) for t in tests],
        "repeated_sentence": [rec(t, " ".join([_first_sentence(t["reference"])] * 8)) for t in tests],
        "other_instruction_answer": [rec(t, o["reference"]) for t, o in zip(tests, shifted, strict=True)],
        "echoed_instruction": [rec(t, t["instruction"]) for t in tests],
        # worded unlike the fitted refusals (``REFUSAL_OPENINGS``): does the judge know a refusal, not a template?
        "refusal": [rec(t, f"I do not feel comfortable helping to {_topic(t['instruction'])}. This is not the "
                           "kind of request I take on; I hope you understand.") for t in tests],
        # reference points, not degenerate
        "i_dont_know": [rec(t, rng.choice(["I don't know.", "I'm not sure."])) for t in tests],
        "first_8_words_of_reference": [rec(t, " ".join(t["reference"].split()[:8])) for t in tests],
        "reference_itself": [rec(t, t["reference"]) for t in tests],
    }


DEGENERATE = ("empty", "repeated_word", "repeated_sentence", "other_instruction_answer", "echoed_instruction", "refusal")


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def evaluate(predict: Callable[[Sequence[dict[str, Any]]], np.ndarray], data: HelpfulSplit) -> dict[str, Any]:
    y = np.array([r["win"] for r in data.val])
    p = predict(data.val)
    gens = sorted({r["generator"] for r in data.val})
    per_gen = {}
    for g in gens:
        m = np.array([r["generator"] == g for r in data.val])
        per_gen[g] = {"n": int(m.sum()), "gpt4_win_rate": float(y[m].mean()), "judge_win_rate": float(p[m].mean()),
                      "judge_hard_win_rate": float((p[m] > 0.5).mean())}
    g4 = [per_gen[g]["gpt4_win_rate"] for g in gens]
    jw = [per_gen[g]["judge_win_rate"] for g in gens]
    jh = [per_gen[g]["judge_hard_win_rate"] for g in gens]
    ev = np.array([norm(r["instruction"]) in data.evaluated for r in data.val])
    val_tests = [data.tests[i] for i in data.val_instructions]
    probe_scores = {name: float(np.mean(predict(recs))) for name, recs in probes(val_tests).items()}
    return {
        "agreement": float(((p > 0.5) == y).mean()),
        "auroc": auroc(y, p),
        "always_candidate_agreement": float(y.mean()),
        "agreement_evaluated_instructions": float(((p[ev] > 0.5) == y[ev]).mean()) if ev.any() else None,
        "spearman_win_rates": _spearman(g4, jw),
        "spearman_hard_win_rates": _spearman(g4, jh),
        "win_rate_mae": float(np.mean(np.abs(np.subtract(g4, jw)))),
        "win_rate_bias": float(np.mean(np.subtract(jw, g4))),
        "degenerate_mean_win_prob": float(np.mean([probe_scores[k] for k in DEGENERATE])),
        "probes": probe_scores,
        "generators": per_gen,
        # GPT-4's win frequency per bin of the judge's probability: a study corrects win rates through it
        # and its intervals resample it (h3fusion.rates)
        "reliability": Reliability.of(p, y == 1).as_dict(),
    }


def fit(config: RunConfig, out: Path, embedder: Embedder, log: Callable[[str], Any] = print,
        max_rows: int | None = None, fold: tuple[int, int] | None = None, quick: bool = False) -> dict[str, Any]:
    data = split(config, max_rows, fold, quick)
    n_syn = sum(r["generator"].startswith("synthetic:") for r in data.fit)
    log(f"helpful: {len(data.fit)} fitting rows ({n_syn} synthetic) over {len(data.fit_instructions)} instructions; "
        f"{len(data.val)} validation rows ({len(data.val_instructions)} instructions x "
        f"{len({r['generator'] for r in data.val})} held-out generators)")
    y_fit = np.array([r["win"] for r in data.fit])
    # class-balanced (wins and losses weigh the same in total): the training generators mostly win, and the
    # prior otherwise lifts weak models' win rates
    share = y_fit.mean()
    w = np.where(y_fit == 1, 0.5 / share, 0.5 / (1 - share)) * np.array(
        [SYNTHETIC_WEIGHT if r["generator"].startswith("synthetic:") else 1.0 for r in data.fit])
    rounds = ROUNDS if max_rows is None else 50
    out.mkdir(parents=True, exist_ok=True)
    heads: dict[str, dict[str, Any]] = {}
    # the main head (strong-reference features), then the fallback head for instructions without one
    for head, file, with_strong in (("strong", "head.lgb.txt", True), ("noref", "head_noref.lgb.txt", False)):
        def feats(recs: Sequence[dict[str, Any]], with_strong: bool = with_strong) -> np.ndarray:
            return features(recs, embedder, strong_references(recs, data.strong) if with_strong else None)

        x_fit = feats(data.fit)
        embedder.save()
        booster = fit_lgb(x_fit, y_fit, rounds, weight=w)
        booster.save_model(str(out / file))
        cal = fit_calibration(x_fit, y_fit, w, data.fit, rounds) if CALIBRATE else {"k": 1.0, "c": 0.0}
        log(f"helpful ({head} head): win-rate temperature k={cal['k']:.2f}, c={cal['c']:.2f}")
        result = evaluate(lambda recs, b=booster, c=cal, f=feats: _calibrate(b.predict(f(recs)), c), data)
        raw = evaluate(lambda recs, b=booster, f=feats: b.predict(f(recs)), data)
        embedder.save()
        heads[head] = {**result, "uncalibrated": {k: raw[k] for k in SUMMARY}, "calibration": cal}
    main, noref = heads["strong"], heads["noref"]
    test_set = ("AlpacaEval instructions" if not data.dev else
                f"instructions of the AlpacaEval test set (all {len(data.tests)} but its {len(data.dev)} dev ones)")
    write_json(out / "calibration.json",
               rounded({**main["calibration"], "without_strong_reference": noref["calibration"]}))
    write_json(out / "strong_references.json", data.strong)
    validation = {
        "judge": HelpfulJudge.name + (" (quick fit)" if quick else ""),
        "fitted_on": {"judgements": len(data.fit) - n_syn, "synthetic_negatives": n_syn,
                      "instructions": len(data.fit_instructions),
                      "generators": len({r["generator"] for r in data.fit} - {r["generator"] for r in data.fit
                                                                               if r["generator"].startswith("synthetic:")})},
        "validated_on": {"judgements": len(data.val), "instructions": len(data.val_instructions),
                         "evaluated_instructions": len(data.evaluated), "generators": sorted({r["generator"] for r in data.val})},
        "scores": ((f"the first {config.evaluate.helpful_n} {test_set} (fitted on none of them) and "
                    "users' own files (`h3fusion judge helpful`)") if fold is None else
                   (f"fold {fold[0] + 1} of {fold[1]}: every {fold[1]}th of the first {config.evaluate.helpful_n} "
                    f"{test_set} from number {fold[0] + 1} (fitted on none of them)"))
                  + (f"; the {len(data.dev)} AlpacaEval dev instructions (evaluate.alpacaeval_dev, fitted on none "
                     "of them)" if data.dev else ""),
        "targets": TARGETS,
        **main,
        "targets_met": _targets_met(main),
        "without_strong_reference": {**{k: noref[k] for k in SUMMARY}, "targets_met": _targets_met(noref),
                                     "calibration": noref["calibration"],
                                     "note": "figures of the fallback head, used for instructions without a "
                                             "strong reference (not the AlpacaEval test set)"},
    }
    log(f"helpful: agreement {main['agreement']:.3f}, Spearman {main['spearman_win_rates']:.3f}, "
        f"win-rate MAE {main['win_rate_mae']:.3f}, degenerate {main['degenerate_mean_win_prob']:.3f} "
        f"(without a strong reference: {noref['agreement']:.3f} / {noref['spearman_win_rates']:.3f} / "
        f"{noref['win_rate_mae']:.3f})")
    write_json(out / "fitted_on.json", {"instructions": sorted(data.fit_instructions)})
    write_json(out / "meta.json", {"axis": "helpful", "judge": HelpfulJudge.name,
                                   "files": ["head.lgb.txt", "head_noref.lgb.txt", "calibration.json",
                                             "strong_references.json"]})
    write_json(out / "validation.json", rounded(validation))
    return validation


TARGETS = {"agreement": 0.78, "spearman_win_rates": 0.85, "win_rate_mae": 0.08, "degenerate_mean_win_prob": 0.10}
SUMMARY = ("agreement", "auroc", "spearman_win_rates", "win_rate_mae", "win_rate_bias", "degenerate_mean_win_prob")


"""The paper's bar for its GPT-4 judge as AlpacaEval measures it (agreement with human choices, win-rate Spearman
and error over systems), and a degenerate answer's win probability at most 0.10."""


def _targets_met(result: dict[str, Any]) -> dict[str, bool]:
    return {"agreement": result["agreement"] >= TARGETS["agreement"],
            "spearman_win_rates": result["spearman_win_rates"] >= TARGETS["spearman_win_rates"],
            "win_rate_mae": result["win_rate_mae"] <= TARGETS["win_rate_mae"],
            "degenerate_mean_win_prob": result["degenerate_mean_win_prob"] <= TARGETS["degenerate_mean_win_prob"]}


def metrics(judged: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The win rate: the mean probability that an answer is preferred over the reference."""
    n = len(judged)
    return {"win_rate": sum(r["score"] for r in judged) / n, "n": n}


def prepare_user_record(record: dict[str, Any], prompt: str, match: dict[str, Any], where: str) -> dict[str, Any]:
    """A user's record as the judge scores it: its instruction and the reference answer it is compared with."""
    reference = record.get("reference", match.get("reference"))
    if reference is None:
        raise H3FusionError(f"{where}: the helpful judge compares against a reference answer; "
                            "add a 'reference' field (AlpacaEval instructions get theirs automatically)")
    return {**record, "instruction": prompt, "reference": reference}


def _api_judge(config: RunConfig):
    """``judges.helpful: api``: the pairwise judge of an OpenAI-compatible endpoint."""
    from h3fusion.judges.external import OpenAIPairwiseJudge

    s = config.judges
    return OpenAIPairwiseJudge(s.api_base_url, s.api_model, s.api_key_env, seed=config.seed, timeout=s.api_timeout_s,
                               retries=s.api_retries, backoff=s.api_backoff_s, backoff_max=s.api_backoff_max_s)


SPEC = AxisSpec(
    judge=HelpfulJudge, rates=WinRate,
    columns=(Column("win rate ↑", "win_rate", True), Column("words", "mean_words", None)),
    headline="win_rate", headline_text="win rate", short="win", summary="win",
    judge_records=lambda judge, records: judged_by_probability(judge, records, "win"),
    metrics=metrics,
    per_prompt=lambda judged: np.array([r["score"] for r in judged], dtype=float),
    rerank_score=lambda judged: judged["score"],
    figures=(Figure("heldout_agreement", ("agreement",), "agreement with GPT-4", "agreement", "target {:.2f}"),
             Figure("system_spearman", ("spearman_win_rates",), "win-rate Spearman", "spearman_win_rates"),
             Figure("winrate_mae", ("win_rate_mae",), "MAE", "win_rate_mae"),
             Figure("degenerate_winprob", ("degenerate_mean_win_prob",))),
    targets=TARGETS, user_fields=("reference",), prepare_user_record=prepare_user_record,
    external={"api": _api_judge}, fitted_bytes=6 << 20, cross_fit=True,
)
"""The helpful axis for evaluate and report (``h3fusion.axes``)."""
