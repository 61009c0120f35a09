"""Cross-fitted judges: every evaluated record is scored by a judge fitted on none of its fold.

    CrossFittedJudge(judges, instructions).score(records)   # record -> the judge of its instruction's fold
    combined_validation(figures)                              # the folds' figures and their mean

The folds deal the evaluated instructions out in turn (instruction i is in fold i mod K), as
``helpful.split(..., fold=(k, K))`` does when it fits fold k's judge (see ``fit.folds``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from h3fusion.data.sources import norm
from h3fusion.errors import H3FusionError
from h3fusion.judges.base import Judge


def combined_validation(figures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One validation record for K fold judges: each fold's figures under ``folds``, the mean of every
    top-level number at the top (where the single judge has it), and a target met only when every fold meets it."""
    first = figures[0]
    numbers = [k for k, v in first.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    mean = {k: float(np.mean([f[k] for f in figures if f.get(k) is not None])) for k in numbers}
    met = {k: all(f.get("targets_met", {}).get(k, False) for f in figures) for k in first.get("targets_met", {})}
    return {"judge": f"{first.get('judge')} (cross-fitted, {len(figures)} folds)", **mean,
            "targets": first.get("targets"), "targets_met": met,
            "cross_fitted": {"folds": len(figures), "rule": "instruction i of the evaluated subset is in fold i mod K; "
                             "fold k is scored by a judge fitted on no instruction of fold k"},
            "folds": list(figures)}


class CrossFittedJudge(Judge):
    """Scores each record with the judge of its instruction's fold (the records must be evaluated ones)."""

    def __init__(self, judges: Sequence[Judge], instructions: Sequence[str]):
        self.judges = list(judges)
        self.axis = self.judges[0].axis
        self.name = self.judges[0].name
        self.embedder = self.judges[0].embedder
        self.fold_of = {norm(text): i % len(self.judges) for i, text in enumerate(instructions)}
        self.validation = combined_validation([j.validation for j in self.judges])

    def score(self, records: Sequence[dict[str, Any]]) -> list[float]:
        folds = []
        for i, record in enumerate(records):
            fold = self.fold_of.get(norm(str(record.get("instruction", ""))))
            if fold is None:
                raise H3FusionError(f"{self.axis} judge: record {i} is not an evaluated instruction, and the cross-fitted "
                                    f"judge scores only those; score your own files with `h3fusion judge {self.axis}`")
            folds.append(fold)
        scores = np.zeros(len(records))
        for k, judge in enumerate(self.judges):
            idx = [i for i, f in enumerate(folds) if f == k]
            if idx:
                scores[idx] = judge.score([records[i] for i in idx])
        return [float(s) for s in scores]

    def __repr__(self) -> str:
        return f"CrossFittedJudge({len(self.judges)} folds: {self.judges[0]!r}, ...)"
