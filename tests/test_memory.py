"""Bounded memory: generating with many systems keeps one model resident at a time.

Measured on the real SmolLM2 (about 540 MB of fp32 weights), so that one leaked model copy is far
above the RSS noise: the peak RSS of answering with six systems in one process must stay within
half a model of the peak of the heaviest of them alone, the logit ensemble (its three adapters' logits
take ~160 MiB more than one expert; measured against an expert, CI's allocator noise once sat at the edge).
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import EVALUATED, write_config
from tests.moe_fixtures import make_adapter

SYSTEMS = ["base", "expert-helpful", "expert-harmless", "expert-honest", "merge-linear", "ensemble-logits"]
# the peak RSS (KiB on Linux) of the only child of a fresh parent: the command alone
PEAK_OF_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                 "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mib(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) / 1024


def test_many_systems_keep_one_model_resident(tmp_path, smollm2_dir, data_dir):
    adapters = {axis: str(make_adapter(smollm2_dir, tmp_path / "adapters" / axis, seed=k + 1, r=8, alpha=16.0))
                for k, axis in enumerate(["helpful", "harmless", "honest"])}
    peaks = {}
    for label, systems in (("one", ["ensemble-logits"]), ("all", SYSTEMS)):
        (tmp_path / label).mkdir()
        path = write_config(tmp_path / label / "c.yaml", model={"base": str(smollm2_dir)}, data={"dir": str(data_dir)},
                            moe={"adapters": adapters}, evaluate=EVALUATED,
                            baselines={"merges": ["linear"], "ensembles": ["logits"]},
                            generate={"max_new_tokens": {"helpful": 2, "harmless": 2, "honest": 2}, "batch_size": 4})
        args = [sys.executable, "-m", "h3fusion.cli", "generate", str(path)]
        for system in systems:
            args += ["--system", system]
        peaks[label] = peak_rss_mib(args)
        assert all((tmp_path / label / "run" / "generations" / s / "honest.jsonl").is_file() for s in systems)
    model_mib = 540
    assert peaks["all"] <= peaks["one"] + model_mib / 2, peaks
