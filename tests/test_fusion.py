"""Stage 3: the gating loss, drift regularisation, a trained router, labels, resumable training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from h3fusion.build import build_run
from h3fusion.config import load_config
from h3fusion.data import load_train
from h3fusion.fusion import (
    FusionTrainer,
    axis_labels,
    drift_penalties,
    fuse_run,
    gating_loss,
    prepare_for_fusion,
)
from h3fusion.fusion_dropout import MaskDropout, SharedInputDropout
from h3fusion.models import load_model
from h3fusion.moe.routing import mean_router_probs
from h3fusion.sft import SFTCollator, SFTDataset, response_logits_supported, training_arguments
from tests.conftest import run_and_kill_at, write_config
from tests.moe_fixtures import make_adapter

NAMES = ["helpful", "harmless", "honest"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir, data_dir):
    """A run directory with three expert adapters and the built MoE (tiny Llama)."""
    root = tmp_path_factory.mktemp("fusion")
    adapters = {n: str(make_adapter(tiny_llama_dir, root / "adapters" / n, seed=i)) for i, n in enumerate(NAMES)}
    path = write_config(root / "config.yaml", run_dir=str(root / "run"), model={"base": str(tiny_llama_dir)},
                        data={"dir": str(data_dir)}, moe={"adapters": adapters},
                        fusion={"examples_per_axis": 8, "heldout_prompts": 4,
                                "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "save_steps": 2}})
    config = load_config(path)
    build_run(config)
    return path, config


def test_gating_loss_forms():
    p_bar = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 2])
    assert gating_loss(p_bar, labels).item() == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)
    # the released code's form: CrossEntropy applied to probabilities (softmax twice)
    expected = torch.nn.functional.cross_entropy(p_bar, labels).item()
    assert gating_loss(p_bar, labels, "authors_ce").item() == pytest.approx(expected)
    # ... and it is far flatter in p: where the router puts almost no mass on the label, NLL pulls with
    # -1/p while the softmax-twice form's pull stays below 1 (it hardly corrects a wrong router)
    wrong, label = torch.tensor([[0.02, 0.96, 0.02]]), torch.tensor([0])
    pull = {}
    for form in ("nll", "authors_ce"):
        p = wrong.clone().requires_grad_(True)
        gating_loss(p, label, form).backward()
        pull[form] = p.grad[0, 0].item()
    assert pull["nll"] == pytest.approx(-1 / 0.02)
    assert -1 < pull["authors_ce"] < 0 and abs(pull["authors_ce"]) < 0.02 * abs(pull["nll"])


def test_honest_examples_carry_the_honest_label(built):
    _, config = built
    assert axis_labels(config) == {"helpful": 0, "harmless": 1, "honest": 2}
    model, tokenizer = load_model(str(config.run_path / "moe"))
    honest = load_train("honest", config)[:3]
    rows = SFTDataset(honest, tokenizer, 64, "alpaca", axis_labels(config)).rows
    assert [row["axis_label"] for row in rows] == [2, 2, 2]
    compat = config.model_copy(update={"compat": config.compat.model_copy(update={"honest_labelled_harmless": True})})
    assert axis_labels(compat)["honest"] == 1


def test_router_probs_average_excludes_padding(built):
    _, config = built
    model, tokenizer = load_model(str(config.run_path / "moe"))
    tokenizer.padding_side = "right"
    alone = tokenizer(["Tell me a joke about cats."], return_tensors="pt")
    padded = tokenizer(["Tell me a joke about cats.", "A much longer prompt that forces padding on the first row."],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**alone)
        p_alone = mean_router_probs(model, alone["attention_mask"])
        model(**padded)
        p_padded = mean_router_probs(model, padded["attention_mask"])
    torch.testing.assert_close(p_padded[0], p_alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(p_padded.sum(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_router_and_fusion_lora_get_gradients_and_drift_grows(built, tmp_path):
    _, config = built
    model, tokenizer = load_model(str(config.run_path / "moe"))
    prepare_for_fusion(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("mlp.router.weight") for n in trainable)
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)
    assert any(".mlp.fusion_B." in n for n in trainable)
    assert not any(n.endswith("mlp.up_proj.weight") or ".delta_" in n or "embed" in n for n in trainable)
    attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    q, k, v, o = (getattr(attention, p).lora_dropout["default"] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(q) is SharedInputDropout and q is k is v and q.p == config.fusion.lora_dropout  # one mask for q,k,v
    assert type(o) is MaskDropout and o.p == config.fusion.lora_dropout  # bool-mask dropout
    examples = load_train("helpful", config)[:2] + load_train("honest", config)[:2]
    dataset = SFTDataset(examples, tokenizer, 64, "alpaca", axis_labels(config))
    batch = SFTCollator(tokenizer.pad_token_id, keep_axis_label=True)(dataset.rows)
    trainer = FusionTrainer(model=model, args=training_arguments(config.fusion.train, tmp_path, 0),
                            gate_lambda=1.0, gammas=[0.1] * 3, gate_loss_form="nll", expert_names=NAMES)
    assert drift_penalties(model).abs().max().item() == 0.0
    trainer.compute_loss(model, dict(batch)).backward()
    router = model.moe_layers()[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.moe_layers()[0].fusion_B["down_proj"].grad.abs().sum() > 0
    with torch.no_grad():
        model.moe_layers()[0].fusion_B["up_proj"].add_(0.1)
    assert drift_penalties(model)[0].item() > 0


def test_fusion_loss_on_response_logits_equals_the_full_heads(built, tmp_path):
    """The fusion stage's collator sends the MoE a response-position mask: the H3Fusion loss (LM + gate +
    drift) and the router's gradient are those of the full head, with logits for the response tokens only."""
    _, config = built
    model, tokenizer = load_model(str(config.run_path / "moe"))
    prepare_for_fusion(model, config)
    assert response_logits_supported(model)
    examples = load_train("helpful", config)[:2] + load_train("harmless", config)[:2] + load_train("honest", config)[:2]
    rows = SFTDataset(examples, tokenizer, 64, "alpaca", axis_labels(config)).rows
    trainer = FusionTrainer(model=model, args=training_arguments(config.fusion.train, tmp_path, 0),
                            gate_lambda=1.0, gammas=[0.1] * 3, gate_loss_form="nll", expert_names=NAMES)
    with torch.no_grad():
        model.moe_layers()[0].fusion_B["up_proj"].add_(0.01)  # a drift term that is not zero
    router = model.moe_layers()[1].router.weight
    results = []
    for response_logits in (False, True):
        batch = SFTCollator(tokenizer.pad_token_id, keep_axis_label=True, response_logits=response_logits)(rows)
        n = torch.tensor(int(batch["labels"][:, 1:].ne(-100).sum()))
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both passes
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=n)
        loss.backward()
        results.append((loss.detach(), outputs.logits.shape[0], router.grad.clone()))
    (loss_full, rows_full, grad_full), (loss_resp, rows_resp, grad_resp) = results
    assert rows_full == len(rows) and rows_resp == int(n)  # [B, T, V] logits against [N, V]
    torch.testing.assert_close(loss_resp, loss_full, atol=1e-6, rtol=1e-6)
    assert grad_full.abs().sum() > 0
    torch.testing.assert_close(grad_resp, grad_full, atol=1e-7, rtol=1e-5)


