"""Run config: shipped configs validate, bad values and misspelt keys give one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from h3fusion.config import RunConfig, config_keys, load_config
from h3fusion.errors import H3FusionError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def documented_keys(text: str) -> dict[str, bool]:
    """Dotted path of every ``key:`` line of a YAML file (by indentation) -> has a comment on it or above it."""
    found, stack = {}, []  # stack: (indent, key) of the enclosing sections
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match.group(2)])
        found[key] = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        stack.append((indent, match.group(2)))
    return found


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_document_every_key(path):
    load_config(path)
    documented = documented_keys(path.read_text())
    # every setting the schema knows (sections and leaves, nested ones like fusion.train.lr too) is in the
    # shipped file at its own place, with a comment on its line or just above it
    for key in config_keys(RunConfig):
        assert key in documented, f"{path.name}: key {key} is not documented"
        assert documented[key], f"{path.name}: {key} lacks a comment"


def test_paper_config_has_the_paper_settings():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper-llama2-7b.yaml")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 4, 0.1)
    assert (config.train.lr, config.train.epochs, config.train.batch_size) == (5e-4, 3, 8)
    assert (config.data.max_length, config.seed) == (300, 42)


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: -1\n", r"train\.lr.*greater than 0"),
        ("train:\n  lrr: 0.1\n", r"unknown key 'train\.lrr'; did you mean 'train\.lr'"),
        ("lora:\n  alhpa: 4\n", r"did you mean 'lora\.alpha'"),
        ("lora:\n  r: many\n", r"lora\.r"),
        ("experts: [helpful, kind]\n", r"unknown axis"),
        ("train: [1, 2\n", r"malformed YAML at line"),
        ("- a\n- b\n", r"expected a mapping"),
        ("lora:\n  target_modules: [q_proj]\n", r"FFN projections"),
    ],
)
def test_bad_config_values_are_clear(tmp_path, text, message):
    with pytest.raises(H3FusionError, match=message):
        load_config(_write(tmp_path, text))


def test_overrides_and_missing_file(tmp_path):
    config = load_config(_write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr=0.002", "lora.r=16"])
    assert config.train.lr == 0.002 and config.lora.r == 16
    assert config.data.seed == config.seed  # data seed follows the run seed unless set
    with pytest.raises(H3FusionError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(H3FusionError, match="key=value"):
        load_config(_write(tmp_path, "{}"), ["train.lr"])


def test_cli_bad_config_is_one_line(tmp_path):
    path = _write(tmp_path, "train:\n  batch_size: 0\n")
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "align", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "train.batch_size" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
