"""A toy fourth axis for tests, its judge module: an answer of at most ``MAX_WORDS`` words is concise.

Its "fit" writes the measured error of a rule judged on 20 labelled answers, so its rates are corrected
like the built-in axes' (``rates``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.axes import AxisSpec, Column, Figure
from h3fusion.io import write_json
from h3fusion.judges.base import Judge, judged_by_probability
from h3fusion.rates import LabelShareRate

VERSION = "1"
DATA_FILES: tuple[str, ...] = ()
MAX_WORDS = 5
TARGETS = {"accuracy": 0.80}
CONFUSION = {"tp": 9, "fn": 1, "fp": 2, "tn": 8}


def fit(config, out: Path, embedder, log=print, max_rows=None, **_) -> dict[str, Any]:
    validation = {"judge": ConciseJudge.name, "accuracy": 0.85, "all": {"confusion": CONFUSION}, "targets": TARGETS}
    write_json(out / "validation.json", validation)
    write_json(out / "meta.json", {"axis": "concise", "judge": ConciseJudge.name, "files": []})
    return validation


class ConciseJudge(Judge):
    name = "concise-rule"
    axis = "concise"

    def score(self, records) -> list[float]:
        return [1.0 if len(str(r["response"]).split()) <= MAX_WORDS else 0.0 for r in records]


class ConciseRate(LabelShareRate):
    axis, key, label, higher = "concise", "concise_rate", "concise", True


def metrics(judged) -> dict[str, Any]:
    return {"concise_rate": sum(r["label"]["concise"] for r in judged) / len(judged), "n": len(judged)}


SPEC = AxisSpec(
    judge=ConciseJudge, rates=ConciseRate, columns=(Column("concise ↑", "concise_rate", True),),
    headline="concise_rate", headline_text="concise rate", short="concise", summary="concise",
    judge_records=lambda judge, records: judged_by_probability(judge, records, "concise"),
    metrics=metrics,
    per_prompt=lambda judged: np.array([r["label"]["concise"] for r in judged], dtype=float),
    rerank_score=lambda judged: judged["score"],
    figures=(Figure("accuracy", ("accuracy",), "accuracy", "accuracy"),), targets=TARGETS,
    user_fields=(), prepare_user_record=lambda record, prompt, match, where: {**record, "prompt": prompt},
    in_hhh=False,
)
