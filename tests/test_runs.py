"""The run directory: its layout, the markers of finished stages and the guard against changed settings; and the
systems a run compares (``systems``), which find their weights and answers through it."""

from __future__ import annotations

import pytest

from h3fusion import runs
from h3fusion.config import AXES, build_config, config_keys, dump_config
from h3fusion.errors import H3FusionError
from h3fusion.runs import (
    ALIGN_SETTINGS,
    BOOKKEEPING,
    BUILD_SETTINGS,
    FUSE_SETTINGS,
    PATH_SETTINGS,
    TRAINED_EXPERTS_ONLY,
    changed_settings,
    other_experts_data,
    refuse_other_settings,
)


def test_the_layout_is_the_documented_one(tmp_path):
    """Every stage's files where the module docstring (and docs/architecture.md) says, asked by config or by
    directory alike."""
    config = build_config({"run_dir": str(tmp_path / "r")})
    run = tmp_path / "r"
    assert runs.root(config) == runs.root(run) == run
    expected = {
        runs.expert_dir(config, "honest"): run / "experts" / "honest",
        runs.moe_dir(config): run / "moe",
        runs.fused_dir(config): run / "fused",
        runs.multitask_dir(config): run / "baselines" / "multitask-sft",
        runs.variant_dir(config, "authors-code"): run / "variants" / "authors-code",
        runs.ablation_dir(config, "lam"): run / "ablations" / "lam",
        runs.generated_file(config, "base", "helpful"): run / "generations" / "base" / "helpful.jsonl",
        runs.generation_stats_file(config, "base"): run / "generations" / "base" / "stats.json",
        runs.mc_file(config, "base"): run / "generations" / "base" / "honest.mc.json",
        runs.routing_file(config, "h3fusion", "harmless"): run / "generations" / "h3fusion" / "harmless.routing.json",
        runs.assembled_file(config, "ensemble-rerank", "honest"): run / "assembled" / "ensemble-rerank" / "honest.jsonl",
        runs.judgements_file(config, "base", "honest"): run / "judgements" / "base" / "honest.jsonl",
        runs.judge_stamp_file(config, "base", "honest"): run / "judgements" / "base" / "honest.judge.json",
        runs.results_file(config): run / "results.json",
        runs.report_file(config): run / "report.md",
        runs.plots_dir(config): run / "plots",
        runs.specialisation_file(config): run / "specialisation.json",
        runs.model_card_file(config): run / "fused" / "README.md",
        runs.alpaca_outputs_file(config, "base"): run / "alpaca_eval" / "base" / "model_outputs.json",
        runs.settings_file(runs.fused_dir(config)): run / "fused" / "config.yaml",
        runs.routing_check_dir(runs.fused_dir(config)): run / "fused" / "routing",
    }
    for asked, documented in expected.items():
        assert asked == documented
    # an ablation is a run of its own: the same questions, one level down
    assert runs.fused_dir(runs.ablation_dir(run, "lam")) == run / "ablations" / "lam" / "fused"


def test_adapter_paths_take_brought_experts_over_the_runs_own(tmp_path):
    config = build_config({"run_dir": str(tmp_path / "r"), "moe": {"adapters": {"harmless": "/elsewhere/h"}}})
    assert runs.adapter_paths(config) == {"helpful": tmp_path / "r" / "experts" / "helpful",
                                          "harmless": runs.Path("/elsewhere/h"),
                                          "honest": tmp_path / "r" / "experts" / "honest"}


def test_an_ablation_takes_the_experts_its_base_run_had(tmp_path):
    """Not a re-aligning ablation: it reads the base run's experts where they are, its own trained ones or the ones
    its moe.adapters gave it (<run>/experts/<axis> does not exist for those)."""
    from h3fusion.ablate import base_experts

    config = build_config({"run_dir": str(tmp_path / "r"), "moe": {"adapters": {"harmless": str(tmp_path / "mine")}}})
    recorded = {"harmless": str(tmp_path / "mine")}  # the moe.adapters the base run's H3Fusion was made with
    assert base_experts(config, recorded) == [f"moe.adapters.helpful={tmp_path / 'r' / 'experts' / 'helpful'}",
                                              f"moe.adapters.harmless={tmp_path / 'mine'}",
                                              f"moe.adapters.honest={tmp_path / 'r' / 'experts' / 'honest'}"]
    # the config file named other adapters since: the ablation still takes the experts the base run had
    assert base_experts(config, {})[1] == f"moe.adapters.harmless={tmp_path / 'r' / 'experts' / 'harmless'}"


