"""`h3fusion chat`, driven through stdin: answers, the routing split of a fused model, and the live dial."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from h3fusion.data.prompts import format_conversation, format_prompt
from tests.moe_fixtures import make_adapter

NAMES = ["helpful", "harmless", "honest"]
ROUTING = re.compile(r"^routing (early|late) \(layers (\d)-(\d)\): helpful ([\d.]+)  harmless ([\d.]+)  honest ([\d.]+)$")


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory, tiny_llama_dir):
    """A saved h3fusion MoE of the tiny Llama and three real PEFT adapters (2 layers: early and late bands)."""
    from h3fusion import build_moe
    from h3fusion.models import load_tokenizer

    root = tmp_path_factory.mktemp("chat")
    adapters = {name: make_adapter(tiny_llama_dir, root / name, seed=i) for i, name in enumerate(NAMES)}
    out = root / "fused"
    build_moe(str(tiny_llama_dir), adapters, top_k=2).save_pretrained(out)
    load_tokenizer(str(tiny_llama_dir)).save_pretrained(out)
    return out


def chat(model_dir, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "h3fusion.cli", "chat", str(model_dir), "--max-new-tokens", "4",
                           *extra], input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          timeout=600)


def splits(stdout: str) -> list[dict[str, dict[str, float]]]:
    """Each answer's routing split: band -> expert -> mean router probability."""
    answers, current = [], None
    for line in stdout.splitlines():
        if line.startswith("model>"):
            current = {}
            answers.append(current)
        elif match := ROUTING.match(line.strip()):
            current[match[1]] = dict(zip(NAMES, map(float, match.groups()[3:]), strict=True))
    return answers


def test_chat_with_a_fused_model_shows_routing_and_applies_the_dial(fused_dir):
    done = chat(fused_dir, ["Name a colour.", "/bias harmless=8", "Name a colour.", "/topk 1",
                            "/bias nobody=1", "/reset", "Name a colour."])  # then end of input
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    answers = splits(done.stdout)
    assert len(answers) == 3 and all(set(a) == {"early", "late"} for a in answers), done.stdout
    first, biased, after_reset = answers
    for band in ("early", "late"):
        assert sum(first[band].values()) == pytest.approx(1.0, abs=0.02)
        # a +8 logit bias moves the mass to that expert, in every band
        assert biased[band]["harmless"] > 0.9 and biased[band]["harmless"] > first[band]["harmless"] + 0.2
    assert after_reset == first  # /reset: the loaded dial and no history, so the same prompt routes the same
    assert "bias: helpful 0, harmless 8, honest 0; top_k 2" in done.stdout
    assert "top_k 1" in done.stdout
    assert "/bias nobody=1: unknown expert(s) ['nobody']" in done.stdout  # a bad command is a message, and the chat goes on


def test_chat_with_a_plain_model_answers_and_quits(tiny_llama_dir):
    done = chat(tiny_llama_dir, ["Say hi.", "/bias harmless=2", "/quit", "never read"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model>") == 1 and "routing" not in done.stdout
    assert "/bias needs a fused h3fusion model" in done.stdout


def test_alpaca_conversation_continues_the_template():
    first = format_prompt("Name a colour.")
    prompt = format_conversation([("Name a colour.", "Blue.")], "And another?")
    assert prompt == first + "Blue.\n\n### Instruction:\nAnd another?\n\n### Response:\n"
    assert format_conversation([], "Name a colour.") == first
