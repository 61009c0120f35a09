"""The CLI starts without torch or transformers: `--help`, `--version` and `import h3fusion.data` stay light."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "peft")


def _modules_after(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; (sorted top-level modules it loaded, its stdout)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *printed, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(printed)


def test_help_and_version_load_neither_torch_nor_transformers():
    run_cli = ("import sys\nfrom h3fusion.cli import main\nsys.argv = ['h3fusion', {flag!r}]\n"
               "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n")
    loaded, shown = _modules_after(run_cli.format(flag="--help"))
    assert "generate" in shown and "chat" in shown  # the help really ran
    assert not set(HEAVY) & set(loaded)
    loaded, shown = _modules_after(run_cli.format(flag="--version"))
    assert shown == f"h3fusion {importlib.metadata.version('h3fusion')}"
    assert not set(HEAVY) & set(loaded)


def test_importing_the_data_package_stays_light():
    loaded, _ = _modules_after("import h3fusion.data")
    assert "h3fusion" in loaded and not set(HEAVY) & set(loaded)


def test_import_h3fusion_then_transformers_registers_the_fused_model():
    # the lazy registration fires when transformers loads its Auto classes, in either import order
    for code in ("import h3fusion\nfrom transformers import AutoConfig, AutoModelForCausalLM",
                 "from transformers import AutoConfig, AutoModelForCausalLM\nimport h3fusion"):
        check = (code + "\nprint(AutoConfig.for_model('h3fusion').model_type, "
                 "AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model('h3fusion'))].__name__)")
        _, shown = _modules_after(check)
        assert shown == "h3fusion H3FusionForCausalLM"