def test_an_ablation_of_expert_settings_trains_only_experts_it_can(tmp_path):
    """align trains no axis that moe.adapters gives. With every expert given, an ablation setting any lora/train key
    (beside other settings, or as a whole section) would re-fuse the very same experts and report a change it never
    made: refused in one line naming the fix and what gives the experts, before
    anything is written (the fix, clearing moe.adapters, trains every expert in the ablation); a seed override
    still acts on fusion (re-fused, not re-aligned); with some experts given, the others are re-aligned."""
    from h3fusion.ablate import ablate, realigns_experts
    from h3fusion.config import load_config

    base = build_config({"run_dir": str(tmp_path / "r")})
    runs.results_file(base).parent.mkdir(parents=True)
    runs.results_file(base).write_text("{}")  # a finished base run (ablate reads it only after the checks)
    recorded = runs.settings_file(runs.fused_dir(base))
    every = {axis: f"/mine/{axis}" for axis in AXES}
    dump_config(build_config({"run_dir": str(tmp_path / "r"), "moe": {"adapters": every}}), recorded)
    with pytest.raises(H3FusionError, match=rf"^ablation 'lr' sets train.lr, which would change nothing: "
                       rf"{recorded} gives every expert by moe.adapters, which align never trains; add --set "
                       r"'moe.adapters=\{\}'"):
        ablate(base, "lr", ["train.lr=0.001"], results_dir=tmp_path / "results", log=lambda *_: None)
    # with another setting beside it (the summary would list train.lr as applied), or the whole section at once
    for name, overrides, idle in [("mixed", ["train.lr=0.001", "seed=1"], "train.lr"),
                                  ("section", ["train={lr: 0.001}"], "train")]:
        with pytest.raises(H3FusionError, match=rf"^ablation '{name}' sets {idle}, which would change nothing"):
            ablate(base, name, overrides, results_dir=tmp_path / "results", log=lambda *_: None)
    # experts given by the ablation's own overrides: the line names those, not the base run's settings
    mine = [f"moe.adapters.{axis}=/other/{axis}" for axis in AXES]
    with pytest.raises(H3FusionError, match=rf"nothing: --set {', '.join(k.split('=')[0] for k in mine)} gives"):
        ablate(base, "own", [*mine, "lora.r=4"], results_dir=tmp_path / "results", log=lambda *_: None)
    assert not runs.ablation_dir(base, "lr").exists() and not (tmp_path / "results").exists()
    assert load_config(recorded, overrides=["train.lr=0.001", "moe.adapters={}"]).moe.adapters == {}

    lines = []
    all_given = build_config({"moe": {"adapters": every}})
    assert not realigns_experts(all_given, ["seed"], "s", "here", lines.append)
    some_given = build_config({"moe": {"adapters": {"harmless": "/mine/h"}}})
    assert realigns_experts(some_given, ["train.lr"], "lr", "here", lines.append)
    assert lines == ["[ablate] here gives harmless by moe.adapters: kept as given, the other experts are re-aligned"]
    assert realigns_experts(build_config({}), ["train.lr"], "lr", "here", lines.append) and len(lines) == 1


def test_a_stage_is_finished_only_with_its_marker(tmp_path):
    expert = tmp_path / "experts" / "helpful"
    expert.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "h3fusion_expert.json"):
        (expert / name).write_text("{}")
    assert not runs.expert_is_complete(expert)  # weights without the marker: killed before it was written
    (expert / runs.EXPERT_MARKER).write_text("{}")
    assert runs.expert_is_complete(expert)
    (expert / "adapter_model.safetensors").unlink()
    assert not runs.expert_is_complete(expert)  # a marker without the weights is no adapter either
    moe, fused = tmp_path / "moe", tmp_path / "fused"
    moe.mkdir()
    fused.mkdir()
    assert not runs.moe_is_built(moe) and not runs.fused_is_complete(fused)
    (moe / runs.BUILD_MARKER).write_text("{}")
    (fused / runs.FUSE_MARKER).write_text("{}")
    assert runs.moe_is_built(moe) and runs.fused_is_complete(fused)


