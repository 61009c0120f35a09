"""Generation: batched, greedy, resumable JSONL with input fields kept; clear errors on bad lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from h3fusion.errors import H3FusionError
from h3fusion.generate import cut_at_stops, generate_jsonl
from h3fusion.io import read_jsonl
from h3fusion.models import load_model

RECORDS = [{"id": i, "instruction": text, "extra": i * 10} for i, text in enumerate([
    "Name a colour.", "Write a haiku about the sea and the wind.", "What is 2 + 2?",
    "List three fruits.", "Say hello.", "Explain gravity to a child in one sentence.", "Count to three.",
])]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generates_one_line_per_prompt_in_input_order(tmp_path, tiny):
    model, tokenizer = tiny
    stats = generate_jsonl(model, tokenizer, RECORDS, tmp_path / "out.jsonl", max_new_tokens=5, batch_size=3,
                           progress=False)
    out = lines(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == list(range(7))
    assert all(r["extra"] == r["id"] * 10 and isinstance(r["response"], str) for r in out)
    assert stats["prompts"] == 7 and stats["new_tokens"] > 0
    # batching and length-sorting do not change greedy answers
    single = generate_jsonl(model, tokenizer, RECORDS, tmp_path / "single.jsonl", max_new_tokens=5, batch_size=1,
                            progress=False)
    assert [r["response"] for r in lines(tmp_path / "single.jsonl")] == [r["response"] for r in out]
    assert single["prompts"] == 7


def test_resume_keeps_finished_windows_and_redoes_a_cut_one(tmp_path, tiny):
    """Answers are written a window (batch_size x 4 prompts) at a time; a writer killed part-way through one leaves
    some of its lines: the resume starts at that window's start, so its batches are an uninterrupted run's."""
    model, tokenizer = tiny
    full = tmp_path / "full.jsonl"
    generate_jsonl(model, tokenizer, RECORDS, full, max_new_tokens=5, batch_size=1, progress=False)  # windows of 4
    killed = tmp_path / "killed.jsonl"
    text = full.read_text().splitlines(keepends=True)
    killed.write_text("".join(text[:5]) + text[5][: len(text[5]) // 2])  # killed mid-line in the second window
    said: list[str] = []
    stats = generate_jsonl(model, tokenizer, RECORDS, killed, max_new_tokens=5, batch_size=1, progress=False,
                           log=said.append)
    assert stats["resumed_after"] == 4 and stats["prompts"] == 3
    assert killed.read_text() == full.read_text()
    assert said == ["[generate] killed.jsonl: resuming at answer 5, the start of its window of 4 (1 answer after it made "
                    "again, as an uninterrupted run makes them)"]
    killed.write_text("".join(text[:4]))  # a whole window written: nothing redone
    assert generate_jsonl(model, tokenizer, RECORDS, killed, max_new_tokens=5, batch_size=1,
                          progress=False)["resumed_after"] == 4
    assert killed.read_text() == full.read_text()


class Killed(Exception):
    pass


class Clock:
    """``generate``'s clock: each reading ``step`` seconds after the last (a process as slow as the test says)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def time(self) -> float:
        self.now += self.step
        return self.now


