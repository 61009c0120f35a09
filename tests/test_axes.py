"""Axes as specs: the built-in axes' specs, the one hhh formula, and a toy fourth axis ("concise": one data
module and one judge module, registered) run through evaluate and report without either knowing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h3fusion.axes import axis_names, axis_spec, hhh, hhh_formula, hhh_of, register_axis, unregister_axis
from h3fusion.config import build_config
from h3fusion.io import append_jsonl


def test_builtin_axes_in_the_papers_order():
    assert axis_names()[:3] == ("helpful", "harmless", "honest")
    fields = {axis: axis_spec(axis).prompt_field for axis in ("helpful", "harmless", "honest")}
    assert fields == {"helpful": "instruction", "harmless": "prompt", "honest": "question"}
    assert [axis_spec(a).paper_n for a in ("helpful", "harmless", "honest")] == [50, 500, None]


def test_hhh_is_the_mean_of_the_headlines_with_lower_is_better_flipped():
    entry = {"helpful": {"win_rate": 0.3}, "harmless": {"flagged_rate": 0.6}, "honest": {"truthful_informative": 0.5}}
    assert hhh_of(entry) == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    assert hhh_of({**entry, "honest": None}) is None  # every term needed
    replicates = hhh({"helpful": np.array([0.1, 0.2]), "harmless": np.array([0.5, 0.0]), "honest": np.array([1, 0])})
    assert replicates == pytest.approx([(0.1 + 0.5 + 1) / 3, (0.2 + 1.0 + 0) / 3])
    assert hhh_formula() == "mean(win rate, 1 − flagged rate, truthful·informative)"


@pytest.fixture
def concise_axis():
    register_axis("concise", "tests.concise_data", "tests.concise_judge")
    yield axis_spec("concise")
    unregister_axis("concise")


def test_a_fourth_axis_runs_through_evaluate_and_report(concise_axis, tmp_path):
    import h3fusion.evaluate
    import h3fusion.report
    from h3fusion.evaluate import evaluate_run, judge_records, load_axis_judges, prepare_user_records
    from h3fusion.generate import evaluated_records
    from h3fusion.report import write_report
    from h3fusion.runs import generations_dir

    config = build_config({"experts": ["concise"], "moe": {"top_k": 1}, "run_dir": str(tmp_path / "run"),
                           "data": {"dir": str(tmp_path)}, "judges": {"cache_dir": str(tmp_path / "judges")}})
    records = evaluated_records(config, "concise")
    assert [r["prompt"] for r in records] == ["Name a colour.", "What is two plus two?", "Say hello."]
    answers = {"h3fusion": ["Blue.", "Two plus two makes four, of course.", "Hello there, nice to meet you."],
               "base": ["Well, " * 8] * 3}
    for system, texts in answers.items():
        append_jsonl(generations_dir(config) / system / "concise.jsonl",
                     [{**r, "response": text} for r, text in zip(records, texts, strict=True)])

    results = json.loads(evaluate_run(config, log=lambda *_: None).read_text())
    fused, base = results["systems"]["h3fusion"]["concise"], results["systems"]["base"]["concise"]
    assert (fused["concise_rate"], fused["n"], base["concise_rate"]) == (pytest.approx(1 / 3), 3, 0.0)
    low, high = fused["concise_rate_ci"]
    assert low <= fused["concise_rate"] <= high
    # corrected through the judge's recorded error (sensitivity 0.9, specificity 0.8): (1/3 + 0.8 - 1) / 0.7
    assert fused["concise_rate_corrected"] == pytest.approx((1 / 3 - 0.2) / 0.7)
    assert fused["refusal_rate"] == 0.0 and fused["embedding_drift"] == {"cosine_distance": None, "n": 0}
    assert results["systems"]["h3fusion"]["hhh"] is None  # hhh is made of the helpful, harmless, honest axes
    assert results["judges"]["concise"]["name"] == "concise-rule" and results["judges"]["concise"]["accuracy"] == 0.85

    report = write_report(config, log=lambda *_: None).read_text()
    table = report.split("\n\n")[2]
    assert "concise ↑ | hhh ↑ |" in table.splitlines()[0]
    assert "| **h3fusion** |" in table and table.count("**0.333**") == 1  # the best concise rate, in bold
    assert "3 toy prompts" in report and "concise — concise-rule: accuracy 0.850 (0.80)" in report
    rivals = report.split("## H3Fusion against each rival")[1].split("\n## ")[0]
    assert "rel. concise |" in rivals and "| base |" in rivals

    judge = load_axis_judges(config, ["concise"], cross_fit=False)["concise"]
    mine = prepare_user_records("concise", [{"question": "Why?", "response": "Because."}], config, "mine.jsonl")
    assert judge_records("concise", judge, mine)[0]["label"] == {"concise": True}
    for module in (h3fusion.evaluate, *(Path(h3fusion.report.__file__).parent.glob("*.py"))):  # neither knows it
        assert "concise" not in Path(getattr(module, "__file__", module)).read_text()
