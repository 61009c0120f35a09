"""Model loading: embedded GGUF default, local dirs, other gated-MLP families, clear refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from h3fusion.errors import H3FusionError
from h3fusion.models import base_fingerprint, check_gated_mlp, decoder_layers, load_model, resolve_model_path
from tests.conftest import save_tiny_model


def test_embedded_default_converts_to_plain_safetensors(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    # the same spec resolves to the same cache entry (no second conversion)
    assert resolve_model_path("smollm2-135m") == str(smollm2_dir)


def test_load_embedded_smollm2_generates_text():
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(model)) == 30
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_gguf_file_spec_uses_the_same_conversion(smollm2_dir):
    from h3fusion.models import embedded_gguf

    assert resolve_model_path(str(embedded_gguf("smollm2-135m"))) == str(smollm2_dir)


def test_local_dir_and_dtype(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    fp32, _ = load_model(str(tiny_llama_dir))
    assert fp32.dtype == torch.float32
    # bf16 and fp32 loads of one checkpoint are recognised as the same base
    assert base_fingerprint(model) == base_fingerprint(fp32)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma"])
def test_other_gated_mlp_families_load(tmp_path, smollm2_dir, model_type):
    path = save_tiny_model(tmp_path / model_type, smollm2_dir, model_type)
    model, _ = load_model(str(path))
    check_gated_mlp(model)
    assert model.config.model_type == model_type


def test_model_without_gated_mlp_is_refused(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    with pytest.raises(H3FusionError, match="gate_proj|gated MLP|decoder"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["./no/such/dir", "/tmp/definitely-missing.gguf", "a/b/c"])
def test_unknown_model_spec_is_one_clear_error(spec):
    with pytest.raises(H3FusionError, match="not found"):
        load_model(spec)


def test_unknown_model_from_cli_is_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "model-info", "./no-such-model"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model './no-such-model' not found")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_bare_name_offline_names_the_options():
    with pytest.raises(H3FusionError, match="not found: it is not a local directory.*smollm2-135m"):
        load_model("smollm2-1.7b-typo")


class _Payload:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_legacy_bin_checkpoints_are_never_unpickled_unsafely(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "legacy"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "model-info", str(model_dir)],
                          capture_output=True, text=True)
    assert not marker.exists()  # transformers loads .bin with weights_only=True: the payload never ran
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: model") and "was not unpickled" in proc.stderr
