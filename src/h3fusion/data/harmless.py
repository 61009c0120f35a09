"""Stage 0 (data), harmless axis: safe answers for training, BeaverTails 30k_test for testing.

Paper: train on BeaverTails 30k_train rows with is_safe=True (the hub path does this). Offline
that split is unavailable, so the substitute is PKU-SafeRLHF's safer response plus the
safety-tuned-llamas refusals. Either way no training prompt may be a test prompt.
"""

from __future__ import annotations

import copy
from typing import Any

from h3fusion.config import RunConfig
from h3fusion.data import helpful
from h3fusion.data.alarming import is_alarming
from h3fusion.data.examples import SFTExample
from h3fusion.data.sources import (
    HubSource,
    check_fields,
    data_root,
    hub_rows,
    load_rows,
    norm,
    sample_with_share,
    seed_of,
    where,
)
from h3fusion.errors import H3FusionError
from h3fusion.refusal import is_refusal

TEST_FILE = "beavertails/30k_test_noresponse.jsonl"
TEST_HUB = HubSource("PKU-Alignment/BeaverTails", split="30k_test")
TRAIN_HUB = HubSource("PKU-Alignment/BeaverTails", split="30k_train")
SAFERLHF_FILE = "pku_saferlhf/pku_seferlhf_realign_dpo_5k.json"
REFUSALS_FILE = "safety_tuned_llamas/safety_only_data_Instructions.json"
LABELLED_FILES = (
    "beavertails_test_responses/30k_test_filtered.jsonl",
    "beavertails_test_responses/30k_test_unsafe_filtered.jsonl",
)
PROMPT_FIELD = "prompt"
TEST_SET = "BeaverTails prompts"
PAPER_N = 500
"""The paper scores the first 500 BeaverTails 30k_test prompts."""
_NO_HUB = "PKU-Alignment/BeaverTails (its 30k_train is_safe rows replace this offline substitute)"


def _test_rows(config: RunConfig):
    return load_rows(config, TEST_FILE, TEST_HUB, ("prompt", "category", "is_safe"))


def _test_prompts(config: RunConfig) -> set[str]:
    return {norm(r["prompt"]) for r in _test_rows(config)}


def load_test(config: RunConfig) -> list[dict[str, Any]]:
    """BeaverTails 30k_test prompts, one per distinct stripped prompt, in file order.

    category / is_safe are those of the prompt's first row (the split repeats prompts with
    different responses; the test only feeds the prompt to the model).
    """
    out: dict[str, dict[str, Any]] = {}
    for r in _test_rows(config):
        prompt = r["prompt"].strip()
        if prompt not in out:
            out[prompt] = {"id": len(out), "prompt": prompt, "category": dict(r["category"]), "is_safe": r["is_safe"]}
    return list(out.values())


def saferlhf_examples(config: RunConfig) -> list[SFTExample]:
    """PKU-SafeRLHF ``response[0]`` (the safe one of each pair) for prompts outside 30k_test."""
    test = _test_prompts(config)
    rows = load_rows(config, SAFERLHF_FILE, _NO_HUB, ("prompt", "response"))
    out = []
    for i, r in enumerate(rows):
        if not (isinstance(r["response"], list) and r["response"] and isinstance(r["response"][0], str)):
            raise H3FusionError(
                f"{where(config, SAFERLHF_FILE, _NO_HUB)}: record {i} 'response' should be a list "
                "[safer, other] of strings; re-copy it from the source listed in shared/data/SOURCES.md"
            )
        if norm(r["prompt"]) not in test:
            out.append(SFTExample("harmless", r["prompt"], "", r["response"][0], f"pku_saferlhf:{i}"))
    return out


def refusal_examples(config: RunConfig) -> list[SFTExample]:
    """safety-tuned-llamas: harmful requests with refusing or correcting answers (none is a test prompt)."""
    test = _test_prompts(config)
    rows = load_rows(config, REFUSALS_FILE, _NO_HUB, ("instruction", "input", "output"))
    return [
        SFTExample("harmless", r["instruction"], r["input"] or "", r["output"], f"safety_tuned_llamas:{i}")
        for i, r in enumerate(rows)
        if norm(r["instruction"]) not in test and norm(f"{r['instruction']} {r['input'] or ''}") not in test
    ]


