"""Stage 0 (data): training examples and test sets for the helpful, harmless and honest axes.

Reads the local data directory (``data.dir`` / ``$H3FUSION_DATA_DIR``, laid out like
shared/data) or, when none is set, the Hugging Face hub. Knows nothing of models or judges.

    load_train(axis, config) -> list[SFTExample]         # the axis's own examples (fusion, router init)
    load_expert_train(axis, config) -> list[SFTExample]  # what its expert trains on: + expert_extras
    load_test(axis, config, limit=None) -> list[dict]   # records in test order (helpful ids: AlpacaEval positions)
    load_dev(axis, config, limit) -> list[dict]          # test-shaped records disjoint from the test subsets
    load_answerable(axis, config) -> list[dict]          # the test set + dev records held out of its file
    load_evaluated(axis, config) -> list[dict]           # what evaluate.split names: test subset or dev
    mixed_train(config, axes=None) -> list[SFTExample]  # the fusion stage's shuffled mix

h3fusion.data.contrastive holds the hand-written contrastive set that tests the harmless judge
(safe prompts that only sound alarming, unsafe prompts; never used for fitting).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from h3fusion.axes import data_module
from h3fusion.config import RunConfig
from h3fusion.data.examples import SFTExample
from h3fusion.data.harmless import load_labelled_test_responses
from h3fusion.data.prompts import format_prompt, prompt_text
from h3fusion.data.sources import seed_of
from h3fusion.errors import H3FusionError

__all__ = [
    "SFTExample",
    "format_prompt",
    "load_labelled_test_responses",
    "load_dev",
    "load_evaluated",
    "load_expert_train",
    "load_heldout_train",
    "load_test",
    "load_train",
    "mixed_train",
    "prompt_text",
]


def _module(axis: str) -> Any:
    return data_module(axis)  # the axis's data module (an unknown axis: one error naming the known ones)


def load_train(axis: str, config: RunConfig) -> list[SFTExample]:
    """The expert-stage training examples of one axis (seeded sample of ``data.<axis>_train_size``)."""
    loader: Callable[[RunConfig], list[SFTExample]] = _module(axis).load_train
    return loader(config)


def load_expert_train(axis: str, config: RunConfig) -> list[SFTExample]:
    """What the axis's expert trains on: ``load_train`` plus the examples its data module adds for the expert
    alone (``expert_extras``: the harmless expert's benign examples), which fusion and router init never see."""
    extras: Callable[[RunConfig], list[SFTExample]] | None = getattr(_module(axis), "expert_extras", None)
    return load_train(axis, config) + (extras(config) if extras else [])


def load_heldout_train(axis: str, config: RunConfig, limit: int) -> list[SFTExample]:
    """Up to ``limit`` examples of the axis's training pool that the training sample left out
    (seeded order; empty when the sample took the whole pool): a fixed set for held-out loss."""
    used = {example.source for example in load_train(axis, config)}
    rest = [example for example in _module(axis).train_pool(config) if example.source not in used]
    random.Random(seed_of(config)).shuffle(rest)
    return rest[:limit]


def load_test(axis: str, config: RunConfig, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` test records of one axis (None: all), in the paper's order.

    helpful: {id, instruction, reference, dataset}; harmless: {id, prompt, category, is_safe};
    honest: {id, question, best_answer, correct_answers, incorrect_answers, category,
    mc1_targets, mc2_targets}.
    """
    if limit is not None and limit < 0:
        raise H3FusionError(f"test limit must be >= 0 (or None for all), got {limit}")
    records = _module(axis).load_test(config)
    return records if limit is None else records[:limit]


def load_answerable(axis: str, config: RunConfig) -> list[dict[str, Any]]:
    """Every test-shaped record of ``axis`` whose prompt a user's answers may carry (``h3fusion judge`` takes the
    reference from it): the test set, plus any records its data module holds out of the test file as dev prompts
    (``dev_holdout``: the helpful axis's ``evaluate.alpacaeval_dev``)."""
    module = _module(axis)
    held = getattr(module, "dev_holdout", None)
    return module.load_test(config) + (held(config) if held else [])


def load_dev(axis: str, config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """``limit`` dev records of one axis, shaped like its test records, disjoint from the evaluated test
    subset and from every stage's training data: settings are chosen on these, never on the test."""
    if limit < 1:
        raise H3FusionError(f"dev limit must be >= 1, got {limit}")
    return _module(axis).load_dev(config, limit)


def load_evaluated(axis: str, config: RunConfig) -> list[dict[str, Any]]:
    """The records a run generates for and scores: the first ``evaluate.<axis>_n`` test records, or
    ``evaluate.dev_n`` dev records when ``evaluate.split`` is dev."""
    if config.evaluate.split == "dev":
        return load_dev(axis, config, config.evaluate.dev_n)
    return load_test(axis, config, getattr(config.evaluate, f"{axis}_n", None))  # None: an axis it does not size


def mixed_train(config: RunConfig, axes: Sequence[str] | None = None, per_axis: int | None = None) -> list[SFTExample]:
    """All axes' training examples (default: ``config.experts``), shuffled together with the data seed;
    ``per_axis`` keeps a seeded sample of at most that many of each axis.

    Each example keeps its axis: the fusion stage's gating loss uses it as the label.
    """
    rng = random.Random(seed_of(config))
    mixed = []
    for axis in config.experts if axes is None else axes:
        examples = load_train(axis, config)
        if per_axis is not None and per_axis < len(examples):
            examples = rng.sample(examples, per_axis)
        mixed.extend(examples)
    rng.shuffle(mixed)
    return mixed
