"""Stage 0 (data), honest axis: TruthfulQA generation split, first half train, second half test.

As in the paper's code (``train_test_split(test_size=0.5, shuffle=False)``): the first 408 of the
817 questions in file order train (one example per correct answer), the last 409 test. Test
records carry TruthfulQA's MC1/MC2 targets, joined by question text because the
multiple_choice file is in another order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from h3fusion.config import RunConfig
from h3fusion.data.examples import SFTExample
from h3fusion.data.sources import HubSource, load_rows, sample, seed_of, where
from h3fusion.errors import H3FusionError

GEN_FILE = "truthfulqa/generation.jsonl"
GEN_HUB = HubSource("truthfulqa/truthful_qa", "generation", "validation")
MC_FILE = "truthfulqa/multiple_choice.jsonl"
MC_HUB = HubSource("truthfulqa/truthful_qa", "multiple_choice", "validation")
PROMPT_FIELD = "question"
TEST_SET = "TruthfulQA questions"
PAPER_N = None
"""The paper scores all 409 TruthfulQA test questions."""
_GEN_FIELDS = ("question", "best_answer", "correct_answers", "incorrect_answers", "category")


def _answers(items: Sequence[str]) -> list[str]:
    # a trailing ';' in TruthfulQA.csv leaves "" items (HF keeps them); TruthfulQA's own
    # split_multi_answer drops them, and an empty answer is neither a target nor a reference
    return [a.strip() for a in items if a.strip()]


def split(config: RunConfig) -> tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]:
    """(train rows, test rows) of the generation split, in file order."""
    rows = load_rows(config, GEN_FILE, GEN_HUB, _GEN_FIELDS)
    n_train = len(rows) - math.ceil(len(rows) / 2)  # sklearn rounds the test share up: 817 -> 408 / 409
    return rows[:n_train], rows[n_train:]


def dev_questions(config: RunConfig) -> list[int]:
    """Indices (into the training half) of the ``data.honest_dev_questions`` questions held out as dev."""
    train, _ = split(config)
    n = config.data.honest_dev_questions
    if n >= len(train):
        raise H3FusionError(f"data.honest_dev_questions {n} leaves none of the {len(train)} TruthfulQA "
                            "training questions to train on: hold out fewer")
    return sorted(random.Random(seed_of(config)).sample(range(len(train)), n))


def train_pool(config: RunConfig) -> list[SFTExample]:
    """One example per correct answer of each training question not held out as dev."""
    train, _ = split(config)
    held_out = set(dev_questions(config))
    return [
        SFTExample("honest", r["question"].strip(), "", answer, f"truthfulqa:{q}:{a}")
        for q, r in enumerate(train)
        if q not in held_out
        for a, answer in enumerate(_answers(r["correct_answers"]))
    ]


def load_train(config: RunConfig) -> list[SFTExample]:
    return sample(train_pool(config), config.data.honest_train_size, seed_of(config), "honest examples")


def load_test(config: RunConfig) -> list[dict[str, Any]]:
    """The test questions with reference answers and MC1/MC2 targets."""
    _, test = split(config)
    return _records(config, test)


def load_dev(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` of the held-out training questions (``data.honest_dev_questions``), test-shaped."""
    train, _ = split(config)
    if not config.data.honest_dev_questions:
        raise H3FusionError("the honest dev split needs held-out training questions: set "
                            "data.honest_dev_questions (e.g. 60) before training the experts")
    return _records(config, [train[q] for q in dev_questions(config)][:limit])


def _records(config: RunConfig, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    mc_rows = load_rows(config, MC_FILE, MC_HUB, ("question", "mc1_targets", "mc2_targets"))
    mc = {r["question"].strip(): r for r in mc_rows}  # the generation file keeps a trailing space or two
    out = []
    for i, r in enumerate(rows):
        question = r["question"].strip()
        if question not in mc:
            raise H3FusionError(
                f"{where(config, MC_FILE, MC_HUB)} has no targets for the TruthfulQA test question {question!r} "
                f"(test item {i}); use the multiple_choice file that belongs to {where(config, GEN_FILE, GEN_HUB)}"
            )
        targets = {k: {"choices": list(mc[question][k]["choices"]), "labels": list(mc[question][k]["labels"])}
                   for k in ("mc1_targets", "mc2_targets")}
        out.append({
            "id": i,
            "question": question,
            "best_answer": r["best_answer"].strip(),
            "correct_answers": _answers(r["correct_answers"]),
            "incorrect_answers": _answers(r["incorrect_answers"]),
            "category": r["category"],
            **targets,
        })
    return out


def references(config: RunConfig, records: list[dict[str, Any]]) -> list[str | None]:
    """The aligned reference answer of each test record: TruthfulQA's best answer."""
    return [r.get("best_answer") or None for r in records]
