"""Stage 0 (data), helpful axis: Alpaca for training, AlpacaEval (AlpacaEval 1) for testing.

The paper trains on an unpublished ~20k Alpaca subset; we draw a seeded sample of the 52k
instead, after removing rows that could leak the test set or teach nothing.
"""

from __future__ import annotations

import random
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


ALPACAEVAL_DEV_SEED = 805
"""Seed of the AlpacaEval dev holdout (``evaluate.alpacaeval_dev``): fixed, so no run or data seed moves the test set."""


def load_alpacaeval(config: RunConfig) -> list[dict[str, Any]]:
    """The 805 AlpacaEval instructions with the text-davinci-003 reference answers, in file order (``id``: the
    position in the file, which the GPT-4 judgements index)."""
    rows = load_rows(config, TEST_FILE, TEST_HUB, ("instruction", "output", "dataset"))
    return [
        {"id": i, "instruction": r["instruction"], "reference": r["output"], "dataset": r["dataset"]}
        for i, r in enumerate(rows)
    ]


def proportional_sample(records: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` records drawn in proportion to their AlpacaEval subset (``dataset``: largest remainders), each
    subset's share seeded, kept in file order."""
    subsets: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        subsets.setdefault(record["dataset"], []).append(record)
    quota = {name: size * len(rows) / len(records) for name, rows in subsets.items()}
    counts = {name: int(q) for name, q in quota.items()}
    by_remainder = sorted(subsets, key=lambda name: (counts[name] - quota[name], name))
    for name in by_remainder[: size - sum(counts.values())]:
        counts[name] += 1
    rng = random.Random(seed)
    picked = [record for name in sorted(subsets) for record in rng.sample(subsets[name], counts[name])]
    return sorted(picked, key=lambda record: record["id"])


def alpacaeval_split(config: RunConfig, records: list[dict[str, Any]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test records, AlpacaEval dev records) of AlpacaEval (``records``: ``load_alpacaeval``'s, read when None).
    The dev records are the ``evaluate.alpacaeval_dev`` held out (none by default): a ``proportional_sample`` of
    the instructions after the paper's first ``PAPER_N`` (at most half of them), so the paper's subset stays the test
    set's prefix."""
    records = load_alpacaeval(config) if records is None else records
    size = config.evaluate.alpacaeval_dev
    if not size:
        return records, []
    after_paper = records[PAPER_N:]
    if size > len(after_paper) // 2:  # the judge that scores the dev prompts fits on the rest
        raise H3FusionError(f"evaluate.alpacaeval_dev={size}: at most half of AlpacaEval's {len(after_paper)} "
                            f"instructions after the paper's first {PAPER_N} may be held out (the helpful judge that "
                            f"scores them fits on the others); set it to at most {len(after_paper) // 2}")
    dev = proportional_sample(after_paper, size, ALPACAEVAL_DEV_SEED)
    held = {record["id"] for record in dev}
    return [record for record in records if record["id"] not in held], dev


def dev_holdout(config: RunConfig) -> list[dict[str, Any]]:
    """The AlpacaEval instructions held out of the test set as dev prompts (``alpacaeval_split``; none by default)."""
    return alpacaeval_split(config)[1]


def load_test(config: RunConfig) -> list[dict[str, Any]]:
    """The AlpacaEval instructions of the test set, in file order: all 805 but ``evaluate.alpacaeval_dev``'s
    holdout (``alpacaeval_split``); ``id`` is the position in AlpacaEval's file."""
    return alpacaeval_split(config)[0]


def train_pool(config: RunConfig) -> list[SFTExample]:
    """Every usable Alpaca row: no empty output, no duplicate (instruction, input), no test leak."""
    # AlpacaEval's self-instruct items sometimes inline their input, so test both forms
    test = {norm(t["instruction"]) for t in load_alpacaeval(config)}  # dev holdout included: never trained on
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
    test = load_alpacaeval(config)  # all 805: the Alpaca dev pool does not move with the AlpacaEval holdout
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
    by the pool's construction and from every training sample by ``load_train``'s.

    With ``evaluate.alpacaeval_dev`` set, up to ``limit`` of AlpacaEval's held-out instructions instead
    (``alpacaeval_split``; a ``proportional_sample`` of them when ``limit`` is smaller), test records as they are."""
    if config.evaluate.alpacaeval_dev:
        dev = alpacaeval_split(config)[1]
        return dev if limit >= len(dev) else proportional_sample(dev, limit, ALPACAEVAL_DEV_SEED + 1)
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