def test_every_guarded_setting_names_a_real_key():
    """A misspelt key in a settings list is silently never compared (``model.name`` for ``model.base`` was)."""
    keys = set(config_keys())
    for group in (ALIGN_SETTINGS, BUILD_SETTINGS, FUSE_SETTINGS, TRAINED_EXPERTS_ONLY, BOOKKEEPING, PATH_SETTINGS):
        for prefix in group:
            assert prefix.removesuffix(".") in keys, prefix


def test_changed_settings_name_only_what_decides_a_stage(tmp_path):
    made = tmp_path / "fused"
    dump_config(build_config({}), made / "config.yaml")  # what a finished stage recorded
    now = build_config({"train": {"lr": 1e-3, "save_steps": 7}, "data": {"dir": "elsewhere"},
                        "fusion": {"gate_lambda": 1.0, "gamma": {"harmless": 0.5}}})
    # checkpoint cadence and the data's location are bookkeeping; a fusion key does not touch stage 1
    assert changed_settings(made / "config.yaml", now, ALIGN_SETTINGS) == ["train.lr: 0.0005 there, 0.001 now"]
    assert set(changed_settings(made / "config.yaml", now, FUSE_SETTINGS)) == {
        "fusion.gamma: {} there, {'harmless': 0.5} now", "fusion.gate_lambda: 0.01 there, 1.0 now",
        "train.lr: 0.0005 there, 0.001 now"}
    with pytest.raises(H3FusionError, match=r"fused was made with other settings \(train.lr: .*--out DIR"):
        refuse_other_settings(made, now, FUSE_SETTINGS)
    # experts brought from elsewhere: stage-1 training settings no longer decide anything here
    brought = build_config({"train": {"lr": 1e-3}, "moe": {"adapters": {a: f"/x/{a}" for a in AXES}}})
    assert set(changed_settings(made / "config.yaml", brought, FUSE_SETTINGS)) == {
        "moe.adapters: {} there, " + repr({a: f"/x/{a}" for a in AXES}) + " now", "train.lr: 0.0005 there, 0.001 now"}
    with pytest.raises(H3FusionError, match=r"moe.adapters: \{\} there") as refused:
        refuse_other_settings(made, brought, FUSE_SETTINGS)
    assert "train.lr" not in str(refused.value)
    assert changed_settings(tmp_path / "nothing-recorded.yaml", now, FUSE_SETTINGS) == []


def test_an_expert_is_not_refused_for_another_axis_data_settings(tmp_path):
    made = tmp_path / "experts" / "harmless"
    dump_config(build_config({}), made / "config.yaml")
    helpful_only = build_config({"data": {"helpful_train_size": 1200, "helpful_question_share": 0.4,
                                          "helpful_min_words": 80, "honest_dev_questions": 60}})
    assert changed_settings(made / "config.yaml", helpful_only, ALIGN_SETTINGS,
                            other_experts_data("harmless", AXES)) == []
    # the same changes are the helpful expert's own data (the held-out honest questions are not)
    assert len(changed_settings(made / "config.yaml", helpful_only, ALIGN_SETTINGS,
                                other_experts_data("helpful", AXES))) == 3
    own = build_config({"data": {"harmless_refusal_share": 0.25}})
    with pytest.raises(H3FusionError, match="data.harmless_refusal_share: None there, 0.25 now"):
        refuse_other_settings(made, own, ALIGN_SETTINGS, ignore=other_experts_data("harmless", AXES))


