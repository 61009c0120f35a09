"""A toy fourth axis for tests, its data module: "concise" (answer in few words). See ``h3fusion.axes``."""

from __future__ import annotations

from typing import Any

from h3fusion.data.examples import SFTExample

PROMPT_FIELD = "prompt"
TEST_SET = "toy prompts"
PAPER_N = None
PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello."]


def load_test(config) -> list[dict[str, Any]]:
    return [{"id": i, "prompt": prompt} for i, prompt in enumerate(PROMPTS)]


def train_pool(config) -> list[SFTExample]:
    return [SFTExample("concise", prompt, "", "Blue." if i == 0 else "Four." if i == 1 else "Hello.", f"toy:{i}")
            for i, prompt in enumerate(PROMPTS)]


def load_train(config) -> list[SFTExample]:
    return train_pool(config)


def references(config, records: list[dict[str, Any]]) -> list[str | None]:
    return [None] * len(records)  # no aligned reference answers: no embedding drift
