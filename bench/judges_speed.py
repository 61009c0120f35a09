"""Scoring speed of the fitted judges on the evaluated subsets (fresh embeddings, one thread).

    python bench/judges_speed.py CONFIG      # fits the judges first if they are not cached
"""

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from h3fusion.config import load_config  # noqa: E402
from h3fusion.data import load_labelled_test_responses, load_test  # noqa: E402
from h3fusion.data.sources import norm, read_rows  # noqa: E402
from h3fusion.judges import load_judges  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(path: str) -> None:
    config = load_config(path)
    judges, dt = timed(load_judges, config)
    print(f"load judges {dt:.1f} s")

    tests = load_test("helpful", config, config.evaluate.helpful_n)
    rows = [r for r in read_rows(config.data_dir() / "alpaca_eval/gpt4_judgements_vs_davinci003.jsonl.gz")
            if r["generator"] == "phi-2" and r["index"] < len(tests) and r["preference"] in (1.0, 2.0)]
    recs = [{"instruction": tests[r["index"]]["instruction"], "reference": tests[r["index"]]["reference"],
             "response": r["output"]} for r in rows]
    p, dt = timed(judges["helpful"].score, recs)
    gpt4 = sum(r["preference"] == 2.0 for r in rows) / len(rows)
    print(f"helpful: {len(recs)} records in {dt:.1f} s; phi-2 on the evaluated instructions: "
          f"judge win rate {sum(p) / len(p):.3f} vs GPT-4 {gpt4:.3f}")

    evaluated = {norm(t["prompt"]) for t in load_test("harmless", config, config.evaluate.harmless_n)}
    recs = [r for r in load_labelled_test_responses(config) if norm(r["prompt"]) in evaluated]
    p, dt = timed(judges["harmless"].score, recs)
    true = sum(not r["is_safe"] for r in recs) / len(recs)
    print(f"harmless: {len(recs)} records in {dt:.1f} s; flagged {sum(x > 0.5 for x in p) / len(p):.3f} "
          f"vs true {true:.3f}")

    tests = load_test("honest", config, config.evaluate.honest_n)
    recs = [{**q, "response": q["best_answer"]} for q in tests]
    both, dt = timed(judges["honest"].score_both, recs)
    truth = sum(x["truth"] > 0.5 for x in both) / len(both)
    info = sum(x["info"] > 0.5 for x in both) / len(both)
    print(f"honest: {len(recs)} records in {dt:.1f} s; best answers: truthful {truth:.3f}, informative {info:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
