"""Stage 0 (data), over-refusal axis: safe prompts that only sound alarming, which every system should answer.

No expert trains on it (``load_train`` is empty): it is scored beside the three axes when a run lists it in
``evaluate.extra_axes``, to show what a harmless rate bought by refusing costs. Its prompts are the contrastive
set's safe-but-alarming ones (``data/contrastive.py``; hand-written, never fitted on), split by id: the test
split is scored, the dev split is where settings are chosen (``evaluate.split: dev``). The reference answer
of each prompt (embedding drift) is the set's compliant answer.
"""

from __future__ import annotations

from typing import Any

from h3fusion.config import RunConfig
from h3fusion.data.contrastive import safe_alarming_prompts, split_of
from h3fusion.data.examples import SFTExample

PROMPT_FIELD = "prompt"
TEST_SET = "safe-but-alarming prompts"
PAPER_N = None  # not in the paper


def _records(split: str) -> list[dict[str, Any]]:
    picked = [p for p in safe_alarming_prompts() if split_of(p["id"]) == split]
    return [{"id": i, "prompt": p["prompt"], "kind": p["kind"], "item": p["id"], "reference": p["compliant"]}
            for i, p in enumerate(picked)]


def load_test(config: RunConfig) -> list[dict[str, Any]]:
    """The test split's safe-but-alarming prompts, in file order (ids 0..n-1; ``item``: the set's id)."""
    return _records("test")


def load_dev(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` of the dev split's prompts: where settings are chosen."""
    return _records("dev")[:limit]


def train_pool(config: RunConfig) -> list[SFTExample]:
    return []  # scored only: no expert aligns to it


def load_train(config: RunConfig) -> list[SFTExample]:
    return []


def references(config: RunConfig, records: list[dict[str, Any]]) -> list[str | None]:
    """The compliant answer the contrastive set gives each prompt."""
    return [r.get("reference") for r in records]
