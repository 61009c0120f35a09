"""Gemma-3-270m base, untrained: the response loss of 24 held-out training examples per axis with and without
its BOS in front of the Alpaca prompt (h3fusion before commit 3822170 fed prompts without it).

    PYTHONPATH=src H3FUSION_CACHE=... python results/cpu-bench/dev/gemma_bos_check.py GEMMA_GGUF DATA_DIR

2026-12-06, one thread: helpful 3.278 without BOS, 2.060 with; harmless 3.297 without, 2.163 with.
"""

from __future__ import annotations

import sys

import torch

from h3fusion.config import load_config
from h3fusion.data import format_prompt, load_heldout_train
from h3fusion.models import load_model
from h3fusion.tokens import prompt_ids

EXAMPLES = 24


def response_loss(model, tokenizer, examples, bos: bool, max_length: int) -> float:
    """Mean next-token loss over the examples' response tokens (eos included), one example at a time."""
    total, count = 0.0, 0
    for example in examples:
        prompt = format_prompt(example.instruction, example.input, "alpaca")
        ids = prompt_ids(tokenizer, prompt) if bos else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = torch.tensor([(ids + response)[:max_length]])
        labels = input_ids.clone()
        labels[0, : len(ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss.item()
        tokens = int((labels[0, 1:] != -100).sum())
        total, count = total + loss * tokens, count + tokens
    return total / count


def main(gguf: str, data_dir: str) -> None:
    torch.set_num_threads(1)
    config = load_config("configs/cpu-bench.yaml", [f"model.base={gguf}", f"data.dir={data_dir}"])
    model, tokenizer = load_model(config.model.base)
    model.eval()
    for axis in ("helpful", "harmless"):  # the honest expert trains on every TruthfulQA answer: none held out
        examples = load_heldout_train(axis, config, EXAMPLES)
        without, with_bos = (response_loss(model, tokenizer, examples, bos, config.data.max_length)
                             for bos in (False, True))
        print(f"{axis}: response loss without BOS {without:.3f}, with BOS {with_bos:.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
