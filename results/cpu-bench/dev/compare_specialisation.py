"""Do the experts specialise, model against model: each expert's own-axis lead over the other two, side by side.

    python results/cpu-bench/dev/compare_specialisation.py \
        results/cpu-bench/dev/specialisation_smollm2.json <run>/dev/specialisation.json [--names SmolLM2 Gemma]

Reads the ``specialisation.json`` that ``h3fusion report`` writes (one per run, scored on the same dev prompts and
judges) and prints, per expert and rival, the own-axis difference with its paired 95% interval over prompts and the
judge-aware one, then each run's verdict ("leads" needs every interval against the others to exclude 0). Issue 18
chooses the study's model by it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def interval(iv: list[float] | None) -> str:
    return "" if iv is None else f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="specialisation.json files to compare")
    parser.add_argument("--names", nargs="+", help="one label per file (default: the file names)")
    args = parser.parse_args()
    names = args.names or [str(f) for f in args.files]
    if len(names) != len(args.files):
        parser.error("--names: give one label per file")
    runs = [json.loads(f.read_text())["experts"] for f in args.files]
    print("| expert | own axis | against | " + " | ".join(f"{n}: diff [95%] / judge-aware" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for expert, first in runs[0].items():
        for rival in first["against"]:
            cells = []
            for run in runs:
                a = run.get(expert, {}).get("against", {}).get(rival)
                cells.append("–" if a is None else f"{a['diff']:+.3f} {interval(a['interval'])} / "
                             f"{interval(a.get('judge_aware_interval'))}")
            print(f"| {expert} | {first['headline']} | {rival} | " + " | ".join(cells) + " |")
    print()
    for name, run in zip(names, runs, strict=True):
        print(f"{name}: " + "; ".join(f"{e} {v['headline']} {v['value']:.3f}: {v['verdict']}" for e, v in run.items()))


if __name__ == "__main__":
    main()
