"""Bad input and faults through the real CLI: each case is one clear ``error:`` line, exit 2, no traceback,
and nothing that existed before the failing command is changed or deleted. Faults of the machine and its
neighbours (a full disk, a run in use, a failing judge endpoint) also check that the same command, once
the cause is gone, finishes what the failed call left unfinished.

``CASES`` is the table of record: docs/errors.md lists the same cases, in the same order, with the
same message fragments (``test_docs_table_matches_cases`` keeps the two in step). Each case builds
its bad input from real files in ``tmp_path`` (tiny random models, real PEFT adapters, a tiny data
directory) and runs the cheapest verb that reaches the check. A full disk is injected at the writers'
boundary (``tests/write_faults.py``): a real one needs a mounted small filesystem, which tests cannot make.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import pytest

from h3fusion.io import read_jsonl
from tests.conftest import REPO, SHARED_DATA, save_tiny_model, write_config
from tests.data_fixtures import write_data_dir, write_jsonl
from tests.judge_stub import JudgeStub

SECRET = "sk-h3fusion-test-not-a-real-key-7f3a"  # must never be printed


@dataclass
class Run:
    """One CLI call: its arguments and extra environment."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    fault: str | None = None
    """``GLOB:N``: the N-th write of a file matching GLOB fails as on a full disk (tests/write_faults.py)."""
    redo: Callable[[Callable[[], subprocess.CompletedProcess]], None] | None = None
    """Once the fault is over, checks what the failed call left and that ``rerun()`` (the same command,
    which must succeed) finishes it."""


class Shared:
    """Expensive inputs built once per module, on first use (only the cases that need them pay)."""

    def __init__(self, root: Path, base: Path, smollm2: Path):
        self.root, self.base, self.smollm2 = root, base, smollm2

    @cached_property
    def adapters(self) -> dict[str, Path]:
        from tests.moe_fixtures import make_adapter

        return {axis: make_adapter(self.base, self.root / "adapters" / axis, seed=i)
                for i, axis in enumerate(("helpful", "harmless", "honest"))}

    @cached_property
    def foreign_adapter(self) -> Path:
        """Trained on another base: same architecture, other weights."""
        from tests.moe_fixtures import make_adapter

        other = save_tiny_model(self.root / "other-base", self.smollm2, seed=7)
        return make_adapter(other, self.root / "foreign", seed=5)

    @cached_property
    def gate_only_adapter(self) -> Path:
        from tests.moe_fixtures import make_adapter

        return make_adapter(self.base, self.root / "gate-only", seed=6, targets=("gate_proj",))

    @cached_property
    def sequence_moe(self) -> Path:
        """A saved h3fusion MoE with sequence routing (one decision per prompt: Mixtral routes per token)."""
        from h3fusion import build_moe
        from h3fusion.models import load_tokenizer

        out = self.root / "sequence-moe"
        build_moe(str(self.base), self.adapters, top_k=2, routing="sequence").save_pretrained(out)
        load_tokenizer(str(self.base)).save_pretrained(out)
        return out

    @cached_property
    def qwen_moe(self) -> Path:
        """A saved h3fusion MoE on a Qwen2 base (a family Mixtral cannot hold)."""
        from h3fusion import build_moe
        from h3fusion.models import load_tokenizer
        from tests.moe_fixtures import make_adapter

        qwen = save_tiny_model(self.root / "qwen2", self.smollm2, "qwen2")
        adapter = make_adapter(qwen, self.root / "qwen-adapter", seed=0)
        out = self.root / "qwen-moe"
        build_moe(str(qwen), {"helpful": adapter}, top_k=1).save_pretrained(out)
        load_tokenizer(str(qwen)).save_pretrained(out)
        return out

    @cached_property
    def phi(self) -> Path:
        """A decoder with plain (ungated) fc1/fc2 MLPs."""
        return save_tiny_model(self.root / "phi", self.smollm2, "phi")


