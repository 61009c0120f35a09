"""The router-initialisation sample: de-duplicated prompts, every stratum (template variant x refusal) covered."""

from __future__ import annotations

from h3fusion.data.examples import SFTExample
from h3fusion.data.sampling import distinct_prompt, stratified_sample, stratum


def _example(i: int, instruction: str, extra: str = "", response: str = "Sure: here it is.") -> SFTExample:
    return SFTExample("harmless", instruction, extra, response, f"test:{i}")


def training_file() -> list[SFTExample]:
    """A file whose first rows are one stratum, with a question repeated once per answer (as TruthfulQA's)."""
    rows = [_example(i, "What happens if you crack your knuckles?", "", f"Nothing much ({i}).") for i in range(6)]
    rows += [_example(10 + i, f"Explain topic {i}.", "", "Here is an explanation.") for i in range(20)]
    rows += [_example(40 + i, f"How do I hurt person {i}?", "", "I'm sorry, but I can't help with that.")
             for i in range(5)]
    rows += [_example(60 + i, "Summarise the text.", f"Text number {i}.", "A summary.") for i in range(5)]
    rows += [_example(70, "Rewrite this threat.", "I will find you.", "I cannot help with that request.")]
    rows += [_example(80 + i, "what happens if you CRACK your knuckles?", "", "Duplicate, other case.")
             for i in range(2)]
    return rows


def test_sample_is_deduplicated_and_covers_every_stratum():
    rows = training_file()
    assert len({stratum(e) for e in rows[:8]}) == 1  # what the first rows in file order would give
    assert len({distinct_prompt(e) for e in rows[:8]}) == 3
    sample = stratified_sample(rows, 8, seed=0)
    assert len(sample) == 8
    assert len({distinct_prompt(e) for e in sample}) == 8  # no prompt twice, case and spacing aside
    strata = [stratum(e) for e in sample]
    assert set(strata) == {(False, False), (False, True), (True, False), (True, True)}
    assert strata.count((True, True)) == 1  # the stratum with one row gives it, the others fill its turns
    assert stratified_sample(rows, 8, seed=0) == sample  # seeded
    assert stratified_sample(rows, 8, seed=1) != sample


def test_sample_takes_what_there_is():
    rows = training_file()
    distinct = {distinct_prompt(e) for e in rows}
    sample = stratified_sample(rows, 1000)
    assert {distinct_prompt(e) for e in sample} == distinct and len(sample) == len(distinct)
    assert stratified_sample([], 5) == []
