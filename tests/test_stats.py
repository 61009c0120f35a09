"""The study's statistics on synthetic judgements with a known judge error: the corrected rate recovers the
true rate, and the judge-aware bootstrap interval covers it at about its nominal 95% (200 simulated studies
per correction; numpy only, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion.rates import FlaggedRate, TruthInfoRates, WinRate, point_rates, replicate_rates
from h3fusion.report.statistics import hhh_difference_interval
from h3fusion.stats import (
    Confusion,
    Reliability,
    joint_correction,
    percentile_interval,
    relative_improvement,
    rogan_gladen,
)

STUDIES = 200
SAMPLES = 500  # bootstrap replicates per study: enough for a 95% percentile interval here
COVERAGE = (0.90, 0.99)  # 95% nominal; 200 studies put the observed coverage within ±0.03 of it (2 sd)


def judge(rng, truth, sensitivity, specificity):
    """A judge's binary decisions on items whose true labels are ``truth``."""
    return np.where(truth, rng.random(len(truth)) < sensitivity, rng.random(len(truth)) >= specificity)


def test_rogan_gladen_inverts_a_known_error_exactly():
    for p in (0.0, 0.1, 0.5, 0.9):
        observed = p * 0.8 + (1 - p) * (1 - 0.7)  # judge: sensitivity 0.8, specificity 0.7
        assert rogan_gladen(observed, 0.8, 0.7) == pytest.approx(p)
    assert rogan_gladen(0.05, 0.8, 0.7) == 0.0  # below the false-positive rate: clipped, not negative
    assert np.isnan(rogan_gladen(0.3, 0.5, 0.5))  # a coin-flip judge carries no information


def test_joint_correction_inverts_two_labels_with_independent_errors():
    true = np.array([0.3, 0.1, 0.4, 0.2])  # cells (T, I) = (1,1), (1,0), (0,1), (0,0)
    m1 = np.array([[0.85, 1 - 0.8], [0.15, 0.8]])  # truth: sensitivity 0.85, specificity 0.8
    m2 = np.array([[0.9, 1 - 0.6], [0.1, 0.6]])  # info: sensitivity 0.9, specificity 0.6
    observed = np.kron(m1, m2) @ true
    np.testing.assert_allclose(joint_correction(observed, (0.85, 0.8), (0.9, 0.6)), true, atol=1e-12)
    # each label's marginal is its own Rogan–Gladen correction
    assert rogan_gladen(observed[0] + observed[1], 0.85, 0.8) == pytest.approx(true[0] + true[1])


def test_confusion_counts_rebuilt_from_rounded_rates_match():
    """Judges fitted before their validation recorded counts: the counts follow from the rounded rates."""
    rng = np.random.default_rng(3)
    truth = rng.random(1057) < 0.57
    confusion = Confusion.of(truth, judge(rng, truth, 0.75, 0.72))
    n = confusion.n
    harmless = {"all": {"n": n, "true_unsafe_rate": round((confusion.tp + confusion.fn) / n, 4),
                        "flagged_rate": round((confusion.tp + confusion.fp) / n, 4),
                        "recall_unsafe": round(confusion.sensitivity, 4),
                        "false_flag_rate_safe": round(1 - confusion.specificity, 4)}}
    rebuilt = FlaggedRate(harmless)
    assert rebuilt.error == confusion and rebuilt.error_source == "reconstructed from rounded rates"
    record = {"n": n, "positive_rate": round((confusion.tp + confusion.fn) / n, 4),
              "predicted_rate": round((confusion.tp + confusion.fp) / n, 4),
              "accuracy": round((confusion.tp + confusion.tn) / n, 4)}
    honest = TruthInfoRates({"truth": {"all": record}, "info": {"all": record}})
    assert all(abs(a - b) <= 1 for a, b in zip(honest.error[0].as_dict().values(), confusion.as_dict().values(),
                                               strict=True))
    assert FlaggedRate({}).error is None and WinRate({"agreement": 0.8}).error is None  # nothing recorded


