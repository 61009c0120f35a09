"""bench/gpu_check.sh, the GPU path's one-run check, on CPU: a tiny random Llama, float32, every step.

On a lent GPU machine the same script runs in bf16 on CUDA (the command is in bench/README.md); here it
proves the script itself works end to end, so a GPU session only has to run it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "compact", "compact-seq", "dense", "mixtral", "xlora")


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installing from .whl" not in proc.stdout  # this venv holds the pinned versions itself
    report = json.loads(out.read_text())
    assert report["failed"] == []
    steps = report["steps"]
    assert list(steps) == ["setup", "build", "fuse", "generate", "export", "speed"]
    assert all(step["ok"] for step in steps.values())
    assert steps["build"]["compact_vs_dense"]["max_diff_rel_spread"] <= 1e-4
    assert steps["fuse"]["moved"] == steps["fuse"]["trainable_tensors"] > 0
    assert steps["generate"]["shape"] == [2, 32 + 4]
    assert steps["export"]["greedy_token_agreement"] == 1.0
    assert "model.safetensors" in steps["export"]["files"]
    speed = steps["speed"]
    for batch in ("b1", "b8"):
        assert set(speed[batch]) == set(VARIANTS)
        assert all(v["tok_s"] > 0 for v in speed[batch].values())
    assert {"compact/base b8", "compact-seq/compact b8", "compact/xlora b8", "compact/mixtral b1",
            "xlora/base b1"} <= set(speed["ratios"])
    params = speed["parameters"]
    assert params["compact"]["total"] < params["dense"]["total"] == params["mixtral"]["total"]
    for line in ("[export] ok", "| compact/xlora b8 |", "gpu_check: all steps ok"):
        assert line in proc.stdout


def test_carried_wheel_pins_match_this_environment():
    """The device gets the versions the tests run with (and gpu_check.sh installs nothing here)."""
    pins = (REPO / "bench" / "gpu_check_wheels.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in (p.split("#")[0].strip() for p in pins) if line)
    assert {"peft", "accelerate", "pydantic", "pydantic-core"} <= set(pinned)
    for name, version in pinned.items():
        assert importlib.metadata.version(name) == version, name
