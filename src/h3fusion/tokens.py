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

from h3fusion.errors import H3FusionError


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (``[bos]`` for Llama-2 or Gemma, ``[]`` for SmolLM2)."""
    bare = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x")["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    return []


def prompt_ids(tokenizer, prompt: str, lead: Sequence[int] | None = None) -> list[int]:
    """``prompt``'s ids with the tokenizer's leading special tokens in front, once (``lead``: those tokens, for a
    caller that encodes many prompts and finds them once)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    lead = leading_special_ids(tokenizer) if lead is None else list(lead)
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

    lead = leading_special_ids(tokenizer)
    rows = [prompt_ids(tokenizer, prompt, lead)[:max_length] for prompt in prompts]
    width = max((len(row) for row in rows), default=0)
    pad = pad_id(tokenizer)
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if side == "left" else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
    return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


def check_prompt_prefix(label: str, recorded: Sequence[int] | None, by_h3fusion: bool, tokenizer) -> None:
    """Refuse an expert adapter (``label`` names it) trained on prompts that began otherwise than ``tokenizer``
    begins them. ``recorded``: the ids `h3fusion align` saw in front of its prompts (``prompt_prefix_ids`` of its
    h3fusion_expert.json). h3fusion before this module left out a BOS its tokenizer puts in front (Llama-2, Gemma)
    and recorded nothing (``by_h3fusion`` and no record); a stock PEFT adapter records nothing and is taken as is."""
    prefix = leading_special_ids(tokenizer)
    if recorded is None and by_h3fusion and prefix:
        raise H3FusionError(f"{label} was trained by an older h3fusion that left out the tokenizer's BOS (ids "
                            f"{prefix}) in front of its prompts; train it again (delete it and run `h3fusion align`)")
    if recorded is not None and list(recorded) != prefix:
        raise H3FusionError(f"{label} was trained on prompts starting with ids {list(recorded)}; this tokenizer "
                            f"starts them with {prefix}: use the base model and tokenizer it was trained with")
