"""Stage 0 (data): a stratified, de-duplicated sample of an axis's training examples.

Router initialisation (``moe.router_init: prototype | fitted``) fits each layer's router on a few
prompts per axis. The first rows of a training file are a poor sample of it: the honest file repeats a
question once per correct answer, and the harmless file's first rows can hold no refusal at all. This
sample keeps one example per distinct prompt (instruction + input) and takes the strata in turn: with
and without an input (the two Alpaca templates), refusing and complying answers (``h3fusion.refusal``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from h3fusion.data.examples import SFTExample
from h3fusion.refusal import is_refusal


def stratum(example: SFTExample) -> tuple[bool, bool]:
    """(has an input, answer refuses): the template variant and the kind of answer."""
    return bool(example.input.strip()), is_refusal(example.response)


def distinct_prompt(example: SFTExample) -> tuple[str, str]:
    """What makes two examples the same prompt: the instruction and input, case and spacing aside."""
    return " ".join(example.instruction.lower().split()), " ".join(example.input.lower().split())


def stratified_sample(examples: Sequence[SFTExample], n: int, seed: int = 0) -> list[SFTExample]:
    """Up to ``n`` examples with distinct prompts, the strata taken in turn (a seeded shuffle within each),
    so every stratum present is represented and none takes more than its turn while others have rows."""
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    seen: set[tuple[str, str]] = set()
    strata: dict[tuple[bool, bool], list[SFTExample]] = {}
    for example in rows:
        key = distinct_prompt(example)
        if key not in seen:
            seen.add(key)
            strata.setdefault(stratum(example), []).append(example)
    queues = [strata[key] for key in sorted(strata)]
    sample: list[SFTExample] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if turn < len(queue) and len(sample) < n:
                sample.append(queue[turn])
    return sample
