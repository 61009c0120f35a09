"""Prompt ids: the BOS a tokenizer puts in front (Llama-2, Gemma) reaches training, generation and routing alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from h3fusion import build_moe
from h3fusion.config import load_config
from h3fusion.data import SFTExample, format_prompt
from h3fusion.decoding import decode_batch
from h3fusion.errors import H3FusionError
from h3fusion.experts import align
from h3fusion.models import load_adapter, load_model
from h3fusion.moe.content import template_token_ids
from h3fusion.sft import IGNORE_INDEX, SFTDataset
from h3fusion.tokens import leading_special_ids, prompt_batch, prompt_ids
from h3fusion.truthfulqa_mc import choice_logliks
from tests.conftest import write_config

BOS = "<|im_start|>"  # id 1 in SmolLM2's vocabulary; its own tokenizer never adds it


def add_bos(tokenizer):
    """The tokenizer made to put BOS in front of every text by default, as Llama-2's and Gemma's do."""
    from tokenizers.processors import TemplateProcessing

    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return tokenizer, bos_id


@pytest.fixture()
def tiny_with_bos(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    return (model, *add_bos(tokenizer))


def test_prompt_ids_put_a_tokenizers_bos_in_front_once(tiny_llama_dir):
    _, plain = load_model(str(tiny_llama_dir))
    prompt = format_prompt("Name a prime number.")
    bare = plain(prompt, add_special_tokens=False)["input_ids"]
    assert leading_special_ids(plain) == [] and prompt_ids(plain, prompt) == bare  # SmolLM2: nothing changes
    tokenizer, bos_id = add_bos(plain)
    assert leading_special_ids(tokenizer) == [bos_id]
    assert prompt_ids(tokenizer, prompt) == [bos_id, *bare]
    chat_like = f"{BOS}user\nName a prime number."  # a chat template writes its BOS into the text
    assert prompt_ids(tokenizer, chat_like) == tokenizer(chat_like, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, chat_like).count(bos_id) == 1
    assert [bos_id] in template_token_ids(tokenizer, ["### Response:\n"])  # the BOS is template, never content


def test_prompt_batch_pads_either_side_and_keeps_the_start(tiny_llama_dir):
    tokenizer, bos_id = add_bos(load_model(str(tiny_llama_dir))[1])
    long, short = prompt_ids(tokenizer, "one two three four"), prompt_ids(tokenizer, "one")
    left = prompt_batch(tokenizer, ["one two three four", "one"], "left")
    assert left["input_ids"][1, -len(short):].tolist() == short and left["attention_mask"][1].tolist() == \
        [0] * (len(long) - len(short)) + [1] * len(short)
    right = prompt_batch(tokenizer, ["one two three four", "one"], "right", max_length=3)
    assert right["input_ids"][0].tolist() == long[:3] and right["input_ids"][0, 0] == bos_id
    assert right["attention_mask"][1].tolist() == [1] * len(short) + [0] * (3 - len(short))


def test_training_and_generation_read_the_prompt_with_its_bos(tiny_with_bos):
    model, tokenizer, bos_id = tiny_with_bos
    examples = [SFTExample("helpful", "Name a prime number.", "", "Seven.", "t:1"),
                SFTExample("helpful", "Say hello in French, please, and nothing else.", "", "Bonjour.", "t:2")]
    rows = SFTDataset(examples, tokenizer, 96, "alpaca").rows
    for row, example in zip(rows, examples, strict=True):
        ids = prompt_ids(tokenizer, format_prompt(example.instruction))
        assert row["input_ids"][:len(ids)] == ids and row["input_ids"][0] == bos_id
        assert row["labels"][:len(ids)] == [IGNORE_INDEX] * len(ids)
    prompts = [format_prompt(e.instruction) for e in examples]
    batched = decode_batch(model, tokenizer, prompts, max_new_tokens=6)
    for prompt, answer in zip(prompts, batched, strict=True):  # one at a time, no padding, from its ids with BOS
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert answer == out[0, ids.shape[1]:].tolist()[:len(answer)] and len(answer) > 0
    with torch.no_grad():  # multiple-choice scoring conditions on the same ids
        first = choice_logliks(model, tokenizer, prompts[0], ["Seven."])[0]
        context = prompt_ids(tokenizer, prompts[0])
        n = len(context)
        ids = torch.tensor([context + tokenizer("Seven.", add_special_tokens=False)["input_ids"]])
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        expected = logprobs[n - 1:].gather(1, ids[0, n:, None]).sum().item()
    assert first == pytest.approx(expected, abs=1e-3)


def test_experts_trained_on_other_prompt_ids_are_refused(tmp_path, tiny_llama_dir, data_dir):
    """align records the ids in front of its prompts; build, merges, ensembles and adapter loading refuse an expert
    whose record differs from the tokenizer's, and one an older h3fusion trained without the BOS (no record)."""
    config = load_config(write_config(tmp_path / "c.yaml", model={"base": str(tiny_llama_dir)},
                                      data={"dir": str(data_dir)}, train={"max_steps": 1}))
    expert = align(config, axes=["helpful"])["helpful"]
    meta = json.loads((expert / "h3fusion_expert.json").read_text())
    assert meta["prompt_prefix_ids"] == []  # SmolLM2's tokenizer puts nothing in front
    model, plain = load_model(str(tiny_llama_dir))
    build_moe(model, {"helpful": expert}, top_k=1, tokenizer=plain)  # the same encoding: accepted
    bos_tokenizer, bos_id = add_bos(load_model(str(tiny_llama_dir))[1])
    with pytest.raises(H3FusionError, match=r"starting with ids \[\]; this tokenizer starts them with \[1\]"):
        build_moe(load_model(str(tiny_llama_dir))[0], {"helpful": expert}, top_k=1, tokenizer=bos_tokenizer)
    older = tmp_path / "older"  # what align wrote before it recorded the ids: no prompt_prefix_ids
    shutil.copytree(expert, older)
    (older / "h3fusion_expert.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "prompt_prefix_ids"}))
    build_moe(load_model(str(tiny_llama_dir))[0], {"helpful": older}, top_k=1, tokenizer=plain)  # no BOS: nothing lost
    with pytest.raises(H3FusionError, match="older h3fusion that left out the tokenizer's BOS"):
        build_moe(load_model(str(tiny_llama_dir))[0], {"helpful": older}, top_k=1, tokenizer=bos_tokenizer)
    bos_base = tmp_path / "bos-base"  # the same weights, with a tokenizer that puts BOS in front
    shutil.copytree(tiny_llama_dir, bos_base)
    bos_tokenizer.save_pretrained(bos_base)
    assert load_model(str(bos_base))[1](".")["input_ids"][0] == bos_id
    with pytest.raises(H3FusionError, match="older h3fusion"):
        load_adapter(str(older), base=str(bos_base))


def test_a_gemma3_base_with_bos_aligns_builds_fuses_and_generates(tmp_path, smollm2_dir, data_dir):
    """The study's candidate second base, in small: a Gemma-3 decoder whose tokenizer puts BOS in front. Experts
    record it, the fused MoE (response-token head in training) builds, fuses and answers from prompts with it."""
    from h3fusion.build import build_run
    from h3fusion.fusion import fuse_run
    from h3fusion.sft import response_logits_supported
    from tests.conftest import save_tiny_model

    base = save_tiny_model(tmp_path / "gemma3", smollm2_dir, "gemma3_text")
    tokenizer, bos_id = add_bos(load_model(str(base))[1])
    tokenizer.save_pretrained(base)
    config = load_config(write_config(
        tmp_path / "c.yaml", model={"base": str(base)}, data={"dir": str(data_dir)}, train={"max_steps": 2},
        moe={"router_init": "fitted", "prototype_prompts": 4},
        fusion={"examples_per_axis": 4, "heldout_prompts": 2, "train": {"max_steps": 2, "batch_size": 4}}))
    for expert in align(config).values():
        assert json.loads((expert / "h3fusion_expert.json").read_text())["prompt_prefix_ids"] == [bos_id]
    build_run(config)
    fused, fused_tokenizer = load_model(str(fuse_run(config)))
    assert fused.model.config.model_type == "gemma3_text" and response_logits_supported(fused)  # the MoE wrapper
    assert leading_special_ids(fused_tokenizer) == [bos_id]
    answers = decode_batch(fused, fused_tokenizer, [format_prompt("Name a prime number."), format_prompt("Hi")],
                           max_new_tokens=4)
    assert all(len(answer) > 0 for answer in answers)
