"""Trained baselines: multitask-sft (same data and steps as fusion) and the authors'-code variant."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from h3fusion.baselines.trained import run_authors_code, train_multitask_sft
from h3fusion.config import load_config
from h3fusion.experts import align
from h3fusion.models import load_model
from h3fusion.runs import multitask_dir
from h3fusion.systems import load_system, system_names
from tests.conftest import write_config


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_llama_dir, data_dir):
    root = tmp_path_factory.mktemp("baselines")
    path = write_config(root / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
                        train={"max_steps": 2},
                        fusion={"examples_per_axis": 8, "heldout_prompts": 4,
                                "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2}},
                        baselines={"merges": [], "multitask_sft": True, "authors_code": True})
    config = load_config(path)
    align(config, log=lambda *_: None)
    return config


def test_systems_list_the_trained_baselines(run_config):
    assert system_names(run_config)[-2:] == ["multitask-sft", "h3fusion-authors-code"]


def test_multitask_sft_trains_ffn_and_attention_for_the_fusion_steps(run_config):
    out = train_multitask_sft(run_config, log=lambda *_: None)
    assert out == multitask_dir(run_config)
    weights = load_file(out / "adapter_model.safetensors")
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == run_config.fusion.train.max_steps
    assert log["examples"] <= 3 * run_config.fusion.examples_per_axis
    model, _ = load_system(run_config, "multitask-sft")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_authors_code_variant_reproduces_the_released_behaviour(run_config):
    fused = run_authors_code(run_config, log=lambda *_: None)
    log = json.loads((fused / "fusion_log.json").read_text())
    assert log["axis_labels"] == {"helpful": 0, "harmless": 1, "honest": 1}  # honest mislabelled
    variant_config = json.loads(json.dumps(load_config(fused / "config.yaml").model_dump()))
    assert variant_config["fusion"]["gate_loss"] == "authors_ce"
    moe, _ = load_model(str(fused.parent / "moe"))
    model, _ = load_model(str(fused))
    for built, trained in zip(moe.moe_layers(), model.moe_layers(), strict=True):
        assert torch.equal(built.router.weight, trained.router.weight)  # random and frozen
        # all experts built identical: base + sum_k B_k A_k
        torch.testing.assert_close(built.expert_weight(0, "up_proj"), built.expert_weight(2, "up_proj"))
