"""`h3fusion run`: the stages in order, each skipped once complete, resumed after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from h3fusion.costs import kernel_peak_mark_works
from h3fusion.io import read_jsonl
from tests.conftest import EVALUATED, SMALL_JUDGES, run_and_kill_at, write_config

STAGES = ["align", "build", "fuse", "baselines", "generate", "evaluate", "report"]
# what a later call prints for a stage it finds complete (it must skip it, not redo it)
SKIP_LINES = {"align": "[align] helpful: complete at", "build": "[build] complete at", "fuse": "[fuse] complete at",
              "generate": "[generate] base: complete, skipping"}


def pipeline_config(root, tiny_llama_dir, data_dir, judge_cache, **sections):
    return write_config(root / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
                        train={"max_steps": 2}, fusion={"examples_per_axis": 4, "heldout_prompts": 2,
                                                        "train": {"max_steps": 2, "batch_size": 4}},
                        generate={"max_new_tokens": {"helpful": 4, "harmless": 4, "honest": 4}, "batch_size": 4},
                        evaluate=EVALUATED, judges={"cache_dir": str(judge_cache), **SMALL_JUDGES},
                        baselines={"unfused": True}, **sections)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, data_dir, judge_cache):
    """One complete `h3fusion run` of the tiny pipeline: (config path, command, its first completed process)."""
    root = tmp_path_factory.mktemp("pipeline")
    path = pipeline_config(root, tiny_llama_dir, data_dir, judge_cache)
    cmd = [sys.executable, "-m", "h3fusion.cli", "run", str(path)]
    return path, cmd, subprocess.run(cmd, capture_output=True, text=True)


def test_run_all_stages_then_skip(uninterrupted):
    path, cmd, first = uninterrupted
    assert first.returncode == 0, first.stderr[-3000:]
    run = path.parent / "run"
    generated = ["base", "expert-helpful", "expert-harmless", "expert-honest", "h3fusion", "h3fusion-unfused",
                 "merge-linear", "ensemble-logits"]
    for system in generated:
        for axis in ["helpful", "harmless", "honest"]:
            records = read_jsonl(run / "generations" / system / f"{axis}.jsonl")
            assert len(records) == 4 and all("response" in r for r in records)
    routing = json.loads((run / "generations" / "h3fusion" / "honest.routing.json").read_text())
    assert routing["experts"] == ["helpful", "harmless", "honest"]
    before = json.loads((run / "generations" / "h3fusion-unfused" / "honest.routing.json").read_text())
    assert before["axes"]["honest"]["sample_means"] != routing["axes"]["honest"]["sample_means"]  # fusion moved it
    mc = json.loads((run / "generations" / "base" / "honest.mc.json").read_text())
    assert mc["n"] == 4 and 0 <= mc["mc1"] <= 1 and 0 < mc["mc2"] < 1
    results = json.loads((run / "results.json").read_text())
    assert set(results["systems"]) == {*generated, "ensemble-rerank", "oracle-routed"}
    for axis in ["helpful", "harmless", "honest"]:  # the rerank ensemble keeps one expert's answer per prompt
        picked = read_jsonl(run / "assembled" / "ensemble-rerank" / f"{axis}.jsonl")
        for i, record in enumerate(picked):
            chosen = read_jsonl(run / "generations" / record["chosen_expert"] / f"{axis}.jsonl")[i]
            assert record["response"] == chosen["response"]
    assert all(entry["hhh"] is not None for entry in results["systems"].values())
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines() if "skipping" in line]
    assert len(skipped) == 3 + 1 + 1 + 8, again.stdout  # 3 experts, build, fuse, 8 systems' generations
    assert "[run] evaluate done" in again.stdout  # scoring reuses the cached judgements
    assert "[run] report done" in again.stdout
    report = (run / "report.md").read_text()
    assert report.startswith("# H3Fusion study") and "**Outcome.** H3Fusion's hhh is" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| **h3fusion** |") for line in table)
    assert any(line.startswith("| ensemble-rerank |") for line in table)
    assert "fusion training, H3Fusion − h3fusion-unfused: " in report  # the MoE before fusion, measured
    memory = [line.rsplit("|", 2)[1].strip() for line in table if line.endswith(" MiB |")]  # the cost table's column
    assert memory and all(cell.startswith("≥ ") != kernel_peak_mark_works() for cell in memory), memory
    for plot in ["axes.png", "hhh.png", "training_curves.png", "routing_heatmap.png"]:
        assert (run / "plots" / plot).stat().st_size > 1000 and f"plots/{plot}" in report
    card = (run / "fused" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| **h3fusion** |" in card


def flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}/{key}").items()}


def assert_same_results(run, reference):
    ours, theirs = (flatten(json.loads((r / "results.json").read_text())["systems"]) for r in (run, reference))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():  # identical answers; sums may differ in the last bit across processes
        assert value == (pytest.approx(theirs[key], rel=1e-9, abs=1e-12) if isinstance(value, float) else theirs[key]), key


def finished_files(root, lines=4):
    """mtime of every JSONL under ``root`` that holds all its ``lines`` (a resumed call must not touch them)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl") if len(p.read_text().splitlines()) == lines}


