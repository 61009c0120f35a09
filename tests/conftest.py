"""Shared fixtures: the real SmolLM2 (converted once per cache), tiny random decoders, the data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the real data: where H3FUSION_DATA_DIR points (the Makefile sets it), else beside the repo
SHARED_DATA = Path(os.environ.get("H3FUSION_DATA_DIR") or REPO.parent / "shared" / "data")

# Fail fast on any accidental hub access, and keep converted models in the repo's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("H3FUSION_CACHE", str(REPO / ".cache" / "h3fusion"))
os.environ.setdefault("H3FUSION_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF to safetensors (cached)."""
    from h3fusion.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m"))


def save_tiny_model(path: Path, smollm2_dir: Path, model_type: str = "llama", seed: int = 0) -> Path:
    """A random-init 2-layer decoder with SmolLM2's real tokenizer (vocab 49,152), saved to ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dims = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True)
    if model_type in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        dims["head_dim"] = 16
    config = AutoConfig.for_model(model_type, **dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


def write_config(path: Path, **sections) -> Path:
    """A run config YAML for tests: small defaults, overridable per section."""
    import yaml

    config = {
        "name": "test",
        "run_dir": str(path.parent / "run"),
        "seed": 0,
        "model": {"base": "smollm2-135m"},
        "data": {"helpful_train_size": 16, "harmless_train_size": 16, "honest_train_size": 16, "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_steps": 2},
        "baselines": {"merges": ["linear"], "multitask_sft": False, "authors_code": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The real data when it sits beside the repo, else the tiny fixture directory."""
    if (SHARED_DATA / "SOURCES.md").is_file():
        return SHARED_DATA
    from tests.data_fixtures import write_data_dir

    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory) -> Path:
    """One cache of small-fit offline judges shared by the tests that evaluate (fitted once)."""
    return tmp_path_factory.mktemp("judges")


SMALL_JUDGES = {"fit_max_rows": 100}
"""Smoke-test judges: fast to fit, figures meaningless. test_judges fits them at this size too, into the session's
`judge_cache`, so the tests that evaluate and those that check the judges share one fit."""
EVALUATED = {"helpful_n": 4, "harmless_n": 4, "honest_n": 4}


def run_and_kill_at(args: list[str], marker: Path, timeout: float = 300) -> None:
    """Start a CLI subprocess and SIGKILL it as soon as ``marker`` exists (a checkpoint, a cache file)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"{marker} never appeared before the process ended"