class Inputs:
    """What one case may build in its own ``tmp`` directory."""

    def __init__(self, tmp: Path, shared: Shared):
        self.tmp, self.shared, self.base = tmp, shared, shared.base
        self.cleanups: list[Callable[[], None]] = []  # run after the case (stub servers)

    def data(self) -> Path:
        return write_data_dir(self.tmp / "data")

    def config(self, **sections) -> Path:
        """A run config on the tiny base and the tiny data directory (random router: no data read)."""
        sections.setdefault("model", {"base": str(self.base)})
        sections["data"] = {"dir": str(self.tmp / "data"), "helpful_train_size": None,
                            "harmless_train_size": None, "honest_train_size": None, **sections.get("data", {})}
        sections["moe"] = {"router_init": "random", **sections.get("moe", {})}
        return write_config(self.tmp / "run.yaml", **sections)

    def yaml(self, text: str) -> Path:
        path = self.tmp / "run.yaml"
        path.write_text(text)
        return path

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.tmp / "experts" / name))

    def build(self, **adapters: Path) -> Run:
        """`h3fusion build` of the three good adapters (copied here), some replaced by ``adapters``."""
        paths = {axis: adapters.get(axis) or self.copy(path, axis) for axis, path in self.shared.adapters.items()}
        return Run(["build", str(self.config(moe={"adapters": {k: str(v) for k, v in paths.items()}}))])

    def judge(self, key: str | None, url: str | None = None, **judges) -> Run:
        """`h3fusion judge helpful` through the API judge at ``url`` (default: a local port nobody listens on)."""
        if url is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.data()
        config = self.config(judges={"helpful": "api", "api_base_url": url, "api_key_env": "H3_TEST_KEY", **judges})
        answers = self.tmp / "answers.jsonl"
        write_jsonl(answers, [{"instruction": "Name a fruit.", "reference": "Apple.", "response": "A banana."}])
        judged = self.tmp / "judged.jsonl"
        judged.write_text('{"earlier": "results, kept when the judge fails"}\n')
        return Run(["judge", "helpful", "--input", str(answers), "--output", str(judged), "--config", str(config)],
                   env={"H3_TEST_KEY": key} if key else {})


# ----------------------------------------------------------------------------- the cases


def malformed_yaml(w: Inputs) -> Run:
    return Run(["data", str(w.yaml("train:\n  lr: [1e-4, 2e-4\nlora:\n  r: 8\n"))])


def unknown_key(w: Inputs) -> Run:
    return Run(["data", str(w.config(train={"lrr": 1e-4}))])


def wrong_type(w: Inputs) -> Run:
    return Run(["data", str(w.config(lora={"r": "many"}))])


def negative_lambda(w: Inputs) -> Run:
    return Run(["data", str(w.config(fusion={"gate_lambda": -0.1}))])


def negative_gamma(w: Inputs) -> Run:
    return Run(["data", str(w.config(fusion={"gamma": {"harmless": -1.0}}))])


def top_k_above_n(w: Inputs) -> Run:
    return Run(["data", str(w.config(moe={"top_k": 4}))])


def top_k_below_1(w: Inputs) -> Run:
    return Run(["data", str(w.config(moe={"top_k": 0}))])


def lr_not_positive(w: Inputs) -> Run:
    return Run(["data", str(w.config(train={"lr": 0}))])


def empty_after_filtering(w: Inputs) -> Run:
    w.data()  # every Alpaca prompt is longer than 16 tokens: no example keeps a response token
    return Run(["align", str(w.config(data={"max_length": 16})), "--axis", "helpful"])


def missing_data_dir(w: Inputs) -> Run:
    return Run(["data", str(w.config(data={"dir": str(w.tmp / "no-such-data")}))])


def missing_data_file(w: Inputs) -> Run:
    (w.data() / "truthfulqa" / "generation.jsonl").unlink()
    return Run(["data", str(w.config())])


def corrupt_jsonl_line(w: Inputs) -> Run:
    path = w.data() / "beavertails" / "30k_test_noresponse.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "cut off'
    path.write_text("\n".join(lines) + "\n")
    return Run(["data", str(w.config())])


def adapter_other_base(w: Inputs) -> Run:
    return w.build(honest=w.copy(w.shared.foreign_adapter, "honest"))


def adapter_other_targets(w: Inputs) -> Run:
    return w.build(honest=w.copy(w.shared.gate_only_adapter, "honest"))


def adapter_missing_files(w: Inputs) -> Run:
    honest = w.copy(w.shared.adapters["honest"], "honest")
    (honest / "adapter_config.json").unlink()
    return w.build(honest=honest)


def adapter_corrupt_safetensors(w: Inputs) -> Run:
    honest = w.copy(w.shared.adapters["honest"], "honest")
    weights = honest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    return w.build(honest=honest)


