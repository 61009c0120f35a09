"""The evaluator's decoding loop: batched, KV-cached, and finished rows leave the batch.

``model.generate`` keeps computing every row of a batch until the longest answer ends, and
checks stop strings by re-decoding each row at every step. Answers to the evaluated prompts vary
from a few tokens to the limit, so here a row leaves the batch (and its KV cache rows are dropped)
as soon as it emits EOS or a stop string, and the prompt's logits are computed for its last
position only. Greedy decoding picks the same tokens as ``model.generate``.

A sequence-routed MoE decides its routing on the prompt (the first forward) and keeps that decision per
row; rows that leave the batch leave it too (``select_rows``).

The same loop decodes the logit ensemble: with ``adapters`` (names of LoRA adapters loaded in one
PEFT model) every prompt row is repeated once per adapter, one forward runs all of them over the
shared base (PEFT mixed-adapter batches), and the next token comes from the mean of the adapters'
next-token distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from h3fusion.tokens import prompt_batch

STOP_TAIL_TOKENS = 16  # stop strings are looked for in the decoded last tokens of a row, not the whole answer


def next_token_logprobs(model, *, adapters: Sequence[str] | None = None, **inputs):
    """(log-probabilities of the next token per prompt row [rows, vocab], model output).

    With ``adapters`` the batch holds ``len(adapters)`` consecutive copies of each row, one per
    adapter, and the result is log(mean_k p_k): the logit ensemble's distribution.
    """
    if adapters:
        inputs["adapter_names"] = list(adapters) * (inputs["input_ids"].shape[0] // len(adapters))
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    if adapters:
        n = len(adapters)
        logprobs = torch.logsumexp(logprobs.view(-1, n, logprobs.shape[-1]), dim=1) - math.log(n)
    return logprobs, out


def _choose(logprobs: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logprobs.argmax(dim=-1)
    probs = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 0.6,
    top_p: float = 1.0,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    adapters: Sequence[str] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (EOS excluded; a stop string ends a row but stays in its ids)."""
    device = next(model.parameters()).device
    batch = prompt_batch(tokenizer, prompts, "left").to(device)  # every row continues from the right edge
    copies = len(adapters) if adapters else 1
    input_ids = batch["input_ids"].repeat_interleave(copies, dim=0)
    attention = batch["attention_mask"].repeat_interleave(copies, dim=0)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set(tokenizer.eos_token_id or [])
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # prompt index of each row still decoding
    cache = cache_name = None
    for _ in range(max_new_tokens):
        cache_arg = {} if cache is None else {cache_name: cache}
        logprobs, out = next_token_logprobs(model, adapters=adapters, input_ids=input_ids, attention_mask=attention,
                                            position_ids=positions, **cache_arg)
        cache_name = "cache" if "cache" in out else "past_key_values"  # renamed in recent transformers
        cache = out[cache_name]
        tokens = _choose(logprobs, do_sample, temperature, top_p, generator).tolist()
        keep = []
        for row, (index, token) in enumerate(zip(active, tokens, strict=True)):
            if token in eos:
                continue
            answers[index].append(token)
            if stop_strings:
                tail = tokenizer.decode(answers[index][-STOP_TAIL_TOKENS:], skip_special_tokens=True)
                if any(stop in tail for stop in stop_strings):
                    continue
            keep.append(row)
        if not keep:
            break
        next_ids = torch.tensor([tokens[row] for row in keep], device=device).repeat_interleave(copies)
        if len(keep) < len(active):  # finished rows leave the batch and the KV cache
            rows = torch.tensor([row * copies + c for row in keep for c in range(copies)], device=device)
            cache.batch_select_indices(rows)
            if hasattr(model, "select_rows"):  # a sequence-routed MoE keeps one routing decision per row
                model.select_rows(rows)
            attention, positions = attention[rows], positions[rows]
            active = [active[row] for row in keep]
        input_ids = next_ids[:, None]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return answers
