"""Stage 1: LoRA experts on the FFN only, stock-PEFT reloadable, skipped when complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from h3fusion.config import load_config
from h3fusion.data import load_train
from h3fusion.experts import align
from h3fusion.models import load_model
from h3fusion.runs import expert_is_complete
from h3fusion.sft import SFTCollator, SFTDataset, response_logits_supported
from tests.conftest import run_and_kill_at, write_config


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_llama_dir, data_dir):
    """Three experts on the tiny Llama (4 steps each)."""
    root = tmp_path_factory.mktemp("align")
    path = write_config(root / "config.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)})
    config = load_config(path)
    return config, align(config)


def test_three_experts_written_as_peft_adapters(aligned):
    config, paths = aligned
    assert list(paths) == ["helpful", "harmless", "honest"]
    for axis, path in paths.items():
        assert path == config.run_path / "experts" / axis and expert_is_complete(path)
        adapter = json.loads((path / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
        assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
        log = json.loads((path / "training_log.json").read_text())
        assert log["steps"] == 4 and len(log["log_history"]) == 4
        assert (path / "config.yaml").is_file()
        assert not (path / "checkpoints").exists()


def test_expert_changes_only_ffn_projections_and_reloads_with_stock_peft(aligned, tiny_llama_dir):
    from peft import PeftModel

    _, paths = aligned
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    for path in paths.values():
        weights = load_file(path / "adapter_model.safetensors")
        assert weights and all(any(f"mlp.{p}." in k for p in ("gate_proj", "up_proj", "down_proj")) for k in weights)
        # the adapter's function, computed by hand: W + (alpha/r) * B @ A on each FFN projection
        manual, _ = load_model(str(tiny_llama_dir))
        base_state = {k: v.clone() for k, v in manual.state_dict().items()}
        scale = 8 / 4
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace("lora_A", "lora_B")]
            module_name = key.split("base_model.model.", 1)[1].split(".lora_A")[0]
            manual.get_submodule(module_name).weight.data += scale * b @ a
        changed = {k for k, v in manual.state_dict().items() if not torch.equal(v, base_state[k])}
        assert changed and all(".mlp." in k and k.endswith("_proj.weight") for k in changed)
        assert any(torch.count_nonzero(weights[k]) for k in weights if "lora_B" in k), "adapter did not train"
        base, _ = load_model(str(tiny_llama_dir))
        reloaded = PeftModel.from_pretrained(base, str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, manual(ids).logits, atol=1e-5, rtol=1e-5)


def test_rerun_skips_complete_experts(aligned):
    config, paths = aligned
    stamps = {a: (p / "adapter_model.safetensors").stat().st_mtime_ns for a, p in paths.items()}
    messages = []
    align(config, log=messages.append)
    assert all("skipping" in m for m in messages) and len(messages) == 3
    assert stamps == {a: (p / "adapter_model.safetensors").stat().st_mtime_ns for a, p in paths.items()}


def test_cli_align_one_axis(tmp_path, tiny_llama_dir, data_dir):
    path = write_config(tmp_path / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
                        train={"max_steps": 2})
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "align", str(path), "--axis", "honest",
                           "--out", str(tmp_path / "run2")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"expert honest: {tmp_path / 'run2' / 'experts' / 'honest'}" in proc.stdout
    assert expert_is_complete(tmp_path / "run2" / "experts" / "honest")
    assert not (tmp_path / "run2" / "experts" / "helpful").exists()


def test_missing_data_dir_is_one_clear_error(tmp_path, tiny_llama_dir):
    path = write_config(tmp_path / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(tmp_path / "nope")})
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "align", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: data directory") and "nope" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_smollm2_experts_loss_falls(tmp_path, data_dir):
    """The real SmolLM2, a few real steps per axis: each expert's training loss falls."""
    path = write_config(tmp_path / "c.yaml", data={"dir": str(data_dir), "max_length": 96},
                        train={"max_steps": 8, "batch_size": 4, "lr": 2e-3, "save_steps": 100})
    config = load_config(path)
    for axis, expert in align(config).items():
        log = json.loads((expert / "training_log.json").read_text())
        curve = [row["loss"] for row in log["log_history"]]
        assert len(curve) == 8 and log["loss_window"] == 4  # half the steps when there are fewer than 2 x 10
        assert log["first_loss"] == pytest.approx(sum(curve[:4]) / 4)
        assert log["last_loss"] == pytest.approx(sum(curve[-4:]) / 4)
        assert log["last_loss"] < log["first_loss"], (axis, curve)


