"""Do the experts specialise? Each expert's headline on its own axis against every other expert's on that axis
(a specialist should lead the other two there with a 95% interval excluding 0), and its headlines on the
other axes against the base model's (a specialist must not collapse them).

A difference is oriented so that a positive one means the expert is better (expert − other for a higher-is-better
rate, other − expert for a lower-is-better one such as the flagged rate). Each comes with two 95% paired
bootstrap intervals (``statistics.headline_replicates``): over the axis's prompts with the judge taken as exact,
and, where the judge's validation records its error, over the prompts and the judge's validation set with the
rate corrected. An expert "leads" only when every interval its verdicts read (the judge-aware one where recorded,
as ``statistics.compare`` does for hhh) lies above 0. Everything is computed from results.json and the
judgements; ``write_specialisation`` keeps the figures in ``specialisation.json`` for scripts.
"""

from __future__ import annotations

from collections.abc import Sequence

from h3fusion import runs
from h3fusion.axes import axis_spec
from h3fusion.rates import AxisRates, axis_rates
from h3fusion.report.statistics import (
    difference_interval,
    headline_replicates,
    judge_rates,
    read_interval,
    verdict,
)
from h3fusion.report.tables import metric, report_axes
from h3fusion.stats import BOOTSTRAP_SAMPLES

BASE = "base"
LEADS, DOES_NOT_LEAD, NOT_MEASURED, ALONE = "leads", "does not lead", "not measured", "no other expert evaluated"


def expert_system(axis: str) -> str:
    return f"expert-{axis}"


def _versus(results: dict, axis: str, ours: str, theirs: str, replicates: dict) -> dict:
    """``ours`` against ``theirs`` on ``axis``'s headline: oriented differences (raw, corrected), their paired
    intervals, the verdict and whether the interval it reads excludes 0."""
    spec, systems = axis_spec(axis), results["systems"]
    sign = 1.0 if spec.higher_is_better else -1.0

    def diff(key):
        a, b = metric(systems[ours], axis, key), metric(systems[theirs], axis, key)
        return None if a is None or b is None else sign * (a - b)

    row = {"value": metric(systems[theirs], axis, spec.headline), "diff": diff(spec.headline),
           "interval": difference_interval(replicates.get(ours), replicates.get(theirs), "raw"),
           "corrected_diff": diff(f"{spec.headline}_corrected"),
           "judge_aware_interval": difference_interval(replicates.get(ours), replicates.get(theirs), "corrected")}
    read, judge_aware = read_interval(row)
    said = verdict(row["corrected_diff"] if judge_aware else row["diff"], read)
    return {**row, "judge_aware": judge_aware, "verdict": said.replace("**", ""),
            "excludes_0": read is not None and (read[0] > 0 or read[1] < 0)}


def headline_versus(run: runs.Run, results: dict, axis: str, ours: str, theirs: str, seed: int) -> dict | None:
    """``ours`` against ``theirs`` on ``axis``'s headline (``_versus``, positive: ours better), from their
    judgements; None when either system was not scored on ``axis``."""
    systems = results["systems"]
    if axis not in (systems.get(ours) or {}) or axis not in (systems.get(theirs) or {}):
        return None
    rates = judge_rates(results).get(axis) or axis_rates(axis, None)
    pair = {name: headline_replicates(run, name, axis, rates, seed) for name in (ours, theirs)}
    return _versus(results, axis, ours, theirs, pair)


def specialisation(run: runs.Run, results: dict, experts: Sequence[str], seed: int) -> dict:
    """{"experts": {expert system: its own axis, headline, value (raw, corrected), ``against`` each other expert
    (``_versus``), ``verdict`` (leads / does not lead / not measured / no other expert evaluated) and
    ``other_axes`` against the base model}, "base": the base system or None, "samples": bootstrap resamples}.

    ``experts`` are the run's expert axes (``config.experts``); an expert the results do not hold is left out."""
    systems = results["systems"]
    recorded = judge_rates(results)
    shown = report_axes(results)
    rates: dict[str, AxisRates] = {axis: recorded.get(axis) or axis_rates(axis, None) for axis in shown}
    present = [axis for axis in experts if expert_system(axis) in systems]
    base = BASE if BASE in systems else None
    cache: dict[tuple[str, str], dict | None] = {}

    def replicates_of(system: str, axis: str) -> dict | None:
        if (system, axis) not in cache:
            cache[system, axis] = headline_replicates(run, system, axis, rates[axis], seed)
        return cache[system, axis]

    out = {}
    for axis in present:
        ours = expert_system(axis)
        if axis not in systems[ours] or axis not in rates:
            continue  # the expert's own axis was not evaluated
        spec = axis_spec(axis)
        others = [expert_system(a) for a in present if a != axis and axis in systems[expert_system(a)]]
        pairs = {name: {ours: replicates_of(ours, axis), name: replicates_of(name, axis)} for name in others}
        against = {name: _versus(results, axis, ours, name, pairs[name]) for name in others}
        if not others:
            said = ALONE
        elif any(row["diff"] is None or read_interval(row)[0] is None for row in against.values()):
            said = NOT_MEASURED
        else:
            said = LEADS if all(read_interval(row)[0][0] > 0 for row in against.values()) else DOES_NOT_LEAD
        other_axes = {}
        for other in (a for a in shown if a != axis and a in systems[ours]):
            entry = {"key": axis_spec(other).headline, "higher_is_better": axis_spec(other).higher_is_better,
                     "value": metric(systems[ours], other, axis_spec(other).headline)}
            if base is not None and other in systems[base]:
                pair = {ours: replicates_of(ours, other), base: replicates_of(base, other)}
                entry.update(base=metric(systems[base], other, axis_spec(other).headline),
                             versus_base=_versus(results, other, ours, base, pair))
            other_axes[other] = entry
        out[ours] = {"axis": axis, "key": spec.headline, "headline": spec.headline_text,
                     "higher_is_better": spec.higher_is_better, "value": metric(systems[ours], axis, spec.headline),
                     "value_corrected": metric(systems[ours], axis, f"{spec.headline}_corrected"),
                     "against": against, "verdict": said, "other_axes": other_axes}
    return {"experts": out, "base": base, "samples": BOOTSTRAP_SAMPLES,
            "orientation": "diff > 0: the expert is better (expert − other; other − expert for a lower-is-better "
                           "rate)"}


def write_specialisation(run: runs.Run, figures: dict):
    """``<evaluation root>/specialisation.json``: the figures the report's specialisation section shows."""
    from h3fusion.io import write_json

    out = runs.specialisation_file(run)
    write_json(out, figures)
    return out
