"""Stage 0 (data), helpful axis: Alpaca for training, AlpacaEval (AlpacaEval 1) for testing.

The paper trains on an unpublished ~20k Alpaca subset; we draw a seeded sample of the 52k
instead, after removing rows that could leak the test set or teach nothing.
"""

from __future__ import annotations

from typing import Any

from h3fusion.config import RunConfig
from h3fusion.data.examples import SFTExample
from h3fusion.data.sources import HubSource, load_rows, norm, sample_with_share, seed_of

TRAIN_FILE = "alpaca/alpaca_data.json.gz"
TRAIN_HUB = HubSource("tatsu-lab/alpaca", split="train")
TEST_FILE = "alpaca_eval/text_davinci_003_outputs.json"
# config alpaca_eval / split eval is built by a loading script, which datasets >= 4 refuses to run;
# alpaca_eval.json is the file that script reads.
TEST_HUB = HubSource("tatsu-lab/alpaca_eval", "alpaca_eval", "eval", file="alpaca_eval.json")
PROMPT_FIELD = "instruction"
TEST_SET = "AlpacaEval instructions"
PAPER_N = 50
"""The paper scores the first 50 AlpacaEval instructions."""


def load_test(config: RunConfig) -> list[dict[str, Any]]:
    """The 805 AlpacaEval instructions with the text-davinci-003 reference answers, in file order."""
    rows = load_rows(config, TEST_FILE, TEST_HUB, ("instruction", "output", "dataset"))
    return [
        {"id": i, "instruction": r["instruction"], "reference": r["output"], "dataset": r["dataset"]}
        for i, r in enumerate(rows)
    ]


def train_pool(config: RunConfig) -> list[SFTExample]:
    """Every usable Alpaca row: no empty output, no duplicate (instruction, input), no test leak."""
    # AlpacaEval's self-instruct items sometimes inline their input, so test both forms
    test = {norm(t["instruction"]) for t in load_test(config)}
    seen: set[tuple[str, str]] = set()
    pool = []
    for i, r in enumerate(load_rows(config, TRAIN_FILE, TRAIN_HUB, ("instruction", "input", "output"))):
        instruction, inp, output = r["instruction"], r["input"] or "", r["output"]
        key = (instruction, inp)
        if not output.strip() or key in seen or norm(instruction) in test or norm(f"{instruction} {inp}") in test:
            continue
        seen.add(key)
        pool.append(SFTExample("helpful", instruction, inp, output, f"alpaca:{i}"))
    return pool


def is_question(example: SFTExample) -> bool:
    """A question-form instruction (no input, ends in '?'): 41% of AlpacaEval's, 7% of Alpaca's."""
    return not example.input and example.instruction.strip().endswith("?")


def load_train(config: RunConfig) -> list[SFTExample]:
    """A seeded sample of ``data.helpful_train_size`` examples of the pool (None: all), in file order,
    ``data.helpful_question_share`` of them question-form when set."""
    return sample_with_share(train_pool(config), config.data.helpful_train_size, seed_of(config),
                             config.data.helpful_question_share, is_question, "helpful examples")


def load_dev(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """``limit`` Alpaca instructions without input that the training sample left out, as test-shaped
    records (Alpaca's text-davinci-003 answer as the reference), as many of them question-form as in
    AlpacaEval. Seeded; disjoint from AlpacaEval by the pool's construction."""
    used = {example.source for example in load_train(config)}
    rest = [e for e in train_pool(config) if e.source not in used and not e.input]
    test = load_test(config)
    share = sum(t["instruction"].strip().endswith("?") for t in test) / len(test)
    picked = sample_with_share(rest, min(limit, len(rest)), seed_of(config) + 1, share, is_question,
                               "helpful dev instructions")
    return [{"id": i, "instruction": e.instruction, "reference": e.response, "dataset": e.source}
            for i, e in enumerate(picked)]


def references(config: RunConfig, records: list[dict[str, Any]]) -> list[str | None]:
    """The aligned reference answer of each test record: text-davinci-003's (None where it is empty)."""
    return [r.get("reference") or None for r in records]
