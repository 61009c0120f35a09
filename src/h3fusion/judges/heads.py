"""The judges' LightGBM heads: shared settings, fitting and loading (text model files, never pickles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from h3fusion.judges.threads import judge_threads

LGB_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.03, "num_leaves": 31, "min_data_in_leaf": 20,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbose": -1, "seed": 0, "deterministic": True, "force_row_wise": True,
}
"""LightGBM settings shared by the judges' heads (``num_threads`` is added per fit: ``judge_threads()``)."""


def fit_lgb(x: np.ndarray, y: np.ndarray, rounds: int, weight: np.ndarray | None = None, **params: Any):
    import lightgbm as lgb

    threads = judge_threads()
    data = lgb.Dataset(x, label=y, weight=weight, params={"verbose": -1, "num_threads": threads})
    return lgb.train({**LGB_PARAMS, "num_threads": threads, **params}, data, num_boost_round=rounds)


def load_lgb(path: Path):
    import lightgbm as lgb

    # predicts with the fit's thread count (saved in the file): LightGBM 4.7 segfaults on reset_parameter of a
    # booster loaded from a file, and ignores params given with one
    return lgb.Booster(model_file=str(path))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))