def test_fuse_trains_router_writes_log_and_loads(built):
    _, config = built
    moe, _ = load_model(str(config.run_path / "moe"))
    out = fuse_run(config)
    log = json.loads((out / "fusion_log.json").read_text())
    assert log["steps"] == 4 and len(log["log_history"]) == 4
    for row in log["log_history"]:
        assert {"lm_loss", "gate_loss", "router_accuracy", "drift_helpful", "drift_harmless", "drift_honest"} <= set(row)
    assert set(log["router_accuracy"]) == set(NAMES)
    assert (out / "routing.json").is_file() and (out / "plots" / "routing_heatmap.png").is_file()
    fused, _ = load_model(str(out))
    assert not any("lora" in n or "fusion_" in n for n, _ in fused.named_parameters())
    for before, after in zip(moe.moe_layers(), fused.moe_layers(), strict=True):
        assert not torch.equal(before.router.weight, after.router.weight)  # the router trained
        assert after.delta_A["gate_proj"].shape[1] == before.delta_A["gate_proj"].shape[1] + config.fusion.lora_r
    q_before = moe.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_before, fused.model.model.layers[0].self_attn.q_proj.weight)  # attention LoRA merged


def test_frozen_router_compat_keeps_the_random_router(built, tmp_path):
    path, config = built
    frozen = load_config(path, [f"run_dir={tmp_path / 'run'}", "compat.frozen_random_router=true",
                                "fusion.train.max_steps=2"])
    (tmp_path / "run").mkdir()
    import shutil

    shutil.copytree(config.run_path / "moe", tmp_path / "run" / "moe")
    fuse_run(frozen)
    moe, _ = load_model(str(tmp_path / "run" / "moe"))
    fused, _ = load_model(str(tmp_path / "run" / "fused"))
    for before, after in zip(moe.moe_layers(), fused.moe_layers(), strict=True):
        assert torch.equal(before.router.weight, after.router.weight)


def test_fuse_resumes_after_a_kill(built, tmp_path):
    """SIGKILL once the first checkpoint is on disk; the same command resumes there and ends with the
    fused weights and loss curve of an uninterrupted run."""
    path, config = built
    import shutil

    fused = {}
    for name in ("uninterrupted", "killed"):
        run = tmp_path / name
        shutil.copytree(config.run_path / "moe", run / "moe")
        args = [sys.executable, "-m", "h3fusion.cli", "fuse", str(path), "--out", str(run),
                "--set", "fusion.train.max_steps=6", "--set", "fusion.train.save_steps=2"]
        if name == "killed":
            run_and_kill_at(args, run / "fused" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
            assert not (run / "fused" / "fusion_log.json").exists()
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("resuming from" in done.stdout) == (name == "killed")
        fused[name] = run / "fused"
    logs = [json.loads((fused[n] / "fusion_log.json").read_text()) for n in fused]
    assert logs[1]["steps"] == 6
    for key in ("loss", "gate_loss"):
        assert [r[key] for r in logs[0]["log_history"] if key in r] == pytest.approx(
            [r[key] for r in logs[1]["log_history"] if key in r], rel=1e-5)
    ours, theirs = (load_file(fused[n] / "model.safetensors") for n in fused)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_router_learning_rate_has_its_own_group(built, tmp_path):
    _, config = built
    model, _ = load_model(str(config.run_path / "moe"))
    prepare_for_fusion(model, config)
    trainer = FusionTrainer(model=model, args=training_arguments(config.fusion.train, tmp_path, 0), gate_lambda=0.01,
                            gammas=[0.0] * 3, gate_loss_form="nll", expert_names=NAMES, router_lr=0.05)
    optimizer = trainer.create_optimizer()
    routers = {id(layer.router.weight) for layer in model.moe_layers()}
    router_groups = [g for g in optimizer.param_groups if any(id(p) in routers for p in g["params"])]
    assert len(router_groups) == 1 and router_groups[0]["lr"] == 0.05
    assert {id(p) for p in router_groups[0]["params"]} == routers
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
