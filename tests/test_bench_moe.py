"""bench/bench_moe.py --processes K: each speed ratio judged by its median over K fresh processes.

The processes' own JSONs are real earlier runs of the benchmark (results/), given the command line they would
have been written for, so the series finds them done and only summarises (running the benchmark itself takes
minutes a process; a process whose JSON was written for another command line would be run again)."""

import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_moe.py"
RUNS = [REPO / "results" / name for name in ("bench_generation.json", "bench_generation_rerun.json",
                                             "bench_generation_rerun2.json")]
COMMAND = ["--generation-only", "--quick"]
WRITTEN_BY = {"argv": COMMAND, "script_sha256": hashlib.sha256(BENCH.read_bytes()).hexdigest()}  # what reuse needs


def ratio(run: dict, section: str, batch: str, num: str, den: str) -> float:
    runs = run[section][batch]
    return runs[num]["tok_s"] / runs[den]["tok_s"]


def test_processes_summarise_each_ratio_by_its_median_over_the_processes(tmp_path):
    out = tmp_path / "bench.json"
    for i, run in enumerate(RUNS, start=1):
        done = json.loads(run.read_text()) | WRITTEN_BY
        (tmp_path / f"bench.process{i}.json").write_text(json.dumps(done))
    finished = subprocess.run([sys.executable, str(BENCH), *COMMAND, "--processes", "3", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "done earlier" in finished.stdout
    summary = json.loads(out.read_text())
    assert summary["processes"] == 3 and summary["argv"] == COMMAND
    runs = [json.loads(r.read_text()) for r in RUNS]
    across = summary["across_processes"]
    for name, section, batch in (("compact/base b8", "generation", "b8"),
                                 ("decode step compact-seq/base b1", "decode_steps", "b1")):
        num, den = name.split()[-2].split("/")
        values = [ratio(r, section, batch, num, den) for r in runs]
        assert across[name]["values"] == values
        assert across[name]["median"] == statistics.median(values)
        assert (across[name]["min"], across[name]["max"]) == (min(values), max(values))
        assert across[name]["met_in"] == sum(v >= 0.95 if "seq" in name else v >= 0.85 for v in values)
    # the verdict is the median's: a row whose processes disagree says how many met it
    line = next(row for row in summary["table"].splitlines() if row.startswith("| compact/base b8 "))
    verdict = "met" if across["compact/base b8"]["median"] >= 0.85 else "MISSED"
    assert f"| {verdict} " in line and f"| {across['compact/base b8']['met_in']}/3 " in line
    reprinted = subprocess.run([sys.executable, str(BENCH), "--report", str(out)], capture_output=True, text=True,
                               timeout=300)
    assert reprinted.returncode == 0 and reprinted.stdout.strip() == summary["table"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where --device cuda fails")
@pytest.mark.parametrize("left", ["another command line", "another script", "cut short"])
def test_a_process_not_finished_for_this_command_line_is_run_again(tmp_path, left):
    """A JSON written for another command line or by another version of the script, or cut short by a kill, is run
    again, not summarised: here the rerun fails (--device cuda on a machine without CUDA), so the series stops
    with one line of its own."""
    written = WRITTEN_BY | {"script_sha256": "0" * 64} if left == "another script" else WRITTEN_BY
    stale = json.dumps(json.loads(RUNS[0].read_text()) | written)  # COMMAND, without --device cuda
    (tmp_path / "bench.process1.json").write_text(stale[:100] if left == "cut short" else stale)
    finished = subprocess.run([sys.executable, str(BENCH), *COMMAND, "--device", "cuda", "--processes", "2",
                               "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    assert "process 1/2 ->" in finished.stdout
    *_, child_line, own_line = finished.stderr.strip().splitlines()
    assert child_line.startswith("bench_moe: --device cuda, but torch sees no CUDA device")
    assert own_line.startswith("bench_moe: process 1 of 2 failed") and "Traceback" not in finished.stderr
    assert not (tmp_path / "bench.json").exists()
