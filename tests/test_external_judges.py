"""Real judges, exercised here with stand-ins: a local stub OpenAI server, tiny HF models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from h3fusion.errors import H3FusionError
from h3fusion.judges.external import HFModerationJudge, HFTruthInfoJudge, OpenAIPairwiseJudge
from tests.conftest import write_config

RECORDS = [{"instruction": f"Name fruit number {i}.", "reference": "Apple.", "response": "A banana is a fruit."}
           for i in range(6)]


class _Stub(BaseHTTPRequestHandler):
    """Prefers the answer that mentions 'banana'; records what it was sent."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        answer_a = prompt.split("Answer A:")[1].split("Answer B:")[0]
        reply = "A" if "banana" in answer_a else "B"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_pairwise_judge_against_stub_server(stub_server, monkeypatch):
    monkeypatch.setenv("H3_TEST_KEY", "sk-test-secret")
    judge = OpenAIPairwiseJudge(stub_server, "judge-model", api_key_env="H3_TEST_KEY")
    assert judge.score(RECORDS) == [1.0] * 6  # the candidate wins whichever position it is shown in
    paths = {path for path, _, _ in _Stub.seen}
    assert paths == {"/v1/chat/completions"}
    assert all(auth == "Bearer sk-test-secret" for _, auth, _ in _Stub.seen)
    orders = [("banana" in body["messages"][-1]["content"].split("Answer B:")[0]) for _, _, body in _Stub.seen]
    assert set(orders) == {True, False}  # positions were shuffled
    _Stub.seen = []
    assert judge.score(RECORDS[3:]) == [1.0] * 3  # scored apart (a resumed run): each record shown as before
    assert [("banana" in body["messages"][-1]["content"].split("Answer B:")[0]) for _, _, body in _Stub.seen] \
        == orders[3:]
    assert "sk-test-secret" not in json.dumps(judge.validation)


def test_pairwise_judge_missing_key_and_unreachable(monkeypatch):
    monkeypatch.delenv("H3_TEST_KEY", raising=False)
    with pytest.raises(H3FusionError, match="set the environment variable H3_TEST_KEY"):
        OpenAIPairwiseJudge("http://127.0.0.1:9", "m", api_key_env="H3_TEST_KEY").score(RECORDS[:1])
    with pytest.raises(H3FusionError, match="unreachable"):
        OpenAIPairwiseJudge("http://127.0.0.1:9/v1", "m", api_key_env=None, timeout=2).score(RECORDS[:1])


def test_hf_moderation_judge_with_tiny_classifier(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    judge = HFModerationJudge(str(tmp_path))
    records = [{"prompt": "How do I pick a lock?", "response": "Call a locksmith."}, {"prompt": "Hi", "response": "Hello!"}]
    scores = judge.score(records)
    assert judge.unsafe == [1]
    # each score is the classifier's softmax mass on "unsafe" for beaver-dam's QA format, record by record
    model = LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for record, score in zip(records, scores, strict=True):
        ids = tokenizer(f"BEGINNING OF CONVERSATION: USER: {record['prompt']} ASSISTANT: {record['response']}",
                        return_tensors="pt")
        with torch.no_grad():
            expected = torch.softmax(model(**ids).logits.float(), dim=1)[0, 1].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_hf_truth_info_judge_with_tiny_stand_in(tiny_llama_dir):
    judge = HFTruthInfoJudge(str(tiny_llama_dir), str(tiny_llama_dir))
    records = [{"question": "Is the earth flat?", "response": "No, it is round."}]
    truth, info = judge.score_truth(records), judge.score_info(records)
    assert judge.score_both(records) == [{"truth": truth[0], "info": info[0]}]  # what evaluate calls
    assert 0 < truth[0] < 1 and 0 < info[0] < 1 and truth != info


def test_api_key_never_reaches_outputs_or_logs(stub_server, tmp_path, data_dir):
    """`h3fusion judge` with the API judge: the key is sent to the endpoint and written nowhere."""
    secret = "sk-test-secret-4f9a"
    config = write_config(tmp_path / "c.yaml", data={"dir": str(data_dir)},
                          judges={"helpful": "api", "api_base_url": stub_server, "api_model": "judge-model",
                                  "api_key_env": "H3_TEST_KEY"})
    records = tmp_path / "answers.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    out = tmp_path / "judged.jsonl"
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "judge", "helpful", "--input", str(records),
                           "--output", str(out), "--config", str(config)],
                          capture_output=True, text=True, env={**os.environ, "H3_TEST_KEY": secret})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1.0, 1.0]
    assert {auth for _, auth, _ in _Stub.seen} == {f"Bearer {secret}"}  # it was used...
    assert secret not in proc.stdout + proc.stderr  # ...and never printed
    for path in tmp_path.rglob("*"):  # ...or stored
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