def test_changed_settings_compare_paths_as_places(tmp_path, monkeypatch):
    """One run named by an absolute path when a stage finished and by a relative one now is the same run."""
    for axis in AXES:
        (tmp_path / "run" / "experts" / axis).mkdir(parents=True)
        (tmp_path / "other" / axis).mkdir(parents=True)
    absolute = {a: str(tmp_path / "run" / "experts" / a) for a in AXES}
    dump_config(build_config({"moe": {"adapters": absolute}}), tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    relative = build_config({"moe": {"adapters": {a: f"run/experts/{a}" for a in AXES}}})
    assert changed_settings(tmp_path / "config.yaml", relative, FUSE_SETTINGS) == []
    moved = build_config({"moe": {"adapters": {a: f"other/{a}" for a in AXES}}})
    assert [d.split(":")[0] for d in changed_settings(tmp_path / "config.yaml", moved, FUSE_SETTINGS)] == ["moe.adapters"]


def test_a_base_model_by_relative_and_by_absolute_path_is_the_same_setting(tmp_path, monkeypatch):
    """``model.base`` given as a local directory: ``models/base`` now and ``/abs/models/base`` when a stage
    finished name the same model, so the stage is not refused; another directory is a changed setting."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "other").mkdir(parents=True)
    made = tmp_path / "fused"
    runs.record_settings(build_config({"model": {"base": str(tmp_path / "models" / "base")}}), made)
    monkeypatch.chdir(tmp_path)
    relative = build_config({"model": {"base": "models/base"}})
    assert changed_settings(runs.settings_file(made), relative, FUSE_SETTINGS) == []
    refuse_other_settings(made, relative, FUSE_SETTINGS)  # the same model: the finished stage is reused
    other = build_config({"model": {"base": "models/other"}})
    assert [d.split(":")[0] for d in changed_settings(runs.settings_file(made), other, FUSE_SETTINGS)] == ["model.base"]
    with pytest.raises(H3FusionError, match="model.base"):
        refuse_other_settings(made, other, FUSE_SETTINGS)


# ----------------------------------------------------------------------------- systems


def test_systems_of_a_run_and_where_each_comes_from(tmp_path):
    from h3fusion.systems import (
        answers_file,
        assembled_systems,
        generated_systems,
        system_names,
        system_source,
    )

    config = build_config({"run_dir": str(tmp_path / "r"), "baselines": {
        "merges": ["linear"], "ensembles": ["logits", "rerank"], "multitask_sft": True, "authors_code": True,
        "unfused": True}})
    assert system_names(config) == ["base", "expert-helpful", "expert-harmless", "expert-honest", "h3fusion",
                                    "h3fusion-unfused", "merge-linear", "ensemble-logits", "ensemble-rerank", "oracle-routed",
                                    "multitask-sft", "h3fusion-authors-code"]
    assert set(assembled_systems()) == {"ensemble-rerank", "oracle-routed"}
    assert generated_systems(config) == [s for s in system_names(config) if s not in assembled_systems()]
    assert system_source(config, "base") == config.model.base
    assert system_source(config, "expert-honest") == runs.expert_dir(config, "honest")
    assert system_source(config, "h3fusion") == runs.fused_dir(config)
    assert system_source(config, "h3fusion-unfused") == runs.moe_dir(config)
    assert system_source(config, "merge-linear") == runs.adapter_paths(config)
    assert system_source(config, "multitask-sft") == runs.multitask_dir(config)
    assert system_source(config, "h3fusion-authors-code") == runs.fused_dir(runs.variant_dir(config, "authors-code"))
    with pytest.raises(H3FusionError, match="unknown system 'merge-ties'; this run has base, "):
        system_source(config, "merge-ties")  # a method this run does not compare
    # a generated system's answers are its generations; an assembled one's, what evaluate assembled
    assert answers_file(config, "h3fusion", "helpful") == runs.generated_file(config, "h3fusion", "helpful")
    assert answers_file(config, "ensemble-rerank", "helpful") == runs.assembled_file(config, "ensemble-rerank",
                                                                                       "helpful")


def test_a_system_without_finished_weights_is_refused_before_loading(tmp_path):
    from h3fusion.systems import load_system

    config = build_config({"run_dir": str(tmp_path / "r"), "baselines": {"unfused": True}})
    runs.fused_dir(config).mkdir(parents=True)  # a fuse killed before its marker
    with pytest.raises(H3FusionError, match=r"system h3fusion: no finished model at .*run `h3fusion fuse` first"):
        load_system(config, "h3fusion")
    runs.moe_dir(config).mkdir(parents=True)  # a build killed before its marker
    with pytest.raises(H3FusionError, match=r"system h3fusion-unfused: no built MoE at .*run `h3fusion build` first"):
        load_system(config, "h3fusion-unfused")
    with pytest.raises(H3FusionError, match=r"system expert-helpful: no adapter at .*run `h3fusion align`"):
        load_system(config, "expert-helpful")
    with pytest.raises(H3FusionError, match="oracle-routed is assembled from the experts' answers"):
        load_system(config, "oracle-routed")
