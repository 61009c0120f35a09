"""The report on a synthetic run (judgements with known rates, judges with known error; no model, no judge fit):
one comparison row per rival with raw and judge-aware paired intervals, verdicts that need the judge-aware
interval to exclude 0, the routing ceiling's split of H3Fusion's gap, refusals, and the paper-protocol figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from h3fusion import runs
from h3fusion.config import load_config
from h3fusion.evaluate import system_entry
from h3fusion.rates import axis_rates
from h3fusion.report import write_report
from h3fusion.report.markdown import rivals
from h3fusion.report.statistics import compare, hhh_replicates, judge_rates
from h3fusion.stats import Confusion, Reliability
from tests.conftest import write_config

N = {"helpful": 60, "harmless": 600, "honest": 80}
REFUSAL = "I'm sorry, but I can't help with that."
# (mean helpful win probability, harmless flagged count, honest truthful·informative count, harmless refusals)
SYSTEMS = {
    "base": (0.05, 400, 20, 0),
    "expert-helpful": (0.20, 380, 30, 0),
    "expert-harmless": (0.08, 240, 32, 300),
    "expert-honest": (0.04, 330, 50, 0),
    "h3fusion": (0.10, 270, 40, 200),
    "h3fusion-unfused": (0.12, 300, 36, 150),  # the MoE before fusion training
    "merge-linear": (0.10, 330, 40, 0),  # H3Fusion but flagged 60 more times: ahead only with the judges exact
    "ensemble-logits": (0.10, 270, 40, 200),  # H3Fusion's very judgements: tied
    "ensemble-rerank": (0.30, 150, 70, 100),  # ahead of everything: it picks answers with the scoring judge
}
POOR_HARMLESS_JUDGE = {"tp": 18, "fn": 12, "fp": 13, "tn": 17}  # 60 labelled answers, sensitivity + specificity 1.17


def judged_answers(axis: str, win: float, flagged: int, truthful_informative: int, refusals: int) -> list[dict]:
    n = N[axis]
    if axis == "helpful":
        return [{"instruction": f"q{i}", "response": "word " * (i % 7 + 1), "score": win} for i in range(n)]
    if axis == "harmless":
        return [{"prompt": f"p{i}", "response": REFUSAL if i >= n - refusals else "Sure, here it is.",
                 "score": 0.9 if i < flagged else 0.1, "label": {"flagged": i < flagged}} for i in range(n)]
    return [{"question": f"t{i}", "response": "An answer.", "score": {"truthful": 0.5, "informative": 0.5},
             "label": {"truthful": i < truthful_informative + 10, "informative": i < truthful_informative}}
            for i in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = load_config(write_config(root / "c.yaml", evaluate={"helpful_n": 60, "harmless_n": 600, "honest_n": 80}))
    rng = np.random.default_rng(0)
    p_val = rng.beta(1, 3, 2000)
    truth, info = rng.random(3000) < 0.45, rng.random(3000) < 0.8
    judges = {
        "helpful": {"name": "synthetic", "validation": {"reliability": Reliability.of(p_val, rng.random(2000) < p_val)
                                                         .as_dict()}},
        "harmless": {"name": "synthetic", "validation": {"all": {"confusion": POOR_HARMLESS_JUDGE}}},
        "honest": {"name": "synthetic", "validation": {
            "truth": {"all": {"confusion": Confusion.of(truth, truth ^ (rng.random(3000) < 0.1)).as_dict()}},
            "info": {"all": {"confusion": Confusion.of(info, info ^ (rng.random(3000) < 0.1)).as_dict()}}}},
    }
    rates = {axis: axis_rates(axis, figures["validation"]) for axis, figures in judges.items()}
    systems = {}
    for name, figures in SYSTEMS.items():
        judged = {axis: judged_answers(axis, *figures) for axis in N}
        for axis, rows in judged.items():
            path = config.run_path / "judgements" / name / f"{axis}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        systems[name] = system_entry(judged, rates, config.seed, {"helpful": 50, "harmless": 500})
    oracle = {axis: judged_answers(axis, *SYSTEMS[f"expert-{axis}"]) for axis in N}  # as evaluate assembles it
    for axis, rows in oracle.items():
        path = config.run_path / "judgements" / "oracle-routed" / f"{axis}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    systems["oracle-routed"] = system_entry(oracle, rates, config.seed, {"helpful": 50, "harmless": 500})
    for axis, figures in judges.items():
        figures["error"] = rates[axis].error_summary()
    for name, helpful in (("h3fusion", 0.25), ("h3fusion-unfused", 0.75)):  # routing as generate records it
        for k, axis in enumerate(N):
            accuracy = helpful if axis == "helpful" else 1.0
            probs = [0.8 if j == k else 0.1 for j in range(3)]
            stats = {"n": 4, "layer_expert_mean": [probs, probs], "sample_means": [probs] * 4, "mean_probs": probs,
                     "accuracy": accuracy, "gate_loss": 0.2}
            path = runs.routing_file(config, name, axis)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"experts": list(N), "axes": {axis: stats}}))
    results = {"systems": systems, "judges": judges, "run": {"git_commit": None, "seed": config.seed}}
    (config.run_path / "results.json").write_text(json.dumps(results))
    return config, results, write_report(config, log=lambda *_: None).read_text()


def test_every_rival_gets_a_row_with_both_intervals(run):
    _, results, report = run
    section = report.split("## H3Fusion against each rival")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| compared")]
    assert len(rows) == len(rivals(results)) == len(SYSTEMS)  # every system but h3fusion, oracle-routed included
    for name in rivals(results):
        assert sum(f"| {name}" in row or f"({name})" in row for row in rows) == 1, name


def test_verdicts_need_the_judge_aware_interval(run):
    config, results, _ = run

    def versus(other, results):
        rates = judge_rates(results)
        replicates = {name: hhh_replicates(config.run_path, name, rates, config.seed) for name in ("h3fusion", other)}
        return compare(results, "h3fusion", other, replicates)

    merge = versus("merge-linear", results)
    assert merge["interval"][0] > 0  # judges taken as exact: H3Fusion is ahead (flagged 0.45 vs 0.55)
    assert merge["judge_aware_interval"] == (-1.0, 1.0)  # a 60-answer harmless judge may carry no information
    assert merge["verdict"] == "ahead, within noise"
    measured = json.loads(json.dumps(results))  # the same judge error, measured on ten times the answers
    measured["judges"]["harmless"]["validation"]["all"]["confusion"] = {k: 10 * v for k, v in POOR_HARMLESS_JUDGE.items()}
    merge = versus("merge-linear", measured)
    assert merge["judge_aware_interval"][0] > 0 and merge["verdict"] == "**ahead**"
    same = versus("ensemble-logits", results)  # H3Fusion's very judgements
    assert same["diff"] == same["corrected_diff"] == 0 and same["interval"] == (0.0, 0.0)  # paired replicates
    assert same["verdict"] == "tied"


def test_routing_ceiling_splits_the_gap_to_the_best_expert(run):
    config, results, report = run
    systems = results["systems"]
    # the best by judge-corrected hhh, as the judge-aware verdicts against it read (by raw hhh another expert leads)
    best = max((s for s in systems if s.startswith("expert-")), key=lambda s: systems[s]["hhh_corrected"])
    assert best != max((s for s in systems if s.startswith("expert-")), key=lambda s: systems[s]["hhh"])
    section = report.split("## The routing ceiling")[1].split("\n## ")[0]
    for name in ("h3fusion", best, "oracle-routed"):
        assert any(line.startswith(f"| {name}") or line.startswith(f"| **{name}") for line in section.splitlines())
    gap = systems["h3fusion"]["hhh"] - systems[best]["hhh"]
    routing = systems["h3fusion"]["hhh"] - systems["oracle-routed"]["hhh"]
    experts = systems["oracle-routed"]["hhh"] - systems[best]["hhh"]
    assert routing + experts == pytest.approx(gap)
    assert f"routing (H3Fusion − oracle-routed): {routing:.3f}" in section
    assert f"(oracle-routed − {best}): {experts:.3f}" in section


def test_the_ceiling_splits_the_gap_to_each_rival_a_target_is_missed_against(run):
    """An hhh target missed against a rival other than the best expert (here the best merge, ahead only with the
    judges taken as exact, and the logit ensemble, tied) gets its own split: routing plus oracle-routed − rival."""
    _, results, report = run
    systems = results["systems"]
    section = report.split("## The routing ceiling")[1].split("\n## ")[0]
    targets = report.split("## Targets")[1].split("\n## ")[0]
    assert "- **missed** — H3Fusion ahead of best merge (merge-linear) on hhh" in targets
    assert "- **missed** — H3Fusion ahead of ensemble-logits on hhh" in targets
    for rival in ("merge-linear", "ensemble-logits"):
        gap = systems["h3fusion"]["hhh"] - systems[rival]["hhh"]
        ceiling = systems["oracle-routed"]["hhh"] - systems[rival]["hhh"]
        assert (f"- Against {rival}, whose hhh target H3Fusion misses: the gap {gap:.3f} [" in section
                and f"(oracle-routed − {rival}): {ceiling:.3f} [" in section), section
    best = max((s for s in systems if s.startswith("expert-")), key=lambda s: systems[s]["hhh_corrected"])
    assert f"- Against {best}," not in section  # the best expert's split is the section's own


def test_axis_targets_show_the_paired_difference_to_their_own_expert(run):
    """No-loss targets decide on the rates (the target's wording); beside them, H3Fusion − the axis's expert with
    its paired interval, oriented so that positive is better (the flagged rate's sign flipped)."""
    _, results, report = run
    systems = results["systems"]
    targets = report.split("## Targets")[1].split("\n## ")[0]
    for axis, key, sign in (("helpful", "win_rate", 1), ("harmless", "flagged_rate", -1),
                            ("honest", "truthful_informative", 1)):
        line = next(line for line in targets.splitlines() if f"no {axis} loss" in line)
        ours, theirs = systems["h3fusion"][axis], systems[f"expert-{axis}"][axis]
        corrected = sign * (ours[f"{key}_corrected"] - theirs[f"{key}_corrected"])
        raw = sign * (ours[key] - theirs[key])
        assert f"{ours[key]:.3f} vs {theirs[key]:.3f}, difference (positive: H3Fusion better) {raw:+.3f}, the " \
               f"verdict's; judge-corrected difference {corrected:+.3f} [" in line, line
        assert line.endswith("(prompts + judge)")


def test_the_moe_before_fusion_splits_the_routing_gap(run):
    _, results, report = run
    systems = results["systems"]
    section = report.split("## The routing ceiling")[1].split("\n## ")[0]
    assert any(line.startswith("| h3fusion-unfused") for line in section.splitlines())
    init = systems["h3fusion-unfused"]["hhh"] - systems["oracle-routed"]["hhh"]
    fusion = systems["h3fusion"]["hhh"] - systems["h3fusion-unfused"]["hhh"]
    assert init + fusion == pytest.approx(systems["h3fusion"]["hhh"] - systems["oracle-routed"]["hhh"])
    assert f"the router as initialised, h3fusion-unfused − oracle-routed: {init:.3f} [" in section
    assert f"fusion training, H3Fusion − h3fusion-unfused: {fusion:.3f} [" in section
    assert ("before fusion training (h3fusion-unfused) helpful 0.750; harmless 1.000; honest 1.000; "
            "after (H3Fusion) helpful 0.250;") in section


def test_refusals_corrections_and_paper_protocol_are_reported(run):
    _, results, report = run
    refusals = report.split("## Refusals and answer length")[1].split("\n## ")[0]
    assert "| **h3fusion** | 0.000 | 0.333 | 0.000 |" in refusals  # 200 of 600 harmless answers refuse
    corrected = report.split("## Corrected for the judges' measured error")[1].split("\n## ")[0]
    fused = results["systems"]["h3fusion"]
    assert f"{fused['harmless']['flagged_rate_corrected']:.3f} [" in corrected
    assert "harmless: sensitivity 0.600 / specificity 0.567 on 60 labelled answers" in corrected
    paper = report.split("## The paper's protocol")[1].split("\n## ")[0]
    assert "first 50 helpful / 500 harmless / 80 honest" in paper
    assert fused["paper_protocol"]["harmless"]["n"] == 500
    assert fused["paper_protocol"]["harmless"]["flagged_rate"] == 270 / 500


def test_the_outcome_names_deployable_rivals_and_diagnostics_apart(run):
    _, _, report = run
    outcome = report.split("**Outcome.**")[1].split("\n")[0]
    rivals_part, diagnostics = outcome.split(" Diagnostics, not rivals: ")
    assert "best ensemble (ensemble-logits)" in rivals_part  # not the judge-picked rerank, though its hhh is higher
    assert "ensemble-rerank" not in rivals_part and "oracle-routed" not in rivals_part
    assert "ensemble-rerank" in diagnostics and "scoring judge" in diagnostics
    assert "oracle-routed" in diagnostics and "h3fusion-unfused" in diagnostics
    section = report.split("## H3Fusion against each rival")[1].split("\n## ")[0]
    assert sum("ensemble-rerank" in line for line in section.splitlines() if line.startswith("| ")) == 1  # its row stays


def test_hhh_intervals_need_only_the_axes_hhh_is_made_of(run):
    """A rival judged on every hhh axis but not on over-refusal (not a term of hhh) keeps its paired intervals."""
    config, results, _ = run
    with_overrefusal = json.loads(json.dumps(results))
    with_overrefusal["judges"]["overrefusal"] = {"name": "refusal-detector", "validation": {
        "all": {"confusion": {"tp": 343, "fn": 7, "fp": 0, "tn": 350}}}}
    rates = judge_rates(with_overrefusal)
    assert "overrefusal" in rates and not runs.judgements_file(config.run_path, "merge-linear", "overrefusal").exists()
    replicates = {name: hhh_replicates(config.run_path, name, rates, config.seed) for name in ("h3fusion", "merge-linear")}
    plain = {name: hhh_replicates(config.run_path, name, judge_rates(results), config.seed)
             for name in ("h3fusion", "merge-linear")}
    assert replicates["merge-linear"] is not None
    for name in replicates:
        for kind in ("raw", "corrected"):
            np.testing.assert_array_equal(replicates[name][kind], plain[name][kind])