def coverage(study) -> tuple[float, float, float]:
    """(share of studies whose judge-aware interval covers the truth, of whose raw interval does, mean point error)."""
    covered = raw_covered = 0
    errors = []
    for k in range(STUDIES):
        truth, rates, observations = study(np.random.default_rng(k))
        point = point_rates(rates, observations)
        key = rates.keys[-1]
        errors.append(point[f"{key}_corrected"] - truth)
        replicates = replicate_rates(rates, observations, seed=k, samples=SAMPLES)
        low, high = percentile_interval(replicates["corrected"][key])
        covered += low <= truth <= high
        low, high = percentile_interval(replicates["raw"][key])
        raw_covered += low <= truth <= high
    return covered / STUDIES, raw_covered / STUDIES, float(np.mean(errors))


def test_flagged_rate_corrected_for_a_known_judge_error_covers_the_true_rate():
    def study(rng):
        truth = rng.random(500) < 0.3  # 500 prompts, 30% truly unsafe answers
        flagged = judge(rng, truth, 0.75, 0.72)
        labelled = rng.random(1000) < 0.55  # the judge's own labelled validation set
        validation = {"all": {"confusion": Confusion.of(labelled, judge(rng, labelled, 0.75, 0.72)).as_dict()}}
        judged = [{"label": {"flagged": bool(f)}} for f in flagged]
        rates = FlaggedRate(validation)
        return 0.3, rates, rates.observe(judged)

    covered, raw_covered, bias = coverage(study)
    assert abs(bias) < 0.01  # the corrected rate recovers the true one (the raw one sits at 0.42)
    assert COVERAGE[0] <= covered <= COVERAGE[1]
    assert raw_covered < 0.05  # the judge-blind interval misses the true rate


def test_truthful_informative_corrected_for_known_judge_errors_covers_the_true_rate():
    def study(rng):
        truthful = rng.random(409) < 0.4
        informative = rng.random(409) < np.where(truthful, 0.85, 0.95)  # correlated labels
        judged_t, judged_i = judge(rng, truthful, 0.8, 0.7), judge(rng, informative, 0.95, 0.5)
        val_t, val_i = rng.random(3000) < 0.43, rng.random(3000) < 0.8  # the two heads' validation sets
        validation = {"truth": {"all": {"confusion": Confusion.of(val_t, judge(rng, val_t, 0.8, 0.7)).as_dict()}},
                      "info": {"all": {"confusion": Confusion.of(val_i, judge(rng, val_i, 0.95, 0.5)).as_dict()}}}
        judged = [{"label": {"truthful": bool(t), "informative": bool(i)}} for t, i in zip(judged_t, judged_i,
                                                                                          strict=True)]
        rates = TruthInfoRates(validation)
        return 0.4 * 0.85, rates, rates.observe(judged)

    covered, raw_covered, bias = coverage(study)
    assert abs(bias) < 0.01
    assert COVERAGE[0] <= covered <= COVERAGE[1]
    assert raw_covered < 0.05  # the raw share sits at 0.45


def test_win_rate_corrected_through_the_reliability_curve_covers_the_true_rate():
    def reference_wins(p):  # the reference (GPT-4) prefers the answer less often than the judge says
        return 0.5 * p + 0.02

    def study(rng):
        p_val = rng.beta(1, 3, 2500)  # the judge's validation judgements, broad
        validation = {"reliability": Reliability.of(p_val, rng.random(2500) < reference_wins(p_val)).as_dict()}
        p = rng.beta(1.2, 10, 400)  # a weak system's answers: low win probabilities
        rates = WinRate(validation)
        return reference_wins(1.2 / 11.2), rates, rates.observe([{"score": float(x)} for x in p])

    covered, raw_covered, bias = coverage(study)
    assert abs(bias) < 0.01
    assert COVERAGE[0] <= covered <= COVERAGE[1]
    assert raw_covered < 0.05


def test_replicates_of_two_systems_are_paired():
    """Computed apart, two systems' replicates share the resampled prompts and judge: a system minus itself is 0,
    and the difference of two systems covers the true difference."""
    rng = np.random.default_rng(0)
    labelled = rng.random(1000) < 0.5
    rates = FlaggedRate({"all": {"confusion": Confusion.of(labelled, judge(rng, labelled, 0.8, 0.75)).as_dict()}})
    a = rates.observe([{"label": {"flagged": bool(f)}} for f in judge(rng, rng.random(500) < 0.2, 0.8, 0.75)])
    b = rates.observe([{"label": {"flagged": bool(f)}} for f in judge(rng, rng.random(500) < 0.4, 0.8, 0.75)])
    ra, rb = (replicate_rates(rates, x, seed=7)["corrected"]["flagged_rate"] for x in (a, b))
    assert np.array_equal(ra, replicate_rates(rates, a, seed=7)["corrected"]["flagged_rate"])
    low, high = percentile_interval(rb - ra)
    assert low <= 0.2 <= high and low > 0


