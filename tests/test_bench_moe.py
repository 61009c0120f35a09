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
SCRIPT_SHA256 = hashlib.sha256(BENCH.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def machine() -> dict:
    """The benchmark's record of this machine (from its own process: it runs torch on one thread)."""
    code = (f"import sys, json; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_moe; "
            "print(json.dumps(bench_moe.machine_facts()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def written_here(run: Path, machine: dict) -> dict:
    """An earlier run's JSON as this script would have written it for COMMAND on this machine (what reuse needs)."""
    done = json.loads(run.read_text())
    return done | {"argv": COMMAND, "script_sha256": SCRIPT_SHA256, "machine": done["machine"] | machine}


def ratio(run: dict, section: str, batch: str, num: str, den: str) -> float:
    runs = run[section][batch]
    return runs[num]["tok_s"] / runs[den]["tok_s"]


def test_processes_summarise_each_ratio_by_its_median_over_the_processes(tmp_path, machine):
    out = tmp_path / "bench.json"
    for i, run in enumerate(RUNS, start=1):
        done = written_here(run, machine)
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


def test_only_a_whole_process_this_script_wrote_for_this_command_line_is_reused(tmp_path, machine):
    """What a resumed series skips: a JSON written whole, by this very script, for the same command line, on this
    machine."""
    whole = written_here(RUNS[0], machine)
    files = {"reused": whole, "another command line": whole | {"argv": [*COMMAND, "--gen-repeats", "3"]},
             "another machine": whole | {"machine": whole["machine"] | {"cpus": machine["cpus"] + 1}},
             "another torch": whole | {"machine": whole["machine"] | {"torch": "0.0.0"}},
             "another CPU model": whole | {"machine": whole["machine"] | {"cpu_model": "another CPU"}},
             "another script": whole | {"script_sha256": "0" * 64}, "no record of either": json.loads(RUNS[0].read_text())}
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    (tmp_path / "cut short.json").write_text(json.dumps(whole)[:100])
    (tmp_path / "not an object.json").write_text("[1, 2]")
    names = [*files, "cut short", "not an object", "absent"]
    check = (f"import sys, json; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_moe; from pathlib import Path; "
             f"print(json.dumps([bench_moe.finished_process(Path({str(tmp_path)!r}) / (n + '.json'), {COMMAND!r}) "
             f"is not None for n in {names!r}]))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert dict(zip(names, json.loads(done.stdout.splitlines()[-1]), strict=True)) == {n: n == "reused" for n in names}
    # and why not, in the line that stops a series whose new process left no usable results
    why = (f"import sys, json; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_moe; from pathlib import Path; "
           f"print(json.dumps([bench_moe.process_record(Path({str(tmp_path)!r}) / (n + '.json'), {COMMAND!r})[1] "
           f"for n in {names!r}]))")
    done = subprocess.run([sys.executable, "-c", why], capture_output=True, text=True, timeout=300)
    reasons = dict(zip(names, json.loads(done.stdout.splitlines()[-1]), strict=True))
    assert reasons["reused"] == "" and reasons["another CPU model"] == "it was written on another machine (other cpu_model)"
    assert reasons["another script"].startswith("another version of bench_moe.py wrote it")
    assert reasons["another command line"] == "it was written for another command line"
    assert reasons["cut short"] == "its JSON is cut short" and reasons["absent"] == "it holds no results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where --device cuda fails")
def test_a_process_cut_short_is_run_again_and_a_failing_one_stops_the_series(tmp_path, machine):
    """A process JSON cut short by a kill is run again, not summarised: here the rerun fails (--device cuda on a
    machine without CUDA), so the series stops with one line of its own and summarises nothing."""
    stale = json.dumps(written_here(RUNS[0], machine))  # COMMAND, without --device cuda
    (tmp_path / "bench.process1.json").write_text(stale[:100])
    finished = subprocess.run([sys.executable, str(BENCH), *COMMAND, "--device", "cuda", "--processes", "2",
                               "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    assert "process 1/2 ->" in finished.stdout
    *_, child_line, own_line = finished.stderr.strip().splitlines()
    assert child_line.startswith("bench_moe: --device cuda, but torch sees no CUDA device")
    assert own_line.startswith("bench_moe: process 1 of 2 failed") and "Traceback" not in finished.stderr
    assert not (tmp_path / "bench.json").exists()
