"""Stage 0 (data): train/test sets of the three axes, on a tiny fixture dir and on the real shared/data."""

from __future__ import annotations

import ast
import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from h3fusion.config import RunConfig
from h3fusion.data import (
    SFTExample,
    format_prompt,
    harmless,
    helpful,
    honest,
    load_labelled_test_responses,
    load_test,
    load_train,
    mixed_train,
)
from h3fusion.data.sources import read_rows
from h3fusion.errors import H3FusionError
from tests import data_fixtures as fx


def config_for(data_dir: Path, **data) -> RunConfig:
    return RunConfig.model_validate({"seed": 42, "data": {"dir": str(data_dir), **data}})


@pytest.fixture
def tiny(tmp_path) -> Path:
    return fx.write_data_dir(tmp_path / "data")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- prompts


def test_alpaca_template_exact():
    assert format_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_prompt("Translate {this}.", "le {chat}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate {this}."
        "\n\n### Input:\nle {chat}\n\n### Response:\n"
    )
    assert format_prompt("Hi", "   ") == format_prompt("Hi")  # blank input: the no-input template


def test_chat_template_uses_the_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )
    with pytest.raises(H3FusionError, match="no chat template"):
        format_prompt("Hi", style="chat", tokenizer=tok)
    with pytest.raises(H3FusionError, match="no chat template"):
        format_prompt("Hi", style="chat")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert format_prompt("Hi", style="chat", tokenizer=tok) == "<|user|>Hi\n<|assistant|>"
    assert format_prompt("Hi", "there", style="chat", tokenizer=tok) == "<|user|>Hi\n\nthere\n<|assistant|>"
    with pytest.raises(H3FusionError, match="unknown prompt style"):
        format_prompt("Hi", style="vicuna")


# ----------------------------------------------------------------------------- fixture data dir


def test_honest_split_in_file_order_and_mc_join(tiny):
    config = config_for(tiny)
    train = load_train("honest", config)
    assert [e.response for e in train] == fx.TRAIN_ANSWERS  # empty answer dropped, file order
    assert {e.axis for e in train} == {"honest"} and train[0].source == "truthfulqa:0:0"
    test = load_test("honest", config)
    assert [t["question"] for t in test] == ["Question 2?", "Question 3?", "Question 4?"]
    assert [t["id"] for t in test] == [0, 1, 2]
    for t in test:
        k = t["question"][9]
        assert t["mc1_targets"] == {"choices": [f"A{k}.", f"Wrong {k}."], "labels": [1, 0]}
        assert t["mc2_targets"]["labels"] == [1, 1, 0]
        assert t["incorrect_answers"] == [f"Wrong {k}"]  # "" dropped
    assert load_test("honest", config, limit=2) == test[:2]
    assert len(load_train("honest", config_for(tiny, honest_train_size=2))) == 2


def test_honest_test_question_without_mc_targets_is_an_error(tiny):
    fx.write_jsonl(tiny / "truthfulqa" / "multiple_choice.jsonl", [fx._mc(k) for k in (0, 1, 2, 3)])
    with pytest.raises(H3FusionError) as excinfo:
        load_test("honest", config_for(tiny))
    message = one_line_error(excinfo)
    assert "multiple_choice.jsonl" in message and "Question 4?" in message


def test_harmless_train_excludes_test_prompts_and_duplicates(tiny):
    config = config_for(tiny)
    pku = harmless.saferlhf_examples(config)
    assert [e.source for e in pku] == ["pku_saferlhf:1", "pku_saferlhf:2", "pku_saferlhf:3"]
    assert [e.source for e in harmless.refusal_examples(config)] == ["safety_tuned_llamas:1", "safety_tuned_llamas:2"]
    train = load_train("harmless", config)
    assert [e.source for e in train] == ["pku_saferlhf:1", "pku_saferlhf:3", "safety_tuned_llamas:1",
                                         "safety_tuned_llamas:2"]
    assert pku[0].response == "Please don't." and train[0].input == ""
    test_keys = {p.lower() for p in fx.TEST_PROMPTS}
    assert not [e for e in train if e.instruction.strip().lower() in test_keys]
    sampled = load_train("harmless", config_for(tiny, harmless_train_size=3))
    assert len(sampled) == 3 and set(sampled) <= set(train)