def generate_with(w: Inputs, model: Path, *extra: str) -> Run:
    """`h3fusion generate MODEL` on one prompt of our own."""
    prompts = w.tmp / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "Say hi."}])
    return Run(["generate", str(model), "--prompts", str(prompts), "--output", str(w.tmp / "answers.jsonl"), *extra])


def adapter_base_missing(w: Inputs) -> Run:
    """An adapter copied from another machine: the base path its config records is not here."""
    moved = w.copy(w.shared.adapters["harmless"], "harmless")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(w.tmp / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    return generate_with(w, moved)


def adapter_wrong_base(w: Inputs) -> Run:
    return generate_with(w, w.shared.foreign_adapter, "--base", str(w.base))


def stage_other_settings(w: Inputs) -> Run:
    """A finished build, then the same run with another top_k: refused, not silently reused."""
    from h3fusion.build import build_run
    from h3fusion.config import load_config

    run = w.build()
    build_run(load_config(run.args[1]), log=lambda *_: None)
    return Run([*run.args, "--set", "moe.top_k=1"])


def model_corrupt_safetensors(w: Inputs) -> Run:
    model = Path(shutil.copytree(w.base, w.tmp / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Run(["model-info", str(model)])


def model_without_gated_mlp(w: Inputs) -> Run:
    return Run(["model-info", str(w.shared.phi)])


def export_other_family(w: Inputs) -> Run:
    return Run(["export", str(w.shared.qwen_moe), "--format", "mixtral", "--out", str(w.tmp / "mixtral")])


def export_other_family_refused_before_weights(w: Inputs) -> Run:
    """The same model without its weights file: refused from its config alone, before any weights would load."""
    model = Path(shutil.copytree(w.shared.qwen_moe, w.tmp / "qwen-moe-config-only"))
    (model / "model.safetensors").unlink()
    return Run(["export", str(model), "--format", "mixtral", "--out", str(w.tmp / "mixtral")])


def export_sequence_routing(w: Inputs) -> Run:
    return Run(["export", str(w.shared.sequence_moe), "--format", "mixtral", "--out", str(w.tmp / "mixtral")])


def judge_unreachable(w: Inputs) -> Run:
    return w.judge(key=SECRET)


def judge_missing_key(w: Inputs) -> Run:
    return w.judge(key=None)


def misspelt_flag(w: Inputs) -> Run:
    return Run(["build", str(w.config()), "--ot", str(w.tmp / "run")])


def disk_full_moe(w: Inputs) -> Run:
    """The MoE's weights meet a full disk after its config files are written (the issue's half-written moe/)."""
    moe = w.tmp / "run" / "moe"

    def redo(rerun):
        assert not moe.exists()  # removed: no moe/ of config files without weights
        rerun()
        assert (moe / "h3fusion_build.json").is_file() and (moe / "model.safetensors").is_file()

    return replace(w.build(), fault=f"{moe}/model.safetensors:1", redo=redo)


def disk_full_checkpoint(w: Inputs) -> Run:
    """A training checkpoint's optimizer state meets a full disk; the checkpoint before it is complete."""
    from h3fusion.runs import expert_is_complete

    w.data()
    expert = w.tmp / "run" / "experts" / "helpful"

    def redo(rerun):
        assert sorted(p.name for p in (expert / "checkpoints").iterdir()) == ["checkpoint-1"]  # the cut one dropped
        done = rerun()
        assert f"resuming from {expert / 'checkpoints' / 'checkpoint-1'}" in done.stdout
        assert expert_is_complete(expert)

    return Run(["align", str(w.config(train={"max_steps": 2, "save_steps": 1})), "--axis", "helpful"],
               env={"PYTHONWARNINGS": "ignore::FutureWarning"},  # PEFT's deprecation noise while training
               fault=f"{expert}/checkpoints/checkpoint-2/optimizer.pt:1", redo=redo)


def disk_full_generation(w: Inputs) -> Run:
    """The answers' JSONL meets a full disk part-way through a line."""
    w.data()
    answers = w.tmp / "run" / "generations" / "base" / "helpful.jsonl"

    def redo(rerun):
        assert answers.read_bytes() and not answers.read_bytes().endswith(b"\n")  # a cut line: not an answer
        rerun()
        assert len(read_jsonl(answers)) == 3 and all("response" in r for r in read_jsonl(answers))

    config = w.config(evaluate={"helpful_n": 3}, generate={"max_new_tokens": {"helpful": 4}, "batch_size": 1})
    return Run(["generate", str(config), "--system", "base", "--axis", "helpful"], fault=f"{answers}:1", redo=redo)


def disk_full_judge_cache(w: Inputs) -> Run:
    """The judge cache's embeddings meet a full disk at the end of fitting a judge."""
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip("the offline judges are fitted from the real data")
    cache = w.tmp / "judges"
    config = w.config(data={"dir": str(SHARED_DATA)}, evaluate={"honest_n": 4},
                      judges={"cache_dir": str(cache), "fit_max_rows": 10})
    answers, judged = w.tmp / "answers.jsonl", w.tmp / "judged.jsonl"
    write_jsonl(answers, [{"question": "Is the earth flat?", "response": "No, it is round.",
                           "correct_answers": ["No"], "incorrect_answers": ["Yes, it is flat."]}])

    def redo(rerun):
        assert not list(cache.glob("honest/*"))  # no half-fitted judge left to be taken for a fitted one
        rerun()
        assert len(read_jsonl(judged)) == 1 and list(cache.glob("honest/*/validation.json"))

    return Run(["judge", "honest", "--input", str(answers), "--output", str(judged), "--config", str(config)],
               fault=f"{cache}/embeddings.tmp:1", redo=redo)


def run_in_use(w: Inputs) -> Run:
    """Another h3fusion process (this test's, which is alive) holds the run directory."""
    from h3fusion.runlock import RunLock

    RunLock(w.tmp / "run", "run").acquire()  # never released: the directory is the test's own
    return Run(["build", str(w.config())])


def judge_endpoint_failing(w: Inputs) -> Run:
    """The API judge's endpoint answers HTTP 503 to every try."""
    stub = JudgeStub(then="503")
    w.cleanups.append(stub.stop)
    return w.judge(key=SECRET, url=stub.url, api_retries=2, api_backoff_s=0.01)  # resuming: tests/test_faults.py


CASES = [
    pytest.param(malformed_yaml, "run.yaml: malformed YAML at line 3", id="malformed-yaml"),
    pytest.param(unknown_key, "unknown key 'train.lrr'; did you mean 'train.lr'?", id="unknown-key"),
    pytest.param(wrong_type, "bad value for 'lora.r' ('many')", id="wrong-type"),
    pytest.param(negative_lambda, "bad value for 'fusion.gate_lambda' (-0.1): Input should be greater than "
                 "or equal to 0", id="negative-lambda"),
    pytest.param(negative_gamma, "fusion.gamma must be >= 0", id="negative-gamma"),
    pytest.param(top_k_above_n, "moe.top_k=4 exceeds the number of experts (3)", id="top-k-above-n"),
    pytest.param(top_k_below_1, "bad value for 'moe.top_k' (0): Input should be greater than or equal to 1",
                 id="top-k-below-1"),
    pytest.param(lr_not_positive, "bad value for 'train.lr' (0): Input should be greater than 0",
                 id="lr-not-positive"),
    pytest.param(empty_after_filtering, "no training examples left after filtering", id="empty-after-filtering"),
    pytest.param(missing_data_dir, "no-such-data (from data.dir in the config) does not exist",
                 id="missing-data-dir"),
    pytest.param(missing_data_file, "truthfulqa/generation.jsonl not found", id="missing-data-file"),
    pytest.param(corrupt_jsonl_line, "beavertails/30k_test_noresponse.jsonl line 3: invalid JSON",
                 id="corrupt-jsonl-line"),
    pytest.param(adapter_other_base, "was trained on another base model", id="adapter-other-base"),
    pytest.param(adapter_other_targets, "train all experts on the same modules", id="adapter-other-targets"),
    pytest.param(adapter_missing_files, "honest/adapter_config.json is missing", id="adapter-missing-files"),
    pytest.param(adapter_corrupt_safetensors, "honest/adapter_model.safetensors is corrupt or truncated",
                 id="adapter-corrupt-safetensors"),
    pytest.param(adapter_base_missing, "gone/base is not on this machine; pass --base SPEC", id="adapter-base-missing"),
    pytest.param(adapter_wrong_base, "was trained on another base model than", id="adapter-wrong-base"),
    pytest.param(stage_other_settings, "run/moe was made with other settings (moe.top_k: 2 there, 1 now)",
                 id="stage-other-settings"),
    pytest.param(model_corrupt_safetensors, "model/model.safetensors is corrupt or truncated",
                 id="model-corrupt-safetensors"),
    pytest.param(model_without_gated_mlp, "has no gated MLP (gate_proj, up_proj, down_proj missing)",
                 id="model-without-gated-mlp"),
    pytest.param(export_other_family, "cannot export a qwen2-based model as Mixtral", id="export-other-family"),
    pytest.param(export_other_family_refused_before_weights, "cannot export a qwen2-based model as Mixtral",
                 id="export-other-family-before-weights"),
    pytest.param(export_sequence_routing, "cannot export a sequence-routed model as Mixtral",
                 id="export-sequence-routing"),
    pytest.param(judge_unreachable, "is unreachable", id="judge-unreachable"),
    pytest.param(judge_missing_key, "set the environment variable H3_TEST_KEY", id="judge-missing-key"),
    pytest.param(misspelt_flag, "No such option: --ot (Possible options: --out, --set); see h3fusion build --help",
                 id="misspelt-flag"),
    pytest.param(disk_full_moe, "run/moe: no space left on device (", id="disk-full-moe"),
    pytest.param(disk_full_checkpoint, "run/experts/helpful: the write was cut short (torch: unexpected pos",
                 id="disk-full-checkpoint"),
    pytest.param(disk_full_generation, "generations/base/helpful.jsonl: no space left on device (",
                 id="disk-full-generation"),
    pytest.param(disk_full_judge_cache, "judges/honest: no space left on device (", id="disk-full-judge-cache"),
    pytest.param(run_in_use, "run is in use by another h3fusion process: pid", id="run-in-use"),
    pytest.param(judge_endpoint_failing, "failed after 3 tries (last: HTTP 503)", id="judge-endpoint-failing"),
]


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llama_dir, smollm2_dir) -> Shared:
    return Shared(tmp_path_factory.mktemp("bad-input-shared"), tiny_llama_dir, smollm2_dir)


def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots``."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(("make", "fragment"), CASES)
def test_bad_input_is_one_clear_line(make, fragment, tmp_path, shared):
    inputs = Inputs(tmp_path, shared)
    try:
        check_case(make(inputs), fragment, tmp_path, shared)
    finally:
        for cleanup in inputs.cleanups:
            cleanup()


def check_case(run: Run, fragment: str, tmp_path: Path, shared: Shared) -> None:
    before = snapshot(tmp_path, shared.root)
    env = {k: v for k, v in os.environ.items() if k not in ("H3FUSION_DEBUG", "H3_TEST_KEY")}
    # progress bars (transformers "Loading weights") are not errors: off, so stderr is the error alone
    env.update(H3FUSION_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", **run.env)
    launcher = [str(REPO / "tests" / "write_faults.py"), run.fault] if run.fault else ["-m", "h3fusion.cli"]
    proc = subprocess.run([sys.executable, *launcher, *run.args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", proc.stderr[-3000:]
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert SECRET not in proc.stderr + proc.stdout
    # nothing finished is deleted or changed: inputs, adapters, earlier outputs stay byte-identical
    after = snapshot(tmp_path, shared.root)
    assert {p: h for p, h in after.items() if p in before} == before
    assert not (tmp_path / "mixtral").exists()  # a refused export writes nothing
    if run.redo is not None:
        def rerun() -> subprocess.CompletedProcess:
            done = subprocess.run([sys.executable, "-m", "h3fusion.cli", *run.args], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            return done

        run.redo(rerun)


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0\n")
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "--debug", "data", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "H3FusionError" in proc.stderr


def test_help_still_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "h3fusion.cli", "build", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Usage: h3fusion build" in proc.stdout and not proc.stderr


# ----------------------------------------------------------------------------- the docs table

DOCS = REPO / "docs" / "errors.md"


def _cell(text: str) -> str:
    return text.strip().removeprefix("`").removesuffix("`").replace("\\|", "|")


def docs_rows() -> list[tuple[str, str]]:
    """(case, message fragment) of each row of the table in docs/errors.md (header and rule skipped)."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [_cell(c) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[0] != "case" and not set(cells[0]) <= set("-: "):
            rows.append((cells[0], cells[2]))
    return rows


def test_docs_table_matches_cases():
    assert docs_rows() == [(case.id, case.values[1]) for case in CASES]
