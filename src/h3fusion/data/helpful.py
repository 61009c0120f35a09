"""Stage 0 (data), helpful axis: Alpaca for training, AlpacaEval (AlpacaEval 1) for testing.

The paper trains on an unpublished ~20k Alpaca subset; we draw a seeded sample of the 52k
instead, after removing rows that could leak the test set or teach nothing.
"""

from __future__ import annotations

from typing import Any

from h3fusion.config import RunConfig
from h3fusion.data.examples import SFTExample
from h3fusion.data.sources import HubSource, load_rows, norm, sample_with_share, seed_of
from h3fusion.errors import H3FusionError

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


DEV_POOL = 400
"""Alpaca instructions without input set aside before any training sample is drawn: the helpful dev prompts
(``evaluate.dev_n`` at most this many) come from here, so every training recipe is scored on the same dev
prompts and none of them is ever trained on."""


def _question_share(config: RunConfig) -> float:
    test = load_test(config)
    return sum(t["instruction"].strip().endswith("?") for t in test) / len(test)


def dev_pool(config: RunConfig, pool: list[SFTExample] | None = None) -> list[SFTExample]:
    """The ``DEV_POOL`` held-out instructions (no input; AlpacaEval's question share), seeded by the data seed
    alone: no training setting moves them."""
    pool = train_pool(config) if pool is None else pool
    candidates = [e for e in pool if not e.input]
    size = min(DEV_POOL, len(candidates) // 2)  # a small data dir (tests) keeps half its rows for training
    share = min(_question_share(config), sum(map(is_question, candidates)) / size) if size else None
    return sample_with_share(candidates, size, seed_of(config) + 1, share, is_question, "helpful dev instructions")


def outside_dev_pool(config: RunConfig) -> list[SFTExample]:
    """The pool without the dev pool's instructions: what every training sample draws from (the helpful expert's,
    the harmless expert's benign examples)."""
    pool = train_pool(config)
    held = {e.source for e in dev_pool(config, pool)}  # drawn from the whole pool: no training setting moves it
    return [e for e in pool if e.source not in held]


def load_train(config: RunConfig) -> list[SFTExample]:
    """A seeded sample of ``data.helpful_train_size`` examples of the pool outside the dev pool (None: all), in
    file order, ``data.helpful_question_share`` of them question-form when set, answers of at least
    ``data.helpful_min_words`` words when set."""
    least = config.data.helpful_min_words or 0
    kept = [e for e in outside_dev_pool(config) if len(e.response.split()) >= least]
    return sample_with_share(kept, config.data.helpful_train_size,
                             seed_of(config), config.data.helpful_question_share, is_question, "helpful examples")


def load_dev(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """``limit`` instructions of the dev pool (``DEV_POOL``), as test-shaped records (Alpaca's text-davinci-003
    answer as the reference), as many of them question-form as in AlpacaEval. Seeded; disjoint from AlpacaEval
    by the pool's construction and from every training sample by ``load_train``'s."""
    held = dev_pool(config)
    if limit > len(held):
        raise H3FusionError(f"evaluate.dev_n={limit}: the helpful dev pool holds {len(held)} held-out instructions; "
                            f"set evaluate.dev_n to at most {len(held)}")
    share = sum(map(is_question, held)) / len(held) if held else None  # the pool already has AlpacaEval's share
    picked = sample_with_share(held, limit, seed_of(config) + 2, share, is_question, "helpful dev instructions")
    return [{"id": i, "instruction": e.instruction, "reference": e.response, "dataset": e.source}
            for i, e in enumerate(picked)]


def references(config: RunConfig, records: list[dict[str, Any]]) -> list[str | None]:
    """The aligned reference answer of each test record: text-davinci-003's (None where it is empty)."""
    return [r.get("reference") or None for r in records]