def test_a_killed_axis_keeps_its_time_and_tokens(tmp_path, tiny, monkeypatch):
    """Stats so far are written after each window (stats.json's "partial"); the process that finishes the axis adds its
    own to them, so the axis's prompts and tokens are an uninterrupted run's, however often it was killed."""
    from h3fusion import generate, runs
    from h3fusion.config import build_config
    from h3fusion.generate import _generate_axes
    from h3fusion.io import write_json

    model, tokenizer = tiny
    config = build_config({"run_dir": str(tmp_path / "run"),
                           "generate": {"batch_size": 1, "max_new_tokens": {"helpful": 5}}})  # windows of 4
    uninterrupted = generate_jsonl(model, tokenizer, RECORDS, tmp_path / "full.jsonl", max_new_tokens=5, batch_size=1,
                                   progress=False)
    stats_file = runs.generation_stats_file(config, "base")
    stats_file.parent.mkdir(parents=True)

    def killed_after_first_window(path, value):  # the process dies right after writing the first window's stats
        write_json(path, value)
        if path == stats_file:
            raise Killed

    monkeypatch.setattr(generate, "write_json", killed_after_first_window)
    monkeypatch.setattr(generate, "time", Clock(100.0))  # the killed process: slow
    stale = {"helpful": {"prompts": 7, "resumed_after": 0, "new_tokens": 1, "seconds": 1.0}}  # answers since moved
    with pytest.raises(Killed):  # away: the axis is to do, and its old entry must not make it look finished
        _generate_axes(config, "base", model, tokenizer, {"helpful": RECORDS}, stale, False, print)
    monkeypatch.undo()
    written = json.loads(stats_file.read_text())
    so_far = written[runs.PARTIAL_STATS]["helpful"]
    assert "helpful" not in written and so_far["prompts"] == 4 and so_far["new_tokens"] > 0
    assert len(lines(runs.generated_file(config, "base", "helpful"))) == 4 and so_far["seconds"] >= 100

    monkeypatch.setattr(generate, "time", Clock(1.0))  # the process that finishes: fast
    _generate_axes(config, "base", model, tokenizer, {"helpful": RECORDS}, written, False, print)
    done = json.loads(stats_file.read_text())
    assert runs.PARTIAL_STATS not in done  # the axis is finished: its part moved where finished axes are
    assert done["helpful"]["prompts"] == 7 and done["helpful"]["resumed_after"] == 0
    assert done["helpful"]["new_tokens"] == uninterrupted["new_tokens"]
    assert done["helpful"]["seconds"] >= so_far["seconds"] + 1  # the killed process's time plus this one's
    assert lines(runs.generated_file(config, "base", "helpful")) == lines(tmp_path / "full.jsonl")

    # killed after a window's answers were written but before they were recorded: that window counts under
    # resumed_after (answers on disk the recorded part leaves out), never as a zero-second answer
    unrecorded = tmp_path / "unrecorded.jsonl"
    unrecorded.write_text((tmp_path / "full.jsonl").read_text())
    gap = generate_jsonl(model, tokenizer, RECORDS, unrecorded, max_new_tokens=5, batch_size=1, progress=False,
                         earlier=so_far)
    assert (gap["prompts"], gap["resumed_after"], gap["new_tokens"]) == (4, 3, so_far["new_tokens"])
    # stats that are not such a part (an edited stats.json) are not added
    edited = generate_jsonl(model, tokenizer, RECORDS, unrecorded, max_new_tokens=5, batch_size=1, progress=False,
                            earlier={**so_far, "prompts": "4"})
    assert (edited["prompts"], edited["resumed_after"], edited["new_tokens"]) == (0, 7, 0)
    # stats that count answers the file no longer holds (it was moved away) are not added
    again = tmp_path / "again.jsonl"
    restarted = generate_jsonl(model, tokenizer, RECORDS, again, max_new_tokens=5, batch_size=1, progress=False,
                               earlier=so_far)
    assert restarted["prompts"] == 7 and restarted["new_tokens"] == uninterrupted["new_tokens"]


def test_a_stale_part_is_replaced_before_the_first_window_is_written(tmp_path, tiny):
    """The part an earlier process recorded for answers since moved away is replaced as soon as a new process starts:
    killed after writing its first window but before recording it, the next process must not read the old part as
    that window's (same count of answers, another process's time and tokens)."""
    model, tokenizer = tiny
    out = tmp_path / "moved.jsonl"  # its earlier answers were moved away: the file is new
    stale = {"prompts": 4, "resumed_after": 0, "new_tokens": 999, "seconds": 500.0}
    recorded: list[dict] = []

    def killed_before_recording_a_window(part):
        if part["prompts"] > 0:
            raise Killed  # the window's answers are on disk, its stats are not
        recorded.append(part)

    with pytest.raises(Killed):
        generate_jsonl(model, tokenizer, RECORDS, out, max_new_tokens=5, batch_size=1, progress=False,
                       earlier=stale, on_window=killed_before_recording_a_window)
    assert len(lines(out)) == 4 and recorded and recorded[-1]["new_tokens"] == 0
    resumed = generate_jsonl(model, tokenizer, RECORDS, out, max_new_tokens=5, batch_size=1, progress=False,
                             earlier=recorded[-1] if recorded else stale)
    assert (resumed["prompts"], resumed["resumed_after"]) == (3, 4) and resumed["new_tokens"] < 999
    # a part no stats.json should hold (an edited file: an infinite count) is dropped, not a crash
    again = generate_jsonl(model, tokenizer, RECORDS, tmp_path / "edited.jsonl", max_new_tokens=5, batch_size=1,
                           progress=False, earlier={**stale, "new_tokens": float("inf")})
    assert again["prompts"] == 7 and again["resumed_after"] == 0


