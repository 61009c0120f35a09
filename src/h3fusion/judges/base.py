"""The offline judges' interface: a fitted judge directory in, ``score(records)`` probabilities out.

Shared machinery lives beside it: ``embedder`` (MiniLM sentence embeddings), ``text`` (surface
features of a text), ``heads`` (LightGBM heads), ``metrics`` (validation figures) and ``threads``.
Nothing is pickled: embeddings are cached as safetensors, linear heads and thresholds as JSON,
boosted trees in LightGBM's own text format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from h3fusion.errors import H3FusionError
from h3fusion.judges.embedder import Embedder

JUDGE_VERSION = "2"
"""Bump when machinery every judge shares changes (the embedder, text features): it is part of every judge's
cache key. A change to one judge bumps that judge module's own ``VERSION`` instead, so the others are kept."""


class Judge:
    """A stand-in judge: ``score(records) -> list[float]`` probabilities, plus held-out ``validation``."""

    name: str = "judge"
    axis: str = ""

    def __init__(self, directory: Path, embedder: Embedder | None = None):
        self.directory = Path(directory)
        path = self.directory / "validation.json"
        if not path.is_file():
            raise H3FusionError(f"{self.directory} holds no fitted {self.axis} judge (validation.json missing); "
                                "fit the judges again (h3fusion.judges.fit_judges)")
        self.validation: dict[str, Any] = json.loads(path.read_text())
        self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        self.embedder = embedder or Embedder()

    def score(self, records: Sequence[dict[str, Any]]) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory})"


def require(records: Sequence[dict[str, Any]], fields: Sequence[str], judge: str) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise H3FusionError(f"{judge} judge: record {i} lacks field '{missing[0]}' (needs {', '.join(fields)})")


def judged_by_probability(judge: Any, records: Sequence[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Each record plus the judge's probability as ``score`` and ``label`` {label: probability > 0.5}."""
    scores = judge.score(records)
    return [{**r, "score": s, "label": {label: s > 0.5}} for r, s in zip(records, scores, strict=True)]
