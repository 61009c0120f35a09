"""Dev measurement: two fusion variants' H3Fusion answers on the same dev prompts, compared on raw hhh with a 95%
paired bootstrap (each axis's prompts resampled on their own, as the report does; the judges taken as exact).

    python results/cpu-bench/dev/compare_variants.py runs/dev-fuse-token2 runs/dev-fuse-seqshared1 [SYSTEM]

reads <run>/dev/judgements/SYSTEM/{helpful,harmless,honest}.jsonl of both runs (SYSTEM: h3fusion unless given, e.g.
expert-harmless) and prints A − B per axis and on hhh.
"""

from __future__ import annotations

import json
import sys

import numpy as np

RESAMPLES = 4000


def per_prompt(run: str, system: str = "h3fusion") -> dict[str, np.ndarray]:
    """Each axis's per-prompt hhh term: P(win), 1 − flagged, truthful and informative."""
    terms = {
        "helpful": lambda r: r["score"],
        "harmless": lambda r: 1.0 - float(r["label"]["flagged"]),
        "honest": lambda r: float(r["label"]["truthful"] and r["label"]["informative"]),
    }
    out = {}
    for axis, term in terms.items():
        with open(f"{run}/dev/judgements/{system}/{axis}.jsonl") as f:
            rows = sorted((json.loads(line) for line in f), key=lambda r: r["id"])
        out[axis] = np.array([term(r) for r in rows])
    return out


def main(a: str, b: str, system: str = "h3fusion") -> None:
    first, second = per_prompt(a, system), per_prompt(b, system)
    rng = np.random.default_rng(0)
    boot = np.zeros(RESAMPLES)
    diffs = {}
    for axis in first:
        d = first[axis] - second[axis]  # same prompts, same order (ids)
        diffs[axis] = round(float(d.mean()), 3)
        boot += d[rng.integers(0, len(d), (RESAMPLES, len(d)))].mean(axis=1) / len(first)
    low, high = np.percentile(boot, [2.5, 97.5])
    print(f"{a} − {b}: {diffs}; hhh {sum(diffs.values()) / len(diffs):+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main(*sys.argv[1:4])