def test_the_mc_scoring_is_timed_for_status(tmp_path, tiny, data_dir, monkeypatch):
    """The TruthfulQA MC1/MC2 scores are written with the time they took (stats.json "honest_mc"), which
    `h3fusion status` counts in the generation left; stats.json names no axis for it (an axis named there is done)."""
    from h3fusion import generate, runs
    from h3fusion.config import build_config
    from h3fusion.generate import _generate_axes

    model, tokenizer = tiny
    config = build_config({"run_dir": str(tmp_path / "run"), "data": {"dir": str(data_dir)},
                           "evaluate": {"honest_n": 3}})
    runs.generated_dir(config, "base").mkdir(parents=True)
    monkeypatch.setattr(generate, "time", Clock(2.5))  # read before and after the scoring: 2.5 s apart
    _generate_axes(config, "base", model, tokenizer, {}, {}, True, print)
    stats = json.loads(runs.generation_stats_file(config, "base").read_text())
    assert set(stats) == {runs.MC_STATS} and stats[runs.MC_STATS]["questions"] == 3
    assert stats[runs.MC_STATS]["seconds"] == 2.5 and json.loads(runs.mc_file(config, "base").read_text())["n"] == 3


def test_corrupt_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(H3FusionError, match=r"bad\.jsonl line 2 is not a valid JSON object"):
        read_jsonl(path)


def test_stop_strings_cut_template_echoes():
    assert cut_at_stops("Paris.\n### Instruction: more", ["### Instruction:"]) == "Paris."
    assert cut_at_stops("  plain  ", []) == "plain"


def test_cli_generate_user_prompts(tmp_path, tiny_llama_dir):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "Say hi.", "tag": "a"}\n{"question": "Why is the sky blue?", "tag": "b"}\n')
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "h3fusion.cli", "generate", str(tiny_llama_dir), "--prompts", str(prompts),
           "--output", str(out), "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(r["tag"], "response" in r) for r in lines(out)] == [("a", True), ("b", True)]
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "x"\n')
    bad = subprocess.run(cmd[:-2] + ["--output", str(tmp_path / "o2.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "mine.jsonl line 2" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir):
    """A real PEFT LoRA adapter (non-zero B) on the tiny Llama, as `h3fusion align` leaves one."""
    from tests.moe_fixtures import make_adapter

    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter") / "harmless", seed=3)


def merged_by_hand(base_dir, adapter_dir):
    """The reference: the base with the adapter merged through PEFT directly."""
    from peft import PeftModel

    base, tokenizer = load_model(str(base_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval(), tokenizer


def test_an_adapter_dir_loads_as_its_base_with_the_adapter_merged(adapter, tiny_llama_dir):
    import torch

    ids = torch.tensor([[1, 530, 2017, 314, 253, 1345]])
    model, _ = load_model(str(adapter))
    base, _ = load_model(str(tiny_llama_dir))
    reference, _ = merged_by_hand(tiny_llama_dir, adapter)
    with torch.no_grad():
        logits, base_logits, expected = (m(ids).logits for m in (model, base, reference))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter really is in


def test_cli_generate_and_model_info_take_an_adapter_dir(tmp_path, adapter, tiny_llama_dir):
    import shutil

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in RECORDS[:3]))
    reference, tokenizer = merged_by_hand(tiny_llama_dir, adapter)
    generate_jsonl(reference, tokenizer, read_jsonl(prompts), tmp_path / "expected.jsonl", max_new_tokens=6,
                   progress=False)
    expected = [r["response"] for r in lines(tmp_path / "expected.jsonl")]

    def generate(model_dir, out, *extra):
        return subprocess.run([sys.executable, "-m", "h3fusion.cli", "generate", str(model_dir), "--prompts",
                               str(prompts), "--output", str(out), "--max-new-tokens", "6", *extra],
                              capture_output=True, text=True)

    done = generate(adapter, tmp_path / "answers.jsonl")  # base from its adapter_config.json
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["response"] for r in lines(tmp_path / "answers.jsonl")] == expected
    # a copied run: the recorded base path is not on this machine, --base names it
    moved = Path(shutil.copytree(adapter, tmp_path / "moved"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere/base"}))
    done = generate(moved, tmp_path / "moved.jsonl", "--base", str(tiny_llama_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["response"] for r in lines(tmp_path / "moved.jsonl")] == expected
    info = subprocess.run([sys.executable, "-m", "h3fusion.cli", "model-info", str(moved), "--base",
                           str(tiny_llama_dir)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr[-2000:]
    assert f"adapter: {moved} (merged into its base {tiny_llama_dir})" in info.stdout and "layers: 2" in info.stdout


def test_answers_of_another_prompt_set_are_neither_resumed_nor_overwritten(tmp_path):
    """A partial answers file whose lines answer other prompts is refused before any model runs (resuming it
    would mix two prompt sets), and left as it was."""
    output = tmp_path / "answers.jsonl"
    output.write_text(json.dumps({"instruction": "An older prompt.", "response": "old"}) + "\n")
    before = output.read_bytes()
    records = [{"instruction": "Today's first prompt."}, {"instruction": "Today's second prompt."}]
    with pytest.raises(H3FusionError, match="line 1 answers another prompt than prompt 1"):
        generate_jsonl(None, None, records, output)  # refused before the model is touched
    assert output.read_bytes() == before