def test_align_resumes_after_a_kill_to_the_uninterrupted_adapter(tmp_path, tiny_llama_dir, data_dir):
    """SIGKILL once the first checkpoint is on disk; the same command resumes there and ends with the
    adapter and loss curve of an uninterrupted run."""
    runs = {}
    for name in ("uninterrupted", "killed"):
        (tmp_path / name).mkdir()
        path = write_config(tmp_path / name / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
                            train={"max_steps": 6, "save_steps": 2})
        args = [sys.executable, "-m", "h3fusion.cli", "align", str(path), "--axis", "honest"]
        expert = tmp_path / name / "run" / "experts" / "honest"
        if name == "killed":
            run_and_kill_at(args, expert / "checkpoints" / "checkpoint-2" / "trainer_state.json")
            assert not expert_is_complete(expert)
        proc = subprocess.run(args, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("resuming from" in proc.stdout) == (name == "killed")
        runs[name] = expert
    logs = [json.loads((runs[n] / "training_log.json").read_text()) for n in runs]
    assert [r["loss"] for r in logs[0]["log_history"]] == pytest.approx([r["loss"] for r in logs[1]["log_history"]],
                                                                       rel=1e-6)
    ours, theirs = (load_file(runs[n] / "adapter_model.safetensors") for n in runs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_lm_head_runs_on_response_tokens_only_with_the_same_loss_and_gradients(aligned, tiny_llama_dir):
    """The collator's ``logits_to_keep`` mask: logits for the N response positions only, the same loss and the
    same LoRA gradients as the full head (what the Trainer computes, num_items_in_batch included)."""
    from peft import LoraConfig, get_peft_model

    config, _ = aligned
    model, tokenizer = load_model(str(tiny_llama_dir))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                             init_lora_weights=False))
    assert response_logits_supported(model)
    examples = load_train("helpful", config)[:3] + load_train("honest", config)[:3]
    rows = SFTDataset(examples, tokenizer, 96, "alpaca").rows
    full = SFTCollator(tokenizer.pad_token_id)(rows)
    response = SFTCollator(tokenizer.pad_token_id, response_logits=True)(rows)
    assert "logits_to_keep" not in full and "shift_labels" not in full
    n = int(full["labels"][:, 1:].ne(-100).sum())
    assert response["shift_labels"].shape == (n,) and int(response["logits_to_keep"].sum()) == n
    results = []
    for batch in (full, response):
        model.zero_grad()
        out = model(**batch, num_items_in_batch=torch.tensor(n))
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), out.logits.shape, grads))
    (loss_full, shape_full, grads_full), (loss_resp, shape_resp, grads_resp) = results
    assert shape_full[:2] == full["input_ids"].shape and shape_resp[0] == n < shape_full[0] * shape_full[1]
    torch.testing.assert_close(loss_resp, loss_full, atol=1e-6, rtol=1e-6)
    for name, grad in grads_full.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads_resp[name], grad, atol=1e-7, rtol=1e-5)


def test_response_logits_not_used_where_the_model_cannot_take_a_mask():
    """CSM's depth decoder takes ``logits_to_keep`` but slices it itself (no boolean masks), though its module
    imports transformers' slicer for another class: the collator must not send it a mask."""
    from transformers import CsmDepthDecoderConfig, CsmDepthDecoderForCausalLM

    model = CsmDepthDecoderForCausalLM(CsmDepthDecoderConfig(
        num_codebooks=4, backbone_hidden_size=16, vocab_size=32, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert model._supports_logits_to_keep() and not response_logits_supported(model)
    assert not response_logits_supported(torch.nn.Linear(2, 2))


def test_align_trains_no_expert_that_moe_adapters_gives(tmp_path, tiny_llama_dir, data_dir):
    """Every later stage reads a given adapter (runs.adapter_paths): training one of its own would be hours for
    nothing, so the given axis is skipped and the others are trained."""
    from tests.moe_fixtures import make_adapter

    given = make_adapter(tiny_llama_dir, tmp_path / "mine", seed=1)
    path = write_config(tmp_path / "c.yaml", model={"base": str(tiny_llama_dir)}, data={"dir": str(data_dir)},
                        train={"max_steps": 1}, moe={"adapters": {"helpful": str(given)}})
    config, said = load_config(path), []
    paths = align(config, ["helpful", "honest"], log=said.append)
    assert paths["helpful"] == given and any("helpful: given by moe.adapters" in line for line in said)
    assert not (tmp_path / "run" / "experts" / "helpful").exists()
    assert expert_is_complete(paths["honest"]) and paths["honest"] == tmp_path / "run" / "experts" / "honest"