def answers(run):
    return {str(p.relative_to(run)): [r["response"] for r in read_jsonl(p)]
            for p in sorted((run / "generations").glob("*/*.jsonl"))}


def test_run_resumes_after_a_kill_at_each_stage_boundary(tmp_path, uninterrupted, tiny_llama_dir, data_dir,
                                                         judge_cache):
    """SIGKILL right after each stage reports done; the same command then picks up at the next stage,
    and the finished run equals an uninterrupted one (greedy decoding, same seed)."""
    path = pipeline_config(tmp_path, tiny_llama_dir, data_dir, judge_cache)
    cmd = [sys.executable, "-m", "h3fusion.cli", "run", str(path)]
    for stage in STAGES[:-1]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # see each line as it is printed
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"[run] {stage} done"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"never reached the end of {stage}: {''.join(seen)[-2000:]}"
        assert not any(f"[run] {later} done" in "".join(seen) for later in STAGES[STAGES.index(stage) + 1:])
        for earlier in STAGES[: STAGES.index(stage)]:  # picked up where the killed call stopped
            assert SKIP_LINES.get(earlier, "") in "".join(seen), f"{earlier} redone before {stage}"
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert all(line in final.stdout for line in SKIP_LINES.values()), final.stdout
    run, reference = tmp_path / "run", uninterrupted[0].parent / "run"
    assert answers(run) == answers(reference)
    assert_same_results(run, reference)
    assert (run / "report.md").is_file()
    for weights in ["experts/helpful/adapter_model.safetensors", "experts/honest/adapter_model.safetensors",
                    "fused/model.safetensors"]:  # same seed, same weights (a determinism check too)
        ours, theirs = load_file(run / weights), load_file(reference / weights)
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_evaluate_resumes_after_a_kill(tmp_path, uninterrupted, tiny_llama_dir, data_dir, judge_cache):
    """SIGKILL once the first judgements are cached; the same command finishes with the reference results."""
    path = pipeline_config(tmp_path, tiny_llama_dir, data_dir, judge_cache)
    reference = uninterrupted[0].parent / "run"
    shutil.copytree(reference / "generations", tmp_path / "run" / "generations",
                    ignore=shutil.ignore_patterns("ensemble-rerank", "oracle-routed"))  # assembled by evaluate itself
    args = [sys.executable, "-m", "h3fusion.cli", "evaluate", str(path)]
    run_and_kill_at(args, tmp_path / "run" / "judgements" / "expert-harmless" / "helpful.jsonl")
    assert not (tmp_path / "run" / "results.json").exists()
    judged = finished_files(tmp_path / "run" / "judgements")
    assert judged  # the systems scored before the kill
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in judged} == judged  # reused, not scored again
    assert_same_results(tmp_path / "run", reference)


