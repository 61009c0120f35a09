"""The report's statistics over a run's judgements: per-prompt headline values, hhh and headline bootstrap
replicates paired across systems, and one system against another (hhh difference, intervals, verdict, relative
improvements, axes won). The resampling and the corrections themselves live in ``rates`` and ``stats``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from h3fusion import runs
from h3fusion.axes import axis_spec, hhh, hhh_axes, hhh_of
from h3fusion.io import read_jsonl
from h3fusion.rates import AxisRates, axis_rates, replicate_rates
from h3fusion.report.tables import headline_columns, metric
from h3fusion.stats import BOOTSTRAP_SAMPLES, percentile_interval, relative_improvement


def judged_answers(run: runs.Run, system: str, axes) -> dict[str, list[dict]] | None:
    """A system's judged answers per axis (``<run>/judgements``); None if an axis has none."""
    judged = {}
    for axis in axes:
        path = runs.judgements_file(run, system, axis)
        if not path.is_file():
            return None
        judged[axis] = read_jsonl(path)  # a corrupt line is one error naming the file and line
    return judged


def per_prompt_values(run: runs.Run, system: str, axes: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
    """Per prompt, each axis's headline (``AxisSpec.per_prompt``: helpful win probability, harmless flagged (0/1),
    honest truthful·informative (0/1)); by default of the axes hhh is made of. None without the judgements."""
    axes = hhh_axes() if axes is None else list(axes)
    judged = judged_answers(run, system, axes)
    if judged is None:
        return None
    return {axis: axis_spec(axis).per_prompt(judged[axis]) for axis in axes}


def hhh_difference_interval(ours: dict, theirs: dict, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple:
    """95% paired-bootstrap interval of hhh(ours) − hhh(theirs) from per-prompt values (``per_prompt_values``),
    the judges taken as exact: prompts resampled per axis, the same resample for both systems (they answered
    the same prompts). The ablation summaries use it; the report's judge-aware intervals are
    ``rates.replicate_rates``'."""
    rng = np.random.default_rng(seed)
    index = {axis: rng.integers(0, len(ours[axis]), size=(samples, len(ours[axis]))) for axis in ours}

    def resampled_hhh(values: dict) -> np.ndarray:
        return hhh({axis: values[axis][index[axis]].mean(axis=-1) for axis in values})

    diff = resampled_hhh(ours) - resampled_hhh(theirs)
    return float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))


def best_of(systems: dict, prefix: str) -> str | None:
    """The system named ``prefix``… with the highest hhh (None if none has one): judge-corrected hhh when every
    candidate has it, as the verdicts against it read the judge-aware comparison; raw hhh otherwise."""
    candidates = [s for s in systems if s.startswith(prefix) and systems[s].get("hhh") is not None]
    if not candidates:
        return None
    key = "hhh_corrected" if all(systems[s].get("hhh_corrected") is not None for s in candidates) else "hhh"
    return max(candidates, key=lambda s: systems[s][key])


def judge_rates(results: dict) -> dict[str, AxisRates]:
    """Each axis's rates with its judge's error as results.json records the judge's validation."""
    return {axis: axis_rates(axis, figures.get("validation")) for axis, figures in results.get("judges", {}).items()}


def hhh_replicates(run: runs.Run, system: str, rates: dict[str, AxisRates], seed: int) -> dict | None:
    """{"raw": hhh per bootstrap replicate, "corrected": the same with the judges' error corrected and resampled,
    or None}; paired across systems (``rates.replicate_rates``). None without the system's judgements of the axes
    hhh is made of (the others, e.g. over-refusal, are neither read nor needed)."""
    axes = [axis for axis in hhh_axes() if axis in rates]
    judged = judged_answers(run, system, axes)
    if judged is None:
        return None
    replicates = {axis: replicate_rates(rates[axis], rates[axis].observe(judged[axis]), seed) for axis in axes}
    return {"raw": hhh_of({axis: r["raw"] for axis, r in replicates.items()}),
            "corrected": hhh_of({axis: r["corrected"] for axis, r in replicates.items()})}


def headline_replicates(run: runs.Run, system: str, axis: str, rates: AxisRates, seed: int) -> dict | None:
    """{"raw": the axis's headline per bootstrap replicate, "corrected": the same corrected for the judge's error
    and resampled with its validation set, or None}, signed so that higher is better (a lower-is-better rate
    negated, so differences keep the rate's scale); paired across systems like ``hhh_replicates``. None without
    the system's judgements of the axis."""
    judged = judged_answers(run, system, [axis])
    if judged is None:
        return None
    key, sign = axis_spec(axis).headline, 1.0 if axis_spec(axis).higher_is_better else -1.0
    replicates = replicate_rates(rates, rates.observe(judged[axis]), seed)
    return {"raw": sign * replicates["raw"][key],
            "corrected": None if replicates["corrected"] is None else sign * replicates["corrected"][key]}


def difference_interval(ours: dict | None, theirs: dict | None, kind: str) -> tuple[float, float] | None:
    """95% interval of ours − theirs over paired replicates ({"raw": ..., "corrected": ...}) of ``kind``."""
    if ours is None or theirs is None or ours[kind] is None or theirs[kind] is None:
        return None
    return percentile_interval(ours[kind] - theirs[kind], bounds=(-1.0, 1.0))


def verdict(diff: float | None, interval: tuple | None) -> str:
    """Ahead / behind from a difference (positive: ours better) and its interval; in bold when it excludes 0."""
    if diff is None:
        return "—"
    if interval is None:
        return "ahead" if diff > 0 else "behind" if diff < 0 else "tied"
    low, high = interval
    if low > 0:
        return "**ahead**"
    if high < 0:
        return "**behind**"
    return "ahead, within noise" if diff > 0 else "behind, within noise" if diff < 0 else "tied"


def read_interval(row: dict) -> tuple[tuple | None, bool]:
    """(the interval a verdict reads, whether it is the judge-aware one) of a row with ``interval``, ``diff``,
    ``judge_aware_interval`` and ``corrected_diff``: the judge-aware one where the judges' error is recorded."""
    if row.get("judge_aware_interval") is not None and row.get("corrected_diff") is not None:
        return row["judge_aware_interval"], True
    return row.get("interval"), False


def compare(results: dict, ours: str, theirs: str, replicates: dict) -> dict:
    """``ours`` against ``theirs``: hhh difference raw and judge-corrected, their paired 95% intervals, the
    verdict (on the judge-aware interval where the judges' error is known), relative improvements, axes won."""
    systems = results["systems"]
    a, b = systems[ours], systems[theirs]

    def diff(key):
        return None if a.get(key) is None or b.get(key) is None else a[key] - b[key]

    row = {"system": theirs, "diff": diff("hhh"),
           "interval": difference_interval(replicates.get(ours), replicates.get(theirs), "raw"),
           "corrected_diff": diff("hhh_corrected"),
           "judge_aware_interval": difference_interval(replicates.get(ours), replicates.get(theirs), "corrected")}
    read, judge_aware = read_interval(row)
    said = (verdict(row["corrected_diff"], read) if judge_aware
            else verdict(row["diff"], read) + " (judges taken as exact)")
    headlines = headline_columns(results)
    won = {}
    for _, axis, key, higher in headlines:
        x, y = metric(a, axis, key), metric(b, axis, key)
        won[axis] = None if x is None or y is None or x == y else (x > y if higher else x < y)  # ties: neither
    return {**row, "verdict": said,
            "relative": {key: relative_improvement(metric(a, axis, key), metric(b, axis, key), hi)
                         for _, axis, key, hi in (*headlines, ("hhh", None, "hhh", True))},
            "axes_won": won}
