"""The study's statistics: bootstrap resampling, percentile intervals, relative improvement, and rates
corrected for a judge's measured error. Plain numpy, nothing about axes or systems (see ``rates``).

A judge that errs biases the rate it reports; its validation set measures how, and that measurement
is itself a sample. The corrections here turn an observed rate into an estimate of the true rate,
and every ``resample_*`` function redraws the judge's validation set, so a bootstrap replicate that
also redraws the prompts carries both sources of uncertainty.

* Binary label (flagged / not): Rogan–Gladen, p = (q + spec − 1) / (sens + spec − 1), clipped to
  [0, 1], with sensitivity and specificity from the judge's validation confusion counts.
* Two binary labels and their conjunction (truthful and informative): the 4 observed label cells
  are the true cells seen through the Kronecker product of the two labels' 2×2 misclassification
  matrices (each label's error depends on its own true label only); inverting it gives the true
  cells. Each label's marginal equals its own Rogan–Gladen correction.
* A probability scored against a reference's binary preference (the helpful judge's P(win) against
  GPT-4's choices): the reliability curve of the judge on its validation judgements, i.e. the
  reference's win frequency per bin of the judge's probability, interpolated linearly between the
  bins' mean probabilities (constant beyond the outer bins); the corrected win rate is the mean of
  the curve over the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95
RELIABILITY_EDGES = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Bins of a judge's probability for its reliability curve: finer where a small model's answers sit."""


def relative_improvement(ours: float | None, theirs: float | None, higher_is_better: bool) -> float | None:
    """(ours − theirs) / theirs when higher is better, (theirs − ours) / theirs when lower is better."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return (ours - theirs) / theirs if higher_is_better else (theirs - ours) / theirs


def bootstrap_weights(rng: np.random.Generator, n: int, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """(samples, n): each row the share of a resample (n draws with replacement) that fell on each item,
    so ``weights @ values`` is the resampled mean of per-item values."""
    drawn = rng.integers(0, n, size=(samples, n)) + np.arange(samples)[:, None] * n  # row r's draws, offset by r*n
    return np.bincount(drawn.ravel(), minlength=samples * n).reshape(samples, n) / n


def percentile_interval(values: np.ndarray, level: float = LEVEL,
                        bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float] | None:
    """The central ``level`` interval of bootstrap replicates (None if there are none).

    A NaN replicate is one whose resampled judge carries no information (sensitivity + specificity <= 1):
    it could be anything, so it counts at both ends; beyond a tail's share of them the interval is ``bounds``.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        return None
    tail = (1 - level) / 2
    unknown = float(np.isnan(values).mean())
    if unknown >= tail:
        return bounds
    # the NaN replicates sit at both ends: the finite ones' quantiles move inwards to leave room for them
    inner = (tail - unknown) / (1 - unknown) * 100
    return float(np.nanpercentile(values, inner)), float(np.nanpercentile(values, 100 - inner))


# ----------------------------------------------------------------------------- binary labels


@dataclass(frozen=True)
class Confusion:
    """A judge's binary decisions on labelled validation items: tp / fn on the positives, fp / tn on the negatives."""

    tp: int
    fn: int
    fp: int
    tn: int

    @classmethod
    def of(cls, truth: Sequence[bool], predicted: Sequence[bool]) -> Confusion:
        t, p = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
        return cls(int((t & p).sum()), int((t & ~p).sum()), int((~t & p).sum()), int((~t & ~p).sum()))

    @property
    def n(self) -> int:
        return self.tp + self.fn + self.fp + self.tn

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    def resample(self, rng: np.random.Generator, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """(sensitivity, specificity) of ``samples`` resamples of the validation items, each of size n."""
        cells = rng.multinomial(self.n, np.array([self.tp, self.fn, self.fp, self.tn]) / self.n, size=samples)
        with np.errstate(invalid="ignore", divide="ignore"):
            return cells[:, 0] / (cells[:, 0] + cells[:, 1]), cells[:, 3] / (cells[:, 3] + cells[:, 2])

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fn": self.fn, "fp": self.fp, "tn": self.tn}

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp, self.tn + other.tn)


def rogan_gladen(observed, sensitivity, specificity):
    """True rate from an observed rate of a judge with this sensitivity / specificity, clipped to [0, 1]
    (NaN where sensitivity + specificity <= 1: such a judge carries no information)."""
    observed, sensitivity, specificity = (np.asarray(x, dtype=float) for x in (observed, sensitivity, specificity))
    youden = sensitivity + specificity - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected = np.where(youden > 0, (observed + specificity - 1) / youden, np.nan)
    return np.clip(corrected, 0.0, 1.0)