def test_generate_resumes_after_a_kill(tmp_path, uninterrupted, tiny_llama_dir, data_dir, judge_cache):
    """SIGKILL once the first answers are on disk; the same command finishes with the reference answers."""
    path = pipeline_config(tmp_path, tiny_llama_dir, data_dir, judge_cache)
    reference = uninterrupted[0].parent / "run"
    for stage in ("experts", "moe", "fused"):  # the trained and built systems, as the earlier stages left them
        shutil.copytree(reference / stage, tmp_path / "run" / stage)
    args = [sys.executable, "-m", "h3fusion.cli", "generate", str(path)]
    run_and_kill_at(args, tmp_path / "run" / "generations" / "expert-helpful" / "helpful.jsonl")
    assert not (tmp_path / "run" / "generations" / "ensemble-logits").exists()  # killed part-way
    answered = finished_files(tmp_path / "run" / "generations")
    assert answered  # the base model's answers, complete before the kill
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in answered} == answered  # not generated again
    ours = answers(tmp_path / "run")
    assert ours == {k: v for k, v in answers(reference).items()
                    if "ensemble-rerank" not in k and "oracle-routed" not in k}  # assembled by evaluate


def test_ablation_refuses_without_base_run_then_reuses_its_experts(tmp_path, uninterrupted):
    path = uninterrupted[0]
    # the config file has moved on since the base run (another gamma): the ablation must still change
    # one setting only, against what the base run's H3Fusion was made with
    edited = tmp_path / "edited.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("fusion", {})["gamma_default"] = 0.5
    edited.write_text(yaml.safe_dump(raw))
    base = [sys.executable, "-m", "h3fusion.cli", "ablate", str(edited), "--name", "lambda-half",
            "--set", "fusion.gate_lambda=0.5", "--results-dir", str(tmp_path / "ablations")]
    missing = subprocess.run([*base, "--out", str(tmp_path / "no-run")], capture_output=True, text=True)
    assert missing.returncode == 2 and "finish the base run first" in missing.stderr
    done = subprocess.run([*base, "--out", str(path.parent / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[align]" not in done.stdout  # the base run's experts were reused, not retrained
    assert "has since changed fusion.gamma_default: 0.1 there, 0.5 now: not applied" in done.stdout
    summary = json.loads((tmp_path / "ablations" / "lambda-half.json").read_text())
    assert summary["overrides"] == ["fusion.gate_lambda=0.5"] and not summary["realigned_experts"]
    assert summary["h3fusion"]["hhh"] is not None and "h3fusion" in summary["base_run"]["systems"]
    table = (tmp_path / "ablations" / "README.md").read_text()
    assert f"Base run: `{path.parent / 'run'}`." in table
    assert "| lambda-half | `fusion.gate_lambda=0.5` (re-fused) |" in table
    versus = summary["hhh_vs"]  # vs the base run's h3fusion and its best expert, with bootstrap intervals
    systems = summary["base_run"]["systems"]
    best_expert = max((s for s in systems if s.startswith("expert-")), key=lambda s: systems[s]["hhh"])
    assert set(versus) == {"h3fusion", best_expert}
    for name, entry in versus.items():
        low, high = entry["interval"]
        assert entry["diff"] == pytest.approx(summary["h3fusion"]["hhh"] - systems[name]["hhh"])
        assert -1 <= low <= high <= 1
        assert f"{entry['diff']:+.3f} [{low:+.3f}, {high:+.3f}]" in table
    fused = path.parent / "run" / "ablations" / "lambda-half" / "fused"
    made_with = yaml.safe_load((fused / "config.yaml").read_text())["fusion"]
    assert made_with["gate_lambda"] == 0.5 and made_with["gamma_default"] == 0.1  # the base run's gamma


def test_runtime_dial_ablation_reuses_the_fused_model(tmp_path, uninterrupted):
    """moe.expert_bias is read at load time: the ablation generates with the base run's fused model, no re-fusing."""
    path = uninterrupted[0]
    done = subprocess.run([sys.executable, "-m", "h3fusion.cli", "ablate", str(path), "--name", "bias",
                           "--set", "moe.expert_bias.helpful=4.0", "--results-dir", str(tmp_path / "ablations"),
                           "--out", str(path.parent / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[fuse]" not in done.stdout and "[build]" not in done.stdout
    ablation = path.parent / "run" / "ablations" / "bias"
    assert (ablation / "fused").resolve() == (path.parent / "run" / "fused").resolve()
    summary = json.loads((tmp_path / "ablations" / "bias.json").read_text())
    assert summary["fused_again"] is False and summary["h3fusion"]["hhh"] is not None
    routing = json.loads((ablation / "generations" / "h3fusion" / "helpful.routing.json").read_text())
    base = json.loads((path.parent / "run" / "generations" / "h3fusion" / "helpful.routing.json").read_text())
    helpful = routing["experts"].index("helpful")

    def helpful_mass(stats):
        return sum(layer[helpful] for layer in stats["axes"]["helpful"]["layer_expert_mean"])

    assert helpful_mass(routing) > helpful_mass(base)  # the dial moved the router's mass



# ----------------------------------------------------------------------------- other verbs on the finished run


def cli(*args):
    return subprocess.run([sys.executable, "-m", "h3fusion.cli", *map(str, args)], capture_output=True, text=True)


def test_routing_verb_writes_what_it_prints(uninterrupted, tmp_path):
    path = uninterrupted[0]
    done = cli("routing", path, "--out", tmp_path / "routing")
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert stats["experts"] == ["helpful", "harmless", "honest"]
    for axis, s in stats["axes"].items():
        assert f"{axis}: router accuracy {s['accuracy']:.2f}" in done.stdout
        assert sum(s["mean_probs"]) == pytest.approx(1.0, abs=1e-3)
    assert list((tmp_path / "routing").glob("*.png"))


def test_export_verb_gives_a_mixtral_with_the_same_logits(uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    import h3fusion  # noqa: F401  (registers the fused model class)

    fused = uninterrupted[0].parent / "run" / "fused"
    done = cli("export", fused, "--format", "mixtral", "--out", tmp_path / "mixtral")
    assert done.returncode == 0, done.stderr[-2000:]
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ours = AutoModelForCausalLM.from_pretrained(fused).eval()
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    assert (tmp_path / "mixtral" / "tokenizer_config.json").is_file()
    unknown = cli("export", fused, "--format", "gguf", "--out", tmp_path / "gguf")
    assert unknown.returncode == 2 and "unknown export format 'gguf'; supported: mixtral" in unknown.stderr


def test_data_verb_counts_what_the_stages_read(uninterrupted):
    from h3fusion.config import load_config
    from h3fusion.data import load_test, load_train

    path = uninterrupted[0]
    done = cli("data", path)
    assert done.returncode == 0, done.stderr[-2000:]
    config = load_config(path)
    for axis in config.experts:
        expected = f"{axis}: train {len(load_train(axis, config))}, test {len(load_test(axis, config))}"
        assert expected in done.stdout.splitlines()


def test_judge_verb_scores_honest_answers(uninterrupted, tmp_path):
    from h3fusion.config import load_config
    from h3fusion.data import load_test

    path = uninterrupted[0]
    question = load_test("honest", load_config(path), 1)[0]
    mine = tmp_path / "answers.jsonl"
    mine.write_text("".join(json.dumps({**question, "response": r, "tag": i}) + "\n"
                            for i, r in enumerate([question["best_answer"], ""])))
    done = cli("judge", "honest", "--input", mine, "--output", tmp_path / "judged.jsonl", "--config", path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_jsonl(tmp_path / "judged.jsonl")
    assert [r["tag"] for r in rows] == [0, 1] and rows[0]["question"] == question["question"]
    assert rows[1]["score"] == {"truthful": 1.0, "informative": 0.0}  # saying nothing: TruthfulQA's rule
    assert rows[1]["label"] == {"truthful": True, "informative": False}
    assert rows[0]["score"]["informative"] > rows[1]["score"]["informative"]


def test_judges_fit_verb_prints_the_cached_validation(uninterrupted):
    """The run's judges are fitted (the pipeline did it): the verb reuses them and prints their figures."""
    from h3fusion.config import load_config
    from h3fusion.judges import judge_dir

    path = uninterrupted[0]
    config = load_config(path)
    cached = {axis: judge_dir(config, axis, config.judges.cache_dir, config.judges.fit_max_rows)
              for axis in ("helpful", "harmless", "honest")}
    before = {p: p.stat().st_mtime_ns for d in cached.values() for p in d.rglob("*") if p.is_file()}
    done = cli("judges", "fit", path)
    assert done.returncode == 0, done.stderr[-2000:]
    for axis in ("helpful", "harmless", "honest"):
        figures = json.loads((cached[axis] / "validation.json").read_text())
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"{axis}: "))
        if axis == "harmless":  # its own summary: BeaverTails and the contrastive set
            c = figures["contrastive"]["all"]
            assert f"accuracy {figures['all']['accuracy']:.3f}" in line and f"AUROC {figures['all']['auroc']:.3f}" in line
            assert f"compliant-safe flagged {c['compliant_safe_flagged_rate']:.3f}" in line, line
            continue
        numbers = {k: v for k, v in figures.items() if isinstance(v, float)}
        assert numbers and all(f"{k} {v:.3f}" in line for k, v in numbers.items()), (axis, line)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # reused, not refitted


def test_generate_finishes_an_axis_killed_between_its_answers_and_its_routing(tmp_path, uninterrupted):
    """Killed after the last answer but before the routing file and the stats: the next call writes them
    without answering again."""
    path = uninterrupted[0]
    reference = path.parent / "run"
    run = tmp_path / "run"
    for part in ("experts", "fused", "generations/h3fusion"):
        shutil.copytree(reference / part, run / part)
    config = yaml.safe_load(path.read_text())
    config["run_dir"] = str(run)
    mine = tmp_path / "c.yaml"
    mine.write_text(yaml.safe_dump(config))
    out = run / "generations" / "h3fusion"
    (out / "honest.routing.json").unlink()
    stats = json.loads((out / "stats.json").read_text())
    del stats["honest"], stats["cost"]
    (out / "stats.json").write_text(json.dumps(stats))
    answered = {p: p.stat().st_mtime_ns for p in out.glob("*.jsonl")}
    done = subprocess.run([sys.executable, "-m", "h3fusion.cli", "generate", str(mine), "--system", "h3fusion"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in answered} == answered  # nothing answered again
    assert json.loads((out / "honest.routing.json").read_text()) == \
        json.loads((reference / "generations" / "h3fusion" / "honest.routing.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["honest"]["prompts"] == 0 and stats["honest"]["resumed_after"] == 4
    assert stats["cost"]["total"] > 0 and stats["cost"]["peak_memory_bytes"] > 0
    assert stats["cost"]["peak_memory_exact"] == kernel_peak_mark_works()


def test_ablation_table_groups_rows_under_their_own_base_run(tmp_path):
    """Ablations of two base runs: each group opens with its own base run's H3Fusion, the row it is compared with."""
    from h3fusion.ablate import ablation_table

    def summary(name, base_dir, base_hhh, hhh):
        entry = {"helpful": {"win_rate": 0.1}, "harmless": {"flagged_rate": 0.2},
                 "honest": {"truthful_informative": 0.3}}
        return {"name": name, "overrides": ["fusion.gate_lambda=1.0"], "realigned_experts": False,
                "fused_again": True, "h3fusion": {**entry, "hhh": hhh},
                "base_run": {"dir": base_dir, "systems": {"h3fusion": {**entry, "hhh": base_hhh}}},
                "hhh_vs": {"h3fusion": {"diff": hhh - base_hhh, "interval": [-0.01, 0.03]}}}

    for name, base, base_hhh, hhh in (("a-old", "/runs/old", 0.401, 0.414), ("b-new", "/runs/new", 0.410, 0.418),
                                      ("c-old", "/runs/old", 0.401, 0.397)):
        (tmp_path / f"{name}.json").write_text(json.dumps(summary(name, base, base_hhh, hhh)))
    lines = [line for line in ablation_table(tmp_path).splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines] == [
        "**base run `old`: h3fusion**", "a-old", "c-old", "**base run `new`: h3fusion**", "b-new"]
    assert "0.401" in lines[0] and "0.410" in lines[3] and "+0.008 [-0.010, +0.030]" in lines[4]


def tree(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def status_lines(path):
    done = subprocess.run([sys.executable, "-m", "h3fusion.cli", "status", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {" ".join(line.split()[:2]): line.split(None, 2)[2] for line in done.stdout.splitlines()[1:-1]}, \
        done.stdout.splitlines()[-1]


def test_status_tells_a_given_adapter_from_a_directory_that_is_none(tmp_path, tiny_llama_dir, data_dir, judge_cache):
    """align skips an axis that moe.adapters gives, so a wrong path there would surface only at build: status names
    the files missing there, and the fix rather than a stage to rerun."""
    from tests.moe_fixtures import make_adapter

    given = make_adapter(tiny_llama_dir, tmp_path / "mine", seed=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()  # e.g. an adapter saved with adapter_model.bin, which build never unpickles
    shutil.copy(given / "adapter_config.json", tmp_path / "config-only")
    path = pipeline_config(tmp_path, tiny_llama_dir, data_dir, judge_cache,
                           moe={"adapters": {"helpful": str(given), "harmless": str(tmp_path / "empty"),
                                             "honest": str(tmp_path / "config-only")}})
    rows, last = status_lines(path)
    assert rows["align helpful"] == f"given     {given}"
    assert rows["align harmless"] == (f"missing   moe.adapters gives {tmp_path / 'empty'}, which holds no "
                                      "adapter_config.json, adapter_model.safetensors")
    assert rows["align honest"] == (f"missing   moe.adapters gives {tmp_path / 'config-only'}, which holds no "
                                    "adapter_model.safetensors")
    assert rows["build moe"] == "to do"
    assert last == "next: point moe.adapters.harmless at a PEFT LoRA adapter directory; a run stops at build until then"
    assert not (tmp_path / "run").exists()


def test_status_keeps_results_by_the_rule_evaluate_keeps_them():
    """results.json counts as this config's only with the whole recorded evaluate section equal, as evaluate keeps
    earlier entries: a key recorded but gone from the config, or new in it, is a change; no record is no match."""
    from h3fusion.config import build_config
    from h3fusion.runs import changed_evaluate_settings

    config = build_config({})
    now = config.evaluate.model_dump(mode="json")
    assert changed_evaluate_settings({"run": {"config": {"evaluate": dict(now)}}}, config) == []
    older = {k: v for k, v in now.items() if k != "alpacaeval_dev"} | {"retired": 3, "helpful_n": 805}
    assert changed_evaluate_settings({"run": {"config": {"evaluate": older}}}, config) == [
        "alpacaeval_dev", "helpful_n", "retired"]
    assert changed_evaluate_settings({"run": {"config": {}}}, config) is None
    assert changed_evaluate_settings({"systems": {}}, config) is None


def test_generation_left_follows_the_run_s_own_pace(tmp_path):
    """Answers left x the median seconds per answer of the timed parts on their axis (finished, or an unfinished part's
    windows so far under "partial"), scaled by the system's own speed against those medians, plus the MC1/MC2 scoring
    left once one system's is timed; unknown until every axis with answers left has a timed part."""
    from h3fusion import runs
    from h3fusion.config import build_config
    from h3fusion.status import generation_left
    from h3fusion.systems import generated_systems

    config = build_config({"run_dir": str(tmp_path / "run")})
    counts = {axis: 10 for axis in config.evaluated_axes}
    first, *others = counts
    systems = generated_systems(config)
    assert len(systems) >= 3 and generation_left(config, counts) is None  # nothing generated: no pace yet

    def generated(system: str, axis: str, lines: int, stats: dict | None = None) -> None:
        path = runs.generated_file(config, system, axis)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"response": "x"}\n' * lines + '{"response": "cut sh')  # a line being written
        if stats is not None:
            stats_file = runs.generation_stats_file(config, system)
            recorded = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
            stats_file.write_text(json.dumps({**recorded, axis: stats}))

    fast, slow, partial = systems[:3]
    for axis in counts:  # 2 s an answer everywhere (the first axis resumed after 5: its last 5 answers took 10 s)
        generated(fast, axis, 10, {"prompts": 5, "resumed_after": 5, "seconds": 10.0} if axis == first
                  else {"prompts": 10, "resumed_after": 0, "seconds": 20.0})
    generated(slow, first, 10, {"prompts": 10, "resumed_after": 0, "seconds": 60.0})  # 3x the median
    generated(slow, others[0], 4)  # part-way: no stats yet
    generated(partial, first, 10, {"prompts": 10, "resumed_after": 0, "seconds": 20.0})
    seconds, parts = generation_left(config, counts)
    rest = len(systems) - 3  # the systems with nothing generated: every axis, at the medians (2 s)
    expected = 2.0 * (3 * (6 + 10 * (len(others) - 1)) + 10 * len(others) + 10 * len(counts) * rest)
    assert seconds == pytest.approx(expected) and parts == len(counts) + 2
    runs.generation_stats_file(config, fast).write_text(json.dumps({first: {"prompts": 10, "seconds": 20.0},
                                                                    others[0]: {"prompts": 0, "seconds": 0.0}}))
    assert generation_left(config, counts) is None  # the other axes have answers left and no timed part
    runs.generation_stats_file(config, fast).write_text(json.dumps({  # the other axes' windows so far: 2 s an answer
        first: {"prompts": 10, "seconds": 20.0},
        runs.PARTIAL_STATS: {axis: {"prompts": 5, "resumed_after": 0, "seconds": 10.0} for axis in others}}))
    assert generation_left(config, counts) == (pytest.approx(expected), len(counts) + 2)
    # the MC1/MC2 scoring before the answers, due from every system without its file: timed on the slow system
    # (1.5 s a question at its 3x), so 0.5 s a question at the medians' speed
    stats = json.loads(runs.generation_stats_file(config, slow).read_text())
    stats[runs.MC_STATS] = {"questions": 10, "seconds": 15.0}
    runs.generation_stats_file(config, slow).write_text(json.dumps(stats))
    runs.mc_file(config, slow).write_text("{}")
    mc = 0.5 * counts["honest"] * (1 + 1 + rest)  # fast, partial and the rest at 1x; slow has its scores
    assert generation_left(config, counts) == (pytest.approx(expected + mc), len(counts) + 3)
    # an edited stats.json: a part that took no time (no speed to scale by: 1x, never a division by zero), with
    # its MC time at 0.5 s a question; a negative duration is not a pace
    runs.generation_stats_file(config, partial).write_text(json.dumps({
        first: {"prompts": 10, "seconds": 0.0}, runs.MC_STATS: {"questions": 10, "seconds": 5.0},
        runs.PARTIAL_STATS: {others[0]: {"prompts": 5, "resumed_after": 0, "seconds": -10.0}}}))
    assert generation_left(config, counts) == (pytest.approx(expected + mc), len(counts) + 4)


def test_status_says_where_a_run_stands_and_writes_nothing(tmp_path, uninterrupted, tiny_llama_dir, data_dir,
                                                           judge_cache):
    reference = uninterrupted[0].parent / "run"
    rows, last = status_lines(uninterrupted[0])
    assert last == "complete" and all(state.startswith("done") for state in rows.values()), rows
    assert rows["align helpful"].split()[1:3] == ["2", "steps,"]  # from its training log (held-out loss follows)
    assert {"generate h3fusion", "evaluate oracle-routed", "report report.md"} <= rows.keys()

    # judgements newer than results.json (a system scored again since): evaluate and report are to do
    (tmp_path / "rescored").mkdir()
    path = pipeline_config(tmp_path / "rescored", tiny_llama_dir, data_dir, judge_cache)
    shutil.copytree(reference, path.parent / "run")  # copy2: the times too
    os.utime(path.parent / "run" / "judgements" / "base" / "helpful.jsonl")
    rows, last = status_lines(path)
    assert rows["evaluate results.json"] == "to do     older than the judgements"
    assert rows["report report.md"] == "to do" and last.startswith("next: evaluate results.json (to do)")
    # a results.json written after the judgements but over other prompts (evaluate.<axis>_n changed since)
    results = path.parent / "run" / "results.json"
    scored = json.loads(results.read_text())
    scored["systems"]["base"]["helpful"]["n"] += 1
    results.write_text(json.dumps(scored))
    rows, _ = status_lines(path)
    assert rows["evaluate results.json"] == "to do     scored on other prompt counts"
    # the same counts under another evaluate setting (AlpacaEval instructions held out as dev): not this config's
    scored["systems"]["base"]["helpful"]["n"] -= 1
    scored["run"]["config"]["evaluate"]["alpacaeval_dev"] = 10
    results.write_text(json.dumps(scored))
    rows, _ = status_lines(path)
    assert rows["evaluate results.json"] == "to do     scored with other evaluate settings (alpacaeval_dev)"
    results.write_text('{"systems": ')  # cut short (a copy stopped part-way): said so, not read as lacking systems
    rows, _ = status_lines(path)
    assert rows["evaluate results.json"] == "to do     unreadable"

    # a run stopped part-way: two experts done, the third at a checkpoint (a newer one half-written, and a stray
    # non-object state), the base model's answers done on one axis and cut short on another
    (tmp_path / "stopped").mkdir()
    path = pipeline_config(tmp_path / "stopped", tiny_llama_dir, data_dir, judge_cache)
    run = path.parent / "run"
    shutil.copytree(reference / "experts", run / "experts")
    honest = run / "experts" / "honest"
    (honest / "training_log.json").unlink()
    for step, state in ((1, {"global_step": 1, "max_steps": 2}), (2, None), (3, 7)):
        checkpoint = honest / "checkpoints" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        if state:  # the Trainer writes trainer_state.json last
            (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    base = run / "generations" / "base"
    base.mkdir(parents=True)
    shutil.copy(reference / "generations" / "base" / "helpful.jsonl", base)
    lines = (reference / "generations" / "base" / "harmless.jsonl").read_text().splitlines(keepends=True)
    (base / "harmless.jsonl").write_text("".join(lines[:2]) + lines[2][:10])  # the third answer being written
    (base / "stats.json").write_text(json.dumps({"helpful": {}}))
    before = tree(run)
    rows, last = status_lines(path)
    assert tree(run) == before  # nothing repaired, dropped or written
    assert rows["align helpful"].startswith("done") and rows["align harmless"].startswith("done")
    assert rows["align honest"] == "part-way  resumes from step 1 of 2"
    assert rows["build moe"] == "to do" and rows["fuse fused"] == "to do"
    assert rows["generate base"] == "part-way  helpful 4/4, harmless 2/4, honest 0/4, honest MC1/MC2 to do"
    assert rows["generate expert-helpful"] == "to do" and rows["evaluate base"] == "to do"
    assert last.startswith("next: align honest (part-way)")