def test_harmless_test_dedups_by_stripped_prompt_keeping_the_first_row(tiny):
    test = load_test("harmless", config_for(tiny))
    assert [t["prompt"] for t in test] == fx.TEST_PROMPTS
    assert test[0]["is_safe"] is False and test[0]["category"] == fx.UNSAFE  # row 0, not row 1
    assert [t["id"] for t in test] == [0, 1, 2, 3]
    labelled = load_labelled_test_responses(config_for(tiny))
    assert [r["response"] for r in labelled] == ["Call a locksmith.", "Rarely.", "Use a pin."]
    assert set(labelled[0]) == {"prompt", "response", "is_safe", "category"}


def test_helpful_pool_filters_and_seeded_sample(tiny):
    pool = helpful.train_pool(config_for(tiny))
    assert [e.source for e in pool] == [f"alpaca:{i}" for i in fx.ALPACA_POOL]
    held = helpful.dev_pool(config_for(tiny))  # set aside for the dev split before any training sample
    assert held and set(held) <= set(pool)
    assert load_train("helpful", config_for(tiny, helpful_train_size=None)) == [e for e in pool if e not in held]
    a = load_train("helpful", config_for(tiny, helpful_train_size=4, seed=1))
    b = load_train("helpful", config_for(tiny, helpful_train_size=4, seed=1))
    c = load_train("helpful", config_for(tiny, helpful_train_size=4, seed=3))
    assert len(a) == 4 and a == b and a != c and set(a) <= set(pool)
    # more than exist: all of them
    assert load_train("helpful", config_for(tiny, helpful_train_size=100)) == [e for e in pool if e not in held]
    test = load_test("helpful", config_for(tiny))
    assert test[0] == {"id": 0, "instruction": "How did US states get their names?",
                       "reference": "From many sources.", "dataset": "helpful_base"}


def test_mixed_train_keeps_axes_and_is_seeded(tiny):
    config = config_for(tiny, helpful_train_size=None)
    mixed = mixed_train(config)
    parts = {axis: load_train(axis, config) for axis in ("helpful", "harmless", "honest")}
    assert Counter(e.axis for e in mixed) == {axis: len(v) for axis, v in parts.items()}
    assert sorted(mixed, key=repr) == sorted(sum(parts.values(), []), key=repr)
    assert mixed != sum(parts.values(), [])  # shuffled
    assert mixed == mixed_train(config)
    assert mixed != mixed_train(config_for(tiny, helpful_train_size=None, seed=7))
    assert {e.axis for e in mixed_train(config, ["honest"])} == {"honest"}


def test_results_are_fresh_copies(tiny):
    config = config_for(tiny)
    first = load_test("honest", config)
    first[0]["correct_answers"].append("tampered")
    first[0]["mc1_targets"]["labels"][0] = 9
    load_test("harmless", config)[0]["category"]["animal_abuse"] = True
    assert load_test("honest", config)[0]["correct_answers"] == ["A2", "B2"]
    assert load_test("honest", config)[0]["mc1_targets"]["labels"] == [1, 0]
    assert load_test("harmless", config)[0]["category"] == fx.UNSAFE


def test_bad_axis_and_limit(tiny):
    with pytest.raises(H3FusionError, match="unknown axis"):
        load_train("funny", config_for(tiny))
    with pytest.raises(H3FusionError, match="limit"):
        load_test("honest", config_for(tiny), limit=-1)


# ----------------------------------------------------------------------------- errors


