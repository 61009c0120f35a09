"""Decoding loop and ensembles: greedy equals `model.generate`, the logit ensemble is the mean of
the experts' distributions, the rerank ensemble keeps the best-judged answer."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from h3fusion.baselines.ensembles import load_logit_ensemble, rerank
from h3fusion.config import load_config
from h3fusion.data import format_prompt
from h3fusion.decoding import decode_batch, next_token_logprobs
from h3fusion.errors import H3FusionError
from h3fusion.models import load_model
from h3fusion.truthfulqa_mc import mc_scores
from tests.conftest import write_config
from tests.moe_fixtures import make_adapter

PROMPTS = ["Name a colour.", "Write a haiku about the sea and the wind, please.", "2 + 2 ="]
AXES = ["helpful", "harmless", "honest"]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble-adapters")
    return {axis: make_adapter(tiny_llama_dir, root / axis, seed=k + 1) for k, axis in enumerate(AXES)}


def ensemble_model(root, base_dir, adapters):
    """The logit ensemble's model as a run loads it: every expert adapter in one PEFT model."""
    config = load_config(write_config(root / "c.yaml", model={"base": str(base_dir)},
                                      moe={"adapters": {axis: str(path) for axis, path in adapters.items()}}))
    model, tokenizer = load_logit_ensemble(config)
    assert model.ensemble_adapters == AXES
    return model, tokenizer


def test_greedy_decoding_matches_model_generate(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    ours = decode_batch(model, tokenizer, PROMPTS, max_new_tokens=8)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:]
    for row, ids in zip(out.tolist(), ours, strict=True):
        expected = []
        for token in row:  # generate pads a finished row; ours stops it
            if token == tokenizer.eos_token_id:
                break
            expected.append(token)
        assert ids == expected


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    alone = [decode_batch(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    stop = tokenizer.decode(alone[0][:2])  # ends the first row after its second token
    assert stop.strip()
    together = decode_batch(model, tokenizer, PROMPTS, max_new_tokens=10, stop_strings=[stop])
    assert together[0] == alone[0][: len(together[0])] and len(together[0]) <= 2
    others = [(t, a) for t, a in zip(together[1:], alone[1:], strict=True) if stop not in tokenizer.decode(a)]
    assert others and all(t == a for t, a in others)  # rows that kept going decode as if alone


def test_logit_ensemble_is_the_mean_of_the_experts_distributions(tmp_path, tiny_llama_dir, adapters):
    model, tokenizer = ensemble_model(tmp_path, tiny_llama_dir, adapters)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ensemble, _ = next_token_logprobs(
            model, adapters=AXES, input_ids=batch["input_ids"].repeat_interleave(3, 0),
            attention_mask=batch["attention_mask"].repeat_interleave(3, 0),
            position_ids=positions.repeat_interleave(3, 0))
    probs = []
    for axis in AXES:  # each expert alone, merged into its own copy of the base
        expert, _ = load_model(str(tiny_llama_dir))
        expert = PeftModel.from_pretrained(expert, str(adapters[axis])).merge_and_unload().eval()
        with torch.no_grad():
            logits = expert(**batch, position_ids=positions).logits[:, -1]
        probs.append(torch.softmax(logits.float(), -1))
    expected = torch.stack(probs).mean(0).log()  # compared in log space: a tiny vocab-wide model's probs are ~1e-5
    assert (probs[0].log() - probs[1].log()).abs().max() > 1e-2  # the experts really differ
    torch.testing.assert_close(ensemble, expected, atol=1e-4, rtol=1e-4)


def test_logit_ensemble_decodes_through_the_shared_loop(tmp_path, tiny_llama_dir, adapters):
    model, tokenizer = ensemble_model(tmp_path, tiny_llama_dir, adapters)
    together = decode_batch(model, tokenizer, PROMPTS, max_new_tokens=6, adapters=AXES)
    alone = [decode_batch(model, tokenizer, [p], max_new_tokens=6, adapters=AXES)[0] for p in PROMPTS]
    assert together == alone and all(together)


def judged(scores):
    return [{"id": i, "response": f"answer {i}", "score": s} for i, s in enumerate(scores)]


def test_rerank_keeps_the_best_judged_answer_per_axis():
    helpful = rerank("helpful", {"helpful": judged([0.9, 0.1]), "harmless": judged([0.2, 0.3])})
    assert [r["chosen_expert"] for r in helpful] == ["helpful", "harmless"]
    harmless = rerank("harmless", {"helpful": judged([0.9, 0.1]), "harmless": judged([0.2, 0.3])})
    assert [r["chosen_expert"] for r in harmless] == ["harmless", "helpful"]  # lower P(harmful) wins
    honest_rows = [[{"score": {"truthful": 0.9, "informative": 0.2}}], [{"score": {"truthful": 0.6, "informative": 0.6}}]]
    honest = rerank("honest", {"helpful": honest_rows[0], "honest": honest_rows[1]})
    assert honest[0]["chosen_expert"] == "honest"  # 0.36 > 0.18
    with pytest.raises(H3FusionError, match="different numbers of prompts"):
        rerank("helpful", {"helpful": judged([0.1]), "harmless": judged([0.1, 0.2])})


def test_logit_ensemble_mc_scores_its_own_mixed_distribution(tmp_path, tiny_llama_dir, adapters):
    """TruthfulQA MC of ensemble-logits scores each choice by the mean of the experts' next-token probabilities,
    token by token (the distribution it generates from), not by the first expert's log-likelihood."""
    model, tokenizer = ensemble_model(tmp_path, tiny_llama_dir, adapters)
    record = {"id": 0, "question": "Is the sky blue?",
              "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
              "mc2_targets": {"choices": ["Yes.", "Blue.", "No."], "labels": [1, 1, 0]}}
    context = format_prompt(record["question"], "", "alpaca", tokenizer)
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    experts = []
    for axis in AXES:  # each expert alone, merged into its own copy of the base
        expert, _ = load_model(str(tiny_llama_dir))
        experts.append(PeftModel.from_pretrained(expert, str(adapters[axis])).merge_and_unload().eval())

    def loglik(choice, members):
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = torch.stack([torch.softmax(m(torch.tensor([ctx + ids])).logits[0].float(), -1) for m in members])
        mixed = probs.mean(0)  # the ensemble's next-token distribution at every position
        return sum(mixed[len(ctx) + i - 1, token].log().item() for i, token in enumerate(ids))

    def mc2(logliks):
        true_mass = math.exp(logliks["Yes."]) + math.exp(logliks["Blue."])
        return true_mass / (true_mass + math.exp(logliks["No."]))

    choices = record["mc2_targets"]["choices"]
    ensemble = {c: loglik(c, experts) for c in choices}
    helpful = {c: loglik(c, experts[:1]) for c in choices}  # what the first expert alone would score
    assert abs(mc2(ensemble) - mc2(helpful)) > 1e-3  # the mixture really differs from one expert
    result = mc_scores(model, tokenizer, [record])
    assert result["mc2"] == pytest.approx(mc2(ensemble), abs=1e-4)
    assert result["mc1"] == float(ensemble["Yes."] > ensemble["No."])
    assert model.ensemble_adapters == AXES  # scoring leaves the ensemble as it was
