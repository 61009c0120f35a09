"""`h3fusion export-outputs`: each system's AlpacaEval answers as alpaca_eval's model_outputs.json, read back the
way alpaca_eval reads it (``pandas.read_json`` of a JSON list). alpaca_eval itself is not installed: its utils import
setuptools' ``pkg_resources``, which the setuptools of this environment no longer ships."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from h3fusion.config import load_config
from h3fusion.generate import evaluated_records
from h3fusion.io import append_jsonl, write_jsonl
from h3fusion.runs import assembled_file, generations_dir
from tests.conftest import write_config


@pytest.fixture
def run(tmp_path, data_dir):
    path = write_config(tmp_path / "c.yaml", data={"dir": str(data_dir)}, evaluate={"helpful_n": 4})
    config = load_config(path)
    tests = evaluated_records(config, "helpful")
    for system in ("h3fusion", "base"):
        append_jsonl(generations_dir(config) / system / "helpful.jsonl",
                     [{**t, "response": f"{system} answer {i}"} for i, t in enumerate(tests)])
    return path, config, tests


def test_model_outputs_read_back_as_alpaca_eval_reads_them(run):
    pandas = pytest.importorskip("pandas")
    path, config, tests = run
    done = subprocess.run([sys.executable, "-m", "h3fusion.cli", "export-outputs", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for system in ("base", "h3fusion"):
        out = config.run_path / "alpaca_eval" / system / "model_outputs.json"
        assert str(out) in done.stdout
        assert isinstance(json.loads(out.read_text()), list)
        frame = pandas.read_json(out)  # alpaca_eval's utils.load_or_convert_to_dataframe for a .json path
        assert {"instruction", "output", "generator", "dataset"} <= set(frame.columns)
        assert all(isinstance(v, str) for column in ("instruction", "output", "generator", "dataset")
                   for v in frame[column])
        assert list(frame["instruction"]) == [t["instruction"] for t in tests]  # AlpacaEval's text, its order
        assert list(frame["output"]) == [f"{system} answer {i}" for i in range(4)]
        assert frame["generator"].nunique() == 1 and frame["generator"][0] == f"{config.name}/{system}"
        assert list(frame["dataset"]) == [t["dataset"] for t in tests] and all(frame["dataset"])


def test_answers_evaluate_assembled_are_exported_too(run):
    """ensemble-rerank has no model: its answers are the ones `evaluate` assembled, read from their own place."""
    from h3fusion.alpaca_export import export_outputs

    _, config, tests = run
    write_jsonl(assembled_file(config, "ensemble-rerank", "helpful"),
                [{**t, "response": f"picked {i}"} for i, t in enumerate(tests)])
    written = export_outputs(config, log=lambda *_: None)
    assert set(written) == {"base", "ensemble-rerank", "h3fusion"}
    assert [r["output"] for r in json.loads(written["ensemble-rerank"].read_text())] == [f"picked {i}" for i in range(4)]


def test_unfinished_answers_are_refused_in_one_line(run):
    path, config, _ = run
    answers = generations_dir(config) / "base" / "helpful.jsonl"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[:2]))
    done = subprocess.run([sys.executable, "-m", "h3fusion.cli", "export-outputs", str(path), "--system", "base"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "holds 2 of 4 answers" in done.stderr and "Traceback" not in done.stderr
