"""Stage 0 (data): the prompt text every stage feeds the model, ending where the response begins.

``alpaca`` is the Stanford Alpaca template the paper trains and evaluates with; ``chat`` uses the
tokenizer's own chat template (for instruction-tuned bases). The tokenizer is used duck-typed, so
this module imports no model code.
"""

from __future__ import annotations

from typing import Any

from h3fusion.axes import data_module
from h3fusion.errors import H3FusionError

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
STYLES = ("alpaca", "chat")
PROMPT_FIELDS = ("prompt", "instruction", "question")
"""The fields a record's prompt may sit in (each axis's test records use one: its data module's ``PROMPT_FIELD``)."""


def prompt_text(record: dict[str, Any], origin: str = "record", axis: str | None = None) -> tuple[str, str]:
    """(prompt, input) of a record: the field of ``axis``'s test records when given and present (its data module's
    ``PROMPT_FIELD``), else the first of ``PROMPT_FIELDS``; plus the record's ``input`` (empty when none)."""
    field = data_module(axis).PROMPT_FIELD if axis else None
    for name in (field, *PROMPT_FIELDS) if field else PROMPT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name], record.get("input") or ""
    raise H3FusionError(f"{origin} has none of the fields {', '.join(PROMPT_FIELDS)}; add one")


def format_prompt(instruction: str, input: str = "", style: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt for one example; the model's response is appended right after it."""
    if style == "alpaca":
        template = ALPACA_WITH_INPUT if input.strip() else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=input)  # values are not re-parsed
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
            raise H3FusionError(
                f"data.prompt_format is 'chat' but {name} has no chat template; "
                "use data.prompt_format: alpaca, or a base model that ships a chat template"
            )
        content = f"{instruction}\n\n{input}" if input.strip() else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise H3FusionError(f"unknown prompt style {style!r}; choose from {list(STYLES)}")


def format_conversation(turns: list[tuple[str, str]], message: str, style: str = "alpaca",
                        tokenizer: Any = None) -> str:
    """The prompt for ``message`` after earlier (user, answer) ``turns`` of one conversation.

    ``chat`` renders every turn through the tokenizer's chat template; ``alpaca`` has no turns of
    its own, so each earlier exchange is one more ``### Instruction`` / ``### Response`` block
    after the template's header, as the experts saw single exchanges in training.
    """
    if style == "chat":
        format_prompt(message, "", style, tokenizer)  # the same refusal when there is no chat template
        messages = [m for user, answer in turns
                    for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True)
    if not turns:
        return format_prompt(message, "", style, tokenizer)
    text = format_prompt(turns[0][0], "", style, tokenizer) + turns[0][1]
    for user, answer in [*turns[1:], (message, None)]:
        text += f"\n\n### Instruction:\n{user}\n\n### Response:\n" + (answer or "")
    return text


_SLOTS = ("\x00H3FUSION-SLOT-1\x00", "\x00H3FUSION-SLOT-2\x00", "\x00H3FUSION-SLOT-3\x00")  # never in real text


def template_pieces(style: str = "alpaca", tokenizer: Any = None) -> list[str]:
    """The fixed text that every prompt of ``style`` shares: the pieces ``format_prompt`` and
    ``format_conversation`` put around and between the instruction, the input and earlier turns.

    Every other character of a prompt is content. A model that matches these pieces in its input tokens
    sees which tokens are the request and which are the template (their hidden states are the same for
    every prompt, so they tell a router nothing about the request).
    """
    if style == "alpaca":
        pieces = [template.split("{instruction}")[0] for template in (ALPACA_NO_INPUT, ALPACA_WITH_INPUT)]
        pieces += ["\n\n### Input:\n", "\n\n### Response:\n", "\n\n### Instruction:\n"]
    else:
        user, answer, again = _SLOTS
        pieces = [*format_prompt(user, "", style, tokenizer).split(user)]
        conversation = format_conversation([(user, answer)], again, style, tokenizer)
        for slot in _SLOTS:
            conversation = conversation.replace(slot, _SLOTS[0])
        pieces += conversation.split(_SLOTS[0])
    return list(dict.fromkeys(piece for piece in pieces if piece))