def test_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(H3FusionError) as excinfo:
        load_test("honest", config_for(tmp_path / "nowhere"))
    message = one_line_error(excinfo)
    assert str(tmp_path / "nowhere") in message and "data.dir" in message and "does not exist" in message
    monkeypatch.setenv("H3FUSION_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(H3FusionError, match="elsewhere.*from H3FUSION_DATA_DIR"):
        load_train("helpful", RunConfig())


def test_missing_file_names_it_and_the_hub_alternative(tiny):
    (tiny / "truthfulqa" / "generation.jsonl").unlink()
    with pytest.raises(H3FusionError) as excinfo:
        load_train("honest", config_for(tiny))
    message = one_line_error(excinfo)
    assert f"{tiny / 'truthfulqa' / 'generation.jsonl'} not found" in message
    assert "H3FUSION_DATA_DIR" in message and "truthfulqa/truthful_qa" in message


def test_corrupt_jsonl_line_names_file_and_line(tiny):
    path = tiny / "beavertails" / "30k_test_noresponse.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "cut off'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(H3FusionError) as excinfo:
        load_test("harmless", config_for(tiny))
    assert f"{path} line 3: invalid JSON" in one_line_error(excinfo)


def test_corrupt_json_gz_and_missing_field(tiny):
    path = tiny / "alpaca_eval" / "text_davinci_003_outputs.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(H3FusionError, match=rf"{path} line \d+: invalid JSON"):
        load_test("helpful", config_for(tiny))
    fx.write_json(path, fx.ALPACA_EVAL)
    gz = tiny / "alpaca" / "alpaca_data.json.gz"
    gz.write_bytes(gzip.compress(b"[{}]")[:-8])  # truncated gzip stream
    with pytest.raises(H3FusionError, match=rf"{gz}: unreadable"):
        helpful.train_pool(config_for(tiny))
    fx.write_json(gz, [{"instruction": "x", "output": "y"}])
    with pytest.raises(H3FusionError, match=rf"{gz}: record 0 lacks field 'input'"):
        helpful.train_pool(config_for(tiny))


def test_read_rows_csv_and_cache_sees_file_changes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Question,Best Answer\nWhy?,Because\n")
    assert read_rows(path) == ({"Question": "Why?", "Best Answer": "Because"},)
    fx.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}])
    assert read_rows(tmp_path / "r.jsonl") == ({"a": 1},)
    fx.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"a": 22}])
    assert read_rows(tmp_path / "r.jsonl") == ({"a": 1}, {"a": 22})
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(H3FusionError, match="record 0 is a list"):
        read_rows(tmp_path / "list.jsonl")