def test_reliability_weights_interpolate_between_the_bins():
    table = Reliability((0.1, 0.3, 0.6), (10, 10, 10), (1, 2, 6))  # rates 0.1, 0.2, 0.6
    calibrated = table.weights([0.0, 0.1, 0.2, 0.45, 0.9]) @ table.rates
    np.testing.assert_allclose(calibrated, [0.1, 0.1, 0.15, 0.4, 0.6])  # constant beyond the outer bins


def test_relative_improvement_follows_the_metric_direction():
    assert relative_improvement(0.6, 0.5, higher_is_better=True) == (0.6 - 0.5) / 0.5
    assert relative_improvement(0.1, 0.4, higher_is_better=False) == (0.4 - 0.1) / 0.4  # fewer flagged: better
    assert relative_improvement(0.5, 0.6, higher_is_better=True) < 0
    assert relative_improvement(0.5, 0.0, higher_is_better=True) is None  # undefined, not infinite


def values(rng, win, flagged, ti, n=200):
    return {"helpful": rng.uniform(0, 2 * win, n), "harmless": (rng.uniform(size=n) < flagged).astype(float),
            "honest": (rng.uniform(size=n) < ti).astype(float)}


def test_bootstrap_interval_separates_real_gaps_from_noise():
    rng = np.random.default_rng(1)
    a = values(rng, 0.3, 0.5, 0.2)
    low, high = hhh_difference_interval(a, a)
    assert low == high == 0.0  # a system against itself
    better = {**a, "harmless": np.zeros_like(a["harmless"])}  # never flagged: hhh up by mean(flagged)/3
    low, high = hhh_difference_interval(better, a)
    gap = a["harmless"].mean() / 3
    assert 0 < low < gap < high
    noisy = values(np.random.default_rng(2), 0.3, 0.5, 0.2)  # same rates, different draws
    low, high = hhh_difference_interval(noisy, a)
    assert low < 0 < high


def test_replicates_of_an_uninformative_judge_widen_the_interval():
    """A resampled judge with sensitivity + specificity <= 1 gives NaN: it could be anything, so it counts at both
    ends, and beyond the tail's share the interval is the whole range."""
    values = np.linspace(0.4, 0.6, 1000)
    assert percentile_interval(values) == pytest.approx((0.405, 0.595), abs=1e-3)
    some = np.concatenate([values, [np.nan] * 10])  # 1% unknown: the finite quantiles move inwards
    low, high = percentile_interval(some)
    assert low < 0.405 and high > 0.595
    many = np.concatenate([values, [np.nan] * 30])  # 2.9% unknown
    assert percentile_interval(many) == (0.0, 1.0)
    assert percentile_interval(many, bounds=(-1.0, 1.0)) == (-1.0, 1.0)
    assert percentile_interval(np.array([np.nan, np.nan])) is None


def test_a_cross_fitted_judge_is_corrected_with_its_folds_pooled():
    """Validation records of fold judges (under ``folds``): confusion counts added, reliability bins added up."""
    a, b = Confusion(10, 5, 3, 12), Confusion(7, 8, 4, 11)
    rates = FlaggedRate({"folds": [{"all": {"confusion": a.as_dict()}}, {"all": {"confusion": b.as_dict()}}]})
    assert rates.error == a + b == Confusion(17, 13, 7, 23) and "pooled over 2 folds" in rates.error_source
    first = Reliability((0.01, 0.3), (10, 20), (1, 6))  # bins [0, .02) and [.3, .4)
    second = Reliability((0.015, 0.03, 0.35), (30, 5, 10), (3, 1, 5))  # [0, .02), [.02, .05), [.3, .4)
    pooled = WinRate({"folds": [{"reliability": first.as_dict()}, {"reliability": second.as_dict()}]}).error
    assert pooled.n == (40, 5, 30) and pooled.wins == (4, 1, 11)
    assert pooled.mean_probability == pytest.approx(((0.01 * 10 + 0.015 * 30) / 40, 0.03, (0.3 * 20 + 0.35 * 10) / 30))
    assert FlaggedRate({"folds": [{"all": {"confusion": a.as_dict()}}, {"all": {}}]}).error is None  # one fold unknown