def _inverse_misclassification(sensitivity: np.ndarray, specificity: np.ndarray) -> np.ndarray:
    """(..., 2, 2) inverse of [[sens, 1 − spec], [1 − sens, spec]] (rows: judged 1 / 0; columns: true 1 / 0)."""
    youden = sensitivity + specificity - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.stack([np.stack([specificity, specificity - 1], -1),
                        np.stack([sensitivity - 1, sensitivity], -1)], -2) / youden[..., None, None]
    return np.where((youden > 0)[..., None, None], inv, np.nan)


def joint_correction(cells, first: tuple, second: tuple) -> np.ndarray:
    """True shares of the 4 cells (1,1), (1,0), (0,1), (0,0) of two binary labels from their observed shares
    ``cells`` (..., 4), given each label's (sensitivity, specificity); not clipped (callers clip what they report)."""
    cells = np.asarray(cells, dtype=float)
    a = _inverse_misclassification(*(np.asarray(x, dtype=float) for x in first))
    b = _inverse_misclassification(*(np.asarray(x, dtype=float) for x in second))
    inverse = np.einsum("...ij,...kl->...ikjl", a, b).reshape(*np.broadcast_shapes(a.shape, b.shape)[:-2], 4, 4)
    return np.einsum("...ij,...j->...i", inverse, cells)


# ----------------------------------------------------------------------------- probabilities vs a reference


@dataclass(frozen=True)
class Reliability:
    """A judge's probability against a reference's binary choice, binned: per bin the number of validation
    items, their mean probability and the reference's wins among them."""

    mean_probability: tuple[float, ...]
    n: tuple[int, ...]
    wins: tuple[int, ...]

    @classmethod
    def of(cls, probability: Sequence[float], reference_wins: Sequence[bool],
           edges: Sequence[float] = RELIABILITY_EDGES) -> Reliability:
        p, y = np.asarray(probability, dtype=float), np.asarray(reference_wins, dtype=bool)
        bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
        rows = [(float(p[bins == b].mean()), int((bins == b).sum()), int(y[bins == b].sum()))
                for b in range(len(edges) - 1) if (bins == b).any()]
        return cls(*(tuple(column) for column in zip(*rows, strict=True))) if rows else cls((), (), ())

    @classmethod
    def from_dict(cls, table: dict) -> Reliability:
        return cls(tuple(table["mean_probability"]), tuple(table["n"]), tuple(table["wins"]))

    @classmethod
    def pooled(cls, tables: Sequence[Reliability], edges: Sequence[float] = RELIABILITY_EDGES) -> Reliability:
        """One table from several judges' (e.g. cross-fitted folds'): the items of each bin added up (a bin's
        mean probability lies inside it, which places every row)."""
        bins: dict[int, list[float]] = {}
        for table in tables:
            for mean, n, wins in zip(table.mean_probability, table.n, table.wins, strict=True):
                b = int(np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, len(edges) - 2))
                total = bins.setdefault(b, [0.0, 0, 0])
                total[0] += mean * n
                total[1] += n
                total[2] += wins
        rows = [(total[0] / total[1], total[1], total[2]) for _, total in sorted(bins.items()) if total[1]]
        return cls(*(tuple(column) for column in zip(*rows, strict=True))) if rows else cls((), (), ())

    def as_dict(self) -> dict:
        return {"mean_probability": list(self.mean_probability), "n": list(self.n), "wins": list(self.wins)}

    @property
    def rates(self) -> np.ndarray:
        return np.asarray(self.wins, dtype=float) / np.asarray(self.n, dtype=float)

    def resample(self, rng: np.random.Generator, samples: int) -> np.ndarray:
        """(samples, bins): the reference's win frequency per bin in resamples of the validation items
        (a bin a resample leaves empty keeps its measured frequency)."""
        n, wins = np.asarray(self.n), np.asarray(self.wins)
        cells = np.concatenate([wins, n - wins]) / n.sum()
        drawn = rng.multinomial(n.sum(), cells, size=samples)
        won, total = drawn[:, : len(n)], drawn[:, : len(n)] + drawn[:, len(n):]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, won / total, self.rates)

    def weights(self, probability: Sequence[float]) -> np.ndarray:
        """(items, bins): piecewise-linear interpolation weights of each probability on the bins' mean
        probabilities (constant beyond the outer bins), so ``weights @ rates`` is the calibrated probability."""
        knots = np.asarray(self.mean_probability, dtype=float)
        p = np.clip(np.asarray(probability, dtype=float), knots[0], knots[-1])
        right = np.clip(np.searchsorted(knots, p, side="right"), 1, len(knots) - 1) if len(knots) > 1 else None
        out = np.zeros((len(p), len(knots)))
        if right is None:
            out[:, 0] = 1.0
            return out
        left = right - 1
        span = knots[right] - knots[left]
        share = np.where(span > 0, (p - knots[left]) / np.where(span > 0, span, 1), 0.0)
        out[np.arange(len(p)), left] = 1 - share
        out[np.arange(len(p)), right] += share
        return out
