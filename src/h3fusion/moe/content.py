"""Which tokens of a model input are content and which are the prompt template.

A fused model stores the token ids of its prompt format's fixed pieces (``H3FusionConfig.template_ids``,
from ``h3fusion.data.prompts.template_pieces``: the Alpaca preamble and ``### Response:`` markers, or
the chat template's role tokens). Every occurrence of a piece in the input is template; the rest is
content. Template tokens have the same hidden states in every prompt, so the gating loss, the routing
statistics and sequence routing's decision count content tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from h3fusion.tokens import leading_special_ids


def template_mask(input_ids: Tensor, pieces: Sequence[Sequence[int]]) -> Tensor:
    """Bool [B, T]: True on every token that is part of an occurrence of one of ``pieces`` in ``input_ids``."""
    mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    length = input_ids.shape[-1]
    for piece in pieces:
        n = len(piece)
        if not n or n > length:
            continue
        target = torch.as_tensor(list(piece), dtype=input_ids.dtype, device=input_ids.device)
        starts = (input_ids.unfold(-1, n, 1) == target).all(dim=-1)  # [B, T - n + 1]
        if not starts.any():
            continue
        for offset in range(n):  # mark the n tokens of every occurrence
            mask[..., offset : offset + starts.shape[-1]] |= starts
    return mask


def template_token_ids(tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """The pieces as token ids, as they tokenise inside a prompt (plus a BOS token the tokenizer adds).

    Each piece also without its leading / trailing whitespace: content that starts or ends with
    whitespace merges with the template's newlines into one token, and the rest of the piece still matches.
    """
    variants = dict.fromkeys(v for piece in pieces for v in (piece, piece.strip(), piece.lstrip(), piece.rstrip()))
    ids = [list(tokenizer(piece, add_special_tokens=False)["input_ids"]) for piece in variants if piece]
    ids.append(leading_special_ids(tokenizer))  # what h3fusion.tokens puts in front of every prompt
    return [piece for piece in ids if piece]
