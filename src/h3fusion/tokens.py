"""The token ids a model reads for a prompt: the one place that decides what goes in front of it.

A tokenizer that puts special tokens before a text by default (the BOS of Llama-2, Mistral, Gemma) expects them
in front of every input: its model was trained so, and Gemma's answers degrade without its BOS. The Alpaca prompt
is plain text, so it gets them here; a chat template writes its BOS into the text itself, so it does not get a
second. A tokenizer that adds nothing (SmolLM2's) is unaffected. Training, generation, multiple-choice scoring,
router init and the routing statistics all encode prompts through this module, so each sees the ids the others
see; the response that follows a prompt in training is tokenised on its own, without special tokens
(``sft.SFTDataset``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (``[bos]`` for Llama-2 or Gemma, ``[]`` for SmolLM2)."""
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x")["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    return []


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt``'s ids with the tokenizer's leading special tokens in front, once."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    lead = leading_special_ids(tokenizer)
    return ids if ids[:len(lead)] == lead else lead + ids


def pad_id(tokenizer) -> int:
    """The id padding positions hold (masked out; any id will do where a tokenizer has no pad token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    return 0


def prompt_batch(tokenizer, prompts: Sequence[str], side: str, max_length: int | None = None):
    """``input_ids`` and ``attention_mask`` of ``prompts`` (``prompt_ids``, cut to their first ``max_length``
    tokens), padded on ``side`` ("left" to generate from the right edge, "right" to read each prompt from 0), as
    the tokenizer's own call returns them (a ``BatchEncoding``)."""
    from transformers import BatchEncoding

    rows = [prompt_ids(tokenizer, prompt)[:max_length] for prompt in prompts]
    width = max((len(row) for row in rows), default=0)
    pad = pad_id(tokenizer)
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if side == "left" else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
    return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})
