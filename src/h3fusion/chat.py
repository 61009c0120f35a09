"""`h3fusion chat`: talk to any model in the terminal, and turn a fused model's alignment dial live.

Each answer is greedy (``decoding.decode_batch``, as ``generate``) on the conversation so far, in the
prompt template ``generate`` uses. For a fused model every answer is followed by how its router
split the mass between the experts, per band of layers (early / middle / late thirds: the mean
router probability of each expert over the answer's tokens, ``moe.routing.answer_routing``).
Slash commands change the dial between answers:

    /bias harmless=2 [name=value ...]   router-logit bias per expert (names not given: 0)
    /topk 1                             experts per token
    /reset                              bias and top-k as loaded, and a new conversation
    /quit                               (or end of input, Ctrl-D)
"""

from __future__ import annotations

from collections.abc import Callable

from h3fusion.config import GenerateConfig, parse_expert_bias
from h3fusion.data.prompts import format_conversation
from h3fusion.generate import cut_at_stops

COMMANDS = "/bias name=value ... · /topk K · /reset · /quit"


class ChatSession:
    """A conversation with one model; ``say`` answers, ``command`` applies a slash command."""

    def __init__(self, model, tokenizer, prompt_format: str = "alpaca", max_new_tokens: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_format, self.max_new_tokens = prompt_format, max_new_tokens
        self.stop_strings = GenerateConfig().stop_strings  # the run's defaults: cut template echoes
        self.turns: list[tuple[str, str]] = []
        format_conversation([], "", prompt_format, tokenizer)  # a missing chat template is refused up front
        self.fused = hasattr(model, "set_expert_bias")
        if self.fused:  # what /reset returns to
            self.loaded_bias = list(model.config.expert_bias)
            self.loaded_top_k = model.config.num_experts_per_tok

    def say(self, message: str) -> tuple[str, list[tuple[str, list[float]]] | None]:
        """(the answer, its routing split per layer band, or None for a model without a router)."""
        from h3fusion.decoding import decode_batch

        prompt = format_conversation(self.turns, message, self.prompt_format, self.tokenizer)
        ids = decode_batch(self.model, self.tokenizer, [prompt], max_new_tokens=self.max_new_tokens,
                           stop_strings=self.stop_strings)[0]
        answer = cut_at_stops(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop_strings)
        self.turns.append((message, answer))
        if not self.fused or not ids:
            return answer, None
        from h3fusion.moe.routing import answer_routing, layer_bands
        from h3fusion.tokens import prompt_ids

        return answer, layer_bands(answer_routing(self.model, prompt_ids(self.tokenizer, prompt), ids))

    def command(self, line: str) -> str | None:
        """Apply a slash command; returns what to tell the user, or None for /quit."""
        name, _, args = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return None
        if name == "/reset":
            self.turns = []
            if self.fused:
                self.model.set_expert_bias(self.loaded_bias)
                self.model.set_top_k(self.loaded_top_k)
            return "new conversation" + (f"; {self.dial()}" if self.fused else "")
        if name not in ("/bias", "/topk"):
            return f"unknown command {name}; commands: {COMMANDS}"
        if not self.fused:
            return f"{name} needs a fused h3fusion model; this one has no router"
        try:
            if name == "/bias":
                self.model.set_expert_bias(parse_expert_bias(args.split()))
            else:
                self.model.set_top_k(int(args))
        except ValueError as error:
            usage = "/bias name=number ..." if name == "/bias" else f"/topk 1..{len(self.model.expert_names)}"
            return f"{name} {args}: {error}; use {usage}"
        return self.dial()

    def dial(self) -> str:
        bias = ", ".join(f"{n} {b:g}" for n, b in zip(self.model.expert_names, self.model.config.expert_bias,
                                                       strict=True))
        return f"bias: {bias}; top_k {self.model.config.num_experts_per_tok}"


def run_chat(session: ChatSession, console, read: Callable[[str], str] | None = None, echo: bool = False) -> None:
    """The loop: read a line, answer it or apply the command, until /quit or end of input.

    ``echo`` prints each line read after its prompt: with input from a pipe the output then reads
    like the terminal session (nothing else echoes it).
    """
    read = read or console.input
    kind = "fused model, experts " + ", ".join(session.model.expert_names) if session.fused else "model"
    console.print(f"[bold]h3fusion chat[/] ({kind}); {COMMANDS}")
    if session.fused:
        console.print(session.dial())
    while True:
        try:
            line = read("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if echo:
            console.print(line, markup=False, highlight=False)
        if not line:
            continue
        if line.startswith("/"):
            reply = session.command(line)
            if reply is None:
                return
            console.print(f"[dim]{reply}[/]", highlight=False)
            continue
        answer, split = session.say(line)
        console.print("[bold blue]model>[/] ", end="")
        if answer:
            console.print(answer, markup=False, highlight=False)
        else:
            console.print("[dim](empty answer)[/]")
        for band, shares in split or []:
            values = "  ".join(f"{n} {p:.2f}" for n, p in zip(session.model.expert_names, shares, strict=True))
            console.print(f"[dim]routing {band}:[/] {values}", highlight=False)