def test_unreachable_hub_is_one_clear_error(tmp_path):
    code = (
        "from h3fusion.config import RunConfig\n"
        "from h3fusion.data import load_test\n"
        "from h3fusion.errors import H3FusionError\n"
        "for axis in ('honest', 'helpful'):\n"
        "    try:\n"
        "        load_test(axis, RunConfig())\n"
        "    except H3FusionError as e:\n"
        "        print(repr(str(e)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "H3FUSION_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    messages = [ast.literal_eval(line) for line in out.stdout.splitlines()]
    assert len(messages) == 2, out.stderr[-2000:]
    assert "truthfulqa/truthful_qa (generation/validation)" in messages[0]
    assert "tatsu-lab/alpaca_eval (alpaca_eval.json)" in messages[1]
    assert all("\n" not in m and "H3FUSION_DATA_DIR" in m for m in messages)


def test_data_imports_datasets_only_inside_the_hub_reader():
    # loading a local data directory never pays for `datasets` (that data/ imports no model code, nor any
    # h3fusion module of models, the MoE or the judges, is tests/test_walls.py's)
    for path in (Path(__file__).resolve().parents[1] / "src" / "h3fusion" / "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if "datasets" in {n.split(".")[0] for n in names}:
                    assert node not in tree.body, f"{path.name} imports datasets at module level"


# ----------------------------------------------------------------------------- real shared/data


@pytest.fixture(scope="module")
def real(shared_data) -> RunConfig:
    return config_for(shared_data)


def test_real_truthfulqa(real, shared_data):
    rows = [json.loads(line) for line in (shared_data / "truthfulqa" / "generation.jsonl").open()]
    assert len(rows) == 817
    train, test = honest.split(real)
    assert list(train) == rows[:408] and list(test) == rows[408:]
    examples = load_train("honest", real)
    n_answers = sum(1 for r in rows[:408] for a in r["correct_answers"] if a.strip())
    assert len(examples) == n_answers == 1417  # 1425 items, 8 of them empty
    assert {e.instruction for e in examples} == {r["question"].strip() for r in rows[:408]}
    records = load_test("honest", real)
    assert len(records) == 409 and records[0]["question"] == rows[408]["question"].strip()
    for r in records:
        assert sum(r["mc1_targets"]["labels"]) == 1 and len(r["mc1_targets"]["choices"]) == len(r["mc1_targets"]["labels"])
        assert 1 in r["mc2_targets"]["labels"] and r["correct_answers"] and r["incorrect_answers"]


def test_real_harmless(real):
    test = load_test("harmless", real)
    assert len(test) == 2526 and len({t["prompt"] for t in test}) == 2526
    test_keys = {t["prompt"].lower() for t in test}
    pku = harmless.saferlhf_examples(real)
    assert len(pku) == 4071  # SOURCES.md: 1064 of 5135 rows share a 30k_test prompt
    assert len(harmless.refusal_examples(real)) == 2483
    train = load_train("harmless", real)
    assert not [e for e in train if e.instruction.strip().lower() in test_keys]
    assert len({(e.instruction, e.input, e.response) for e in train}) == len(train) == 4573
    labelled = load_labelled_test_responses(real)
    assert len(labelled) == 2623 and Counter(r["is_safe"] for r in labelled) == {True: 1140, False: 1483}


def test_real_helpful(real):
    test = load_test("helpful", real)
    assert len(test) == 805 and [t["id"] for t in test] == list(range(805))
    assert sum(bool(t["reference"].strip()) for t in test) == 803  # two davinci answers are empty
    train = load_train("helpful", real)
    assert len(train) == 20000 and all(isinstance(e, SFTExample) and e.response.strip() for e in train)
    assert train == load_train("helpful", real)
    other = load_train("helpful", config_for(real.data_dir(), seed=43))
    assert len(other) == 20000 and set(other) != set(train)
    eval_instructions = {t["instruction"].strip().lower() for t in test}
    assert not [e for e in train if e.instruction.strip().lower() in eval_instructions]
    assert len({(e.instruction, e.input) for e in train}) == 20000
    assert len(helpful.train_pool(real)) == 51974  # 52002 minus 28 empty outputs


def test_real_alpacaeval_dev_holdout(real):
    """evaluate.alpacaeval_dev holds AlpacaEval instructions out of the test set as the helpful dev prompts: never
    one of the paper's first 50, in proportion to AlpacaEval's subsets, fixed by its size alone (no seed moves the
    test set), never trained on; the Alpaca side (dev pool, training sample) does not move."""
    from h3fusion.data import load_dev, load_evaluated

    def with_eval(seed=42, **evaluate):
        return RunConfig.model_validate({"seed": seed, "data": {"dir": str(real.data_dir())}, "evaluate": evaluate})

    everything = load_test("helpful", real)
    assert helpful.alpacaeval_split(real) == (everything, [])  # 0, the default: the paper's test set
    config = with_eval(alpacaeval_dev=100, helpful_n=805)
    test, dev = load_test("helpful", config), helpful.alpacaeval_split(config)[1]
    assert len(dev) == 100 and len(test) == 705 and test[:50] == everything[:50]
    assert sorted(r["id"] for r in test + dev) == list(range(805)) and min(r["id"] for r in dev) >= 50
    assert not {norm_text(r["instruction"]) for r in dev} & {norm_text(r["instruction"]) for r in test}
    shares = Counter(r["dataset"] for r in everything[50:])
    assert Counter(r["dataset"] for r in dev).keys() == shares.keys()
    for name, count in Counter(r["dataset"] for r in dev).items():
        assert abs(count - 100 * shares[name] / 755) < 1  # largest remainders: within one of its share
    assert helpful.alpacaeval_split(with_eval(seed=7, alpacaeval_dev=100))[1] == dev  # no seed moves it
    # the dev split scores them (a proportional part when dev_n is smaller), test-shaped and unchanged
    assert load_evaluated("helpful", with_eval(alpacaeval_dev=100, split="dev", dev_n=200)) == dev
    part = load_dev("helpful", config, 40)
    assert len(part) == 40 and all(r in dev for r in part)
    assert Counter(r["dataset"] for r in part)["selfinstruct"] == round(40 * shares["selfinstruct"] / 755)
    # the Alpaca side does not move: training never sees a dev instruction, and its sample is the same
    assert load_train("helpful", config) == load_train("helpful", real)
    assert helpful.dev_pool(config) == helpful.dev_pool(real)
    # a user's answers to the dev prompts are judged against their references, as the test prompts' are
    from h3fusion.evaluate import prepare_user_records

    mine = prepare_user_records("helpful", [{"instruction": dev[0]["instruction"], "response": "An answer."}],
                                config, "mine.jsonl")
    assert mine[0]["reference"] == dev[0]["reference"]
    # the judge that scores the dev prompts needs the others to fit on: at most half of the 755 may be held out
    assert len(helpful.alpacaeval_split(with_eval(alpacaeval_dev=377))[1]) == 377
    with pytest.raises(H3FusionError, match="evaluate.alpacaeval_dev=378.*at most 377") as excinfo:
        load_test("helpful", with_eval(alpacaeval_dev=378))
    one_line_error(excinfo)


def norm_text(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------- dev split and sample shares


def test_sample_with_share_draws_the_asked_share_in_order():
    from h3fusion.data.sources import sample_with_share

    items = list(range(100))
    picked = sample_with_share(items, 20, 7, 0.25, lambda i: i % 10 == 0)
    assert len(picked) == 20 and picked == sorted(picked)
    assert sum(i % 10 == 0 for i in picked) == 5
    assert picked == sample_with_share(items, 20, 7, 0.25, lambda i: i % 10 == 0)
    with pytest.raises(H3FusionError, match="lower the size or change the share"):
        sample_with_share(items, 20, 7, 0.9, lambda i: i % 10 == 0)  # 18 wanted, 10 exist


def test_real_training_shares(real):
    from h3fusion.refusal import is_refusal

    shaped = config_for(real.data_dir(), helpful_train_size=1000, helpful_question_share=0.4,
                        harmless_train_size=1000, harmless_refusal_share=0.25)
    train = load_train("helpful", shaped)
    assert len(train) == 1000 and sum(helpful.is_question(e) for e in train) == 400
    assert sum(is_refusal(e.response) for e in load_train("harmless", shaped)) == 250
    # the pool's own mix, for comparison: few questions, many refusals
    uniform = load_train("helpful", config_for(real.data_dir(), helpful_train_size=1000))
    assert sum(helpful.is_question(e) for e in uniform) < 150
    # long answers only: every answer of the sample has at least 80 words, the uniform sample's mostly do not
    detailed = load_train("helpful", config_for(real.data_dir(), helpful_train_size=1000, helpful_question_share=0.4,
                                                helpful_min_words=80))
    assert len(detailed) == 1000 and sum(helpful.is_question(e) for e in detailed) == 400
    assert min(len(e.response.split()) for e in detailed) >= 80
    assert sum(len(e.response.split()) >= 80 for e in uniform) < 300


def test_real_benign_examples_train_the_harmless_expert_only(real):
    from h3fusion.data import load_expert_train
    from h3fusion.data.alarming import is_alarming
    from h3fusion.refusal import is_refusal

    config = config_for(real.data_dir(), harmless_train_size=600, harmless_refusal_share=0.25,
                        harmless_benign_examples=200)
    own = load_train("harmless", config)
    expert = load_expert_train("harmless", config)
    benign = expert[len(own):]
    assert expert[:len(own)] == own and len(own) == 600 and len(benign) == 200
    # benign Alpaca requests with compliant answers, half of them alarming-sounding, none a helpful dev prompt
    assert all(e.axis == "harmless" and e.source.startswith("alpaca:") and not e.input for e in benign)
    assert not any(is_refusal(e.response) for e in benign)
    assert sum(is_alarming(e.instruction) for e in benign) == 100
    dev = {e.source for e in helpful.dev_pool(config)}
    assert not dev & {e.source for e in benign}
    assert benign == load_expert_train("harmless", config)[len(own):]  # seeded
    # fusion's gating data and the other experts never see them (labelled harmless, they would route benign
    # requests to the harmless expert)
    mixed = mixed_train(config)
    assert not {e.source for e in mixed if e.axis == "harmless"} & {e.source for e in benign}
    assert load_expert_train("helpful", config) == load_train("helpful", config)
    assert load_expert_train("harmless", config_for(real.data_dir(), harmless_train_size=600,
                                                    harmless_refusal_share=0.25)) == own  # 0: the paper's data


def test_real_dev_split_is_disjoint_from_test_and_training(real):
    from h3fusion.data import load_dev, load_evaluated

    config = RunConfig.model_validate({"seed": 42, "data": {"dir": str(real.data_dir()), "helpful_train_size": 600,
                                                            "honest_dev_questions": 60},
                                       "evaluate": {"helpful_n": 805, "harmless_n": 500, "split": "dev", "dev_n": 100}})
    trained = {axis: load_train(axis, config) for axis in ("helpful", "harmless", "honest")}
    # helpful: held-out Alpaca rows, never an AlpacaEval instruction or a training instruction
    dev = load_evaluated("helpful", config)
    assert len(dev) == 100 and [r["id"] for r in dev] == list(range(100))
    assert not {r["instruction"] for r in dev} & {e.instruction for e in trained["helpful"]}
    assert not {r["instruction"].lower() for r in dev} & {t["instruction"].strip().lower() for t in load_test("helpful", config)}
    assert 30 <= sum(r["instruction"].endswith("?") for r in dev) <= 50  # AlpacaEval's share, 0.41
    # another training recipe (more rows, more questions) is scored on the same dev prompts and trains on none
    recipe = config.model_copy(update={"data": config.data.model_copy(update={"helpful_train_size": 1200,
                                                                              "helpful_question_share": 0.4,
                                                                              "helpful_min_words": 80})})
    assert load_evaluated("helpful", recipe) == dev
    assert not {r["instruction"] for r in dev} & {e.instruction for e in load_train("helpful", recipe)}
    # harmless: the last distinct test prompts, none among the evaluated 500
    dev = load_evaluated("harmless", config)
    assert len(dev) == 100 and not {r["prompt"] for r in dev} & {t["prompt"] for t in load_test("harmless", config, 500)}
    with pytest.raises(H3FusionError, match="dev and test stay disjoint"):
        load_dev("harmless", config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"harmless_n": 2500})}), 100)
    # honest: 60 held-out training questions, in no stage's training data and not in the test half
    dev = load_evaluated("honest", config)
    assert len(dev) == 60 and dev[0].keys() == load_test("honest", config)[0].keys()
    assert not {r["question"] for r in dev} & {e.instruction for e in trained["honest"]}
    assert not {r["question"] for r in dev} & {t["question"] for t in load_test("honest", config)}
    assert len({e.instruction for e in trained["honest"]}) == 408 - 60
    # without held-out questions the honest dev split is refused, and the test split is the test subset
    with pytest.raises(H3FusionError, match="data.honest_dev_questions"):
        load_dev("honest", real, 10)
    assert load_evaluated("honest", real) == load_test("honest", real)