def hub_examples(config: RunConfig) -> list[SFTExample]:
    """The paper's set: BeaverTails 30k_train rows with is_safe=True, minus any 30k_test prompt."""
    test = _test_prompts(config)
    rows = hub_rows(TRAIN_HUB)
    check_fields(rows, ("prompt", "response", "is_safe"), str(TRAIN_HUB))
    return [
        SFTExample("harmless", r["prompt"], "", r["response"], f"beavertails_30k_train:{i}")
        for i, r in enumerate(rows)
        if r["is_safe"] and norm(r["prompt"]) not in test
    ]


def train_pool(config: RunConfig) -> list[SFTExample]:
    """All harmless examples without empty answers or exact repeats."""
    # PKU-SafeRLHF pairs one safe answer with several unsafe ones, so response[0] repeats a lot
    found = hub_examples(config) if data_root(config) is None else saferlhf_examples(config) + refusal_examples(config)
    seen: set[tuple[str, str, str]] = set()
    pool = []
    for ex in found:
        key = (ex.instruction, ex.input, ex.response)
        if ex.response.strip() and key not in seen:
            seen.add(key)
            pool.append(ex)
    return pool


def is_refusing(example: SFTExample) -> bool:
    return is_refusal(example.response)


def load_train(config: RunConfig) -> list[SFTExample]:
    """A seeded sample of ``data.harmless_train_size`` examples (None: all), ``data.harmless_refusal_share``
    of them refusals when set."""
    return sample_with_share(train_pool(config), config.data.harmless_train_size, seed_of(config),
                             config.data.harmless_refusal_share, is_refusing, "harmless examples")


def benign_examples(config: RunConfig) -> list[SFTExample]:
    """``data.harmless_benign_examples`` benign Alpaca examples for the harmless expert (seeded; in file order):
    instructions without input, outside the helpful dev pool, whose answers comply; half of them use alarming
    words (``data.alarming``), so the expert learns to answer requests that only sound harmful."""
    wanted = config.data.harmless_benign_examples
    if not wanted:
        return []
    candidates = [e for e in helpful.outside_dev_pool(config) if not e.input and not is_refusal(e.response)]
    picked = sample_with_share(candidates, wanted, seed_of(config) + 3, 0.5, lambda e: is_alarming(e.instruction),
                               "benign examples (data.harmless_benign_examples)")
    return [SFTExample("harmless", e.instruction, "", e.response, e.source) for e in picked]


def expert_extras(config: RunConfig) -> list[SFTExample]:
    """Examples the harmless expert trains on beyond the axis's own: the benign ones (fusion never sees them)."""
    return benign_examples(config)


def load_dev(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` distinct 30k_test prompts, renumbered from 0: never among the evaluated first
    ``evaluate.harmless_n`` (refused when the two would overlap)."""
    records = load_test(config)
    if limit + config.evaluate.harmless_n > len(records):
        raise H3FusionError(
            f"evaluate.dev_n {limit} + evaluate.harmless_n {config.evaluate.harmless_n} exceed the "
            f"{len(records)} distinct BeaverTails test prompts: lower one so dev and test stay disjoint"
        )
    return [{**r, "id": i} for i, r in enumerate(records[len(records) - limit:])]


def load_labelled_test_responses(config: RunConfig) -> list[dict[str, Any]]:
    """Labelled (prompt, response) pairs of 30k_test, for validating a harmfulness judge only.

    Local: the two ChanLiang/VAA files (safe rows, then unsafe rows). Hub: the same rule they were
    built with -- for each is_safe value, the first row of each stripped prompt.
    """
    fields = ("prompt", "response", "is_safe", "category")
    if data_root(config) is not None:
        rows = [r for name in LABELLED_FILES for r in load_rows(config, name, TEST_HUB, fields)]
    else:
        firsts: dict[tuple[bool, str], dict[str, Any]] = {}
        for r in load_rows(config, TEST_FILE, TEST_HUB, fields):
            firsts.setdefault((bool(r["is_safe"]), r["prompt"].strip()), r)
        rows = [r for (safe, _), r in firsts.items() if safe] + [r for (safe, _), r in firsts.items() if not safe]
    return [{k: copy.deepcopy(r[k]) for k in fields} for r in rows]


def references(config: RunConfig, records: list[dict[str, Any]]) -> list[str | None]:
    """The aligned reference answer of each test record: a labelled safe BeaverTails answer to the same prompt
    (case and spacing ignored; None where there is none)."""
    safe: dict[str, str] = {}
    for row in load_labelled_test_responses(config):
        if row["is_safe"]:
            safe.setdefault(" ".join(row["prompt"].split()).lower(), row["response"])
    return [safe.get(" ".join(r["prompt"].split()).lower()) for r in records]
