"""The Mixtral export checked in a real client: llama.cpp's own converter, then llama-cpp-python.

    .venv/bin/pip install -r requirements/llamacpp.txt       # compiles llama.cpp: minutes, once
    .venv/bin/python bench/llamacpp_check.py [runs/demo/fused] [--prompts 4] [--new-tokens 16]

1. ``h3fusion export FUSED --format mixtral`` (the command a user runs) into ``--work``
   (default: ``<FUSED>/../llamacpp-check``);
2. llama.cpp's ``convert_hf_to_gguf.py --outtype f32``: the converter of the installed
   llama-cpp-python version, from its source distribution (fetched once with ``pip download`` into
   the h3fusion cache and unpacked there), or ``--converter PATH``;
3. the GGUF loaded in llama-cpp-python (f32 KV cache, so the comparison sees the weights alone);
4. on the first ``--prompts`` helpful test prompts of the demo data (Alpaca template, as the demo
   generates), else built-in ones: llama.cpp's tokenization must equal transformers'; the greedy
   answer of ``--new-tokens`` tokens must be the same token for token; and at every step of it the
   next-token log-probabilities of the top-10 tokens (of either side) must agree within
   ``--tolerance`` (0.002) with the fused model's in transformers (fp32).

Prints PASS or FAIL with the largest difference, and writes ``result.json`` beside the GGUF. Not
part of the test suite: it needs llama-cpp-python, which compiles llama.cpp (requirements/llamacpp.txt).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("H3FUSION_CACHE", str(REPO / ".cache" / "h3fusion"))

FALLBACK_PROMPTS = ["Name three primary colours.", "What is the capital of France?",
                    "How do I make my neighbour's dog stop barking forever?", "Do vaccines cause autism?"]
TOP = 10


def run(command: list[str], what: str) -> float:
    """Run a step, stop with its output on failure; returns its wall seconds."""
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"FAIL: {what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return time.time() - started


def converter_script(explicit: Path | None) -> tuple[Path, str]:
    """(llama.cpp's convert_hf_to_gguf.py of the installed llama-cpp-python, the llama.cpp commit it vendors).

    The commit comes from the sdist's CHANGELOG ("update llama.cpp to ggml-org/llama.cpp@<commit>").
    """
    if explicit is not None:
        return explicit, "unknown (--converter)"
    from h3fusion.models import cache_root

    version = importlib.metadata.version("llama-cpp-python")
    home = cache_root() / f"llama.cpp-converter-{version}"
    script, commit_file = home / "convert_hf_to_gguf.py", home / "LLAMA_CPP_COMMIT"
    if script.is_file():
        return script, commit_file.read_text().strip() if commit_file.is_file() else "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching the llama-cpp-python {version} source distribution for its converter ...", flush=True)
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
             "--no-binary", ":all:", "-d", tmp], "pip download")
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as archive:
            changelog = archive.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/CHANGELOG.md").read().decode()
            release = changelog.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
            commit = release.split("llama.cpp@", 1)[1].split()[0] if "llama.cpp@" in release else "unknown"
            members = []
            for member in archive.getmembers():
                if member.name.startswith(prefix) and member.name[len(prefix):].startswith(keep):
                    member.name = member.name[len(prefix):]
                    members.append(member)
            staging = Path(tmp) / "converter"
            archive.extractall(staging, members=members, filter="data")
        (staging / "LLAMA_CPP_COMMIT").write_text(commit + "\n")
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(home))
    return script, commit


def demo_prompts(n: int) -> list[str]:
    """The first n helpful test instructions of the data the demo reads, else built-in ones."""
    try:
        from h3fusion.config import build_config
        from h3fusion.data import load_test

        records = load_test("helpful", build_config({}, "defaults", []), limit=n)
        return [r["instruction"] for r in records][:n]
    except Exception as error:  # no data dir here: the check needs prompts, not those prompts
        print(f"(demo data not readable: {str(error).splitlines()[0]}; built-in prompts)")
        return FALLBACK_PROMPTS[:n]


def transformers_steps(model, prompt_ids: list[int], new_tokens: int, eos: int):
    """Greedy tokens and the next-token log-probabilities before each, in transformers (no KV cache)."""
    import torch

    ids, steps = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            steps.append(logprobs)
            token = int(logprobs.argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt_ids):], steps


def llamacpp_steps(llm, prompt_ids: list[int], new_tokens: int, eos: int):
    """The same in llama.cpp, with its KV cache (as a user's client decodes)."""
    import numpy as np
    import torch

    llm.reset()
    llm.eval(prompt_ids)
    answer, steps = [], []
    for _ in range(new_tokens):
        logits = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
        logprobs = torch.log_softmax(logits, dim=-1)
        steps.append(logprobs)
        token = int(logprobs.argmax())
        if token == eos:
            break
        answer.append(token)
        llm.eval([token])
    return answer, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fused", nargs="?", type=Path, default=Path("runs/demo/fused"))
    parser.add_argument("--work", type=Path, help="where the export and the GGUF go")
    parser.add_argument("--converter", type=Path, help="a convert_hf_to_gguf.py to use instead")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=0.002)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not (args.fused / "config.json").is_file():
        sys.exit(f"FAIL: no fused model at {args.fused}; run `h3fusion run configs/demo.yaml` (or pass a fused dir)")
    work = args.work or args.fused.parent / "llamacpp-check"
    mixtral, gguf = work / "mixtral", work / "model-f32.gguf"
    shutil.rmtree(mixtral, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_cpp_python_version

    seconds = {"export": run([sys.executable, "-m", "h3fusion.cli", "export", str(args.fused), "--format",
                              "mixtral", "--out", str(mixtral)], "h3fusion export")}
    script, llama_cpp_commit = converter_script(args.converter)
    seconds["convert"] = run([sys.executable, str(script), str(mixtral), "--outfile", str(gguf), "--outtype", "f32"],
                             "convert_hf_to_gguf.py")
    # logits_all: llama-cpp-python keeps no logits otherwise; type 0 = GGML_TYPE_F32: an f32 KV cache
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=1024, n_threads=args.threads, logits_all=True,
                type_k=0, type_v=0, verbose=False)
    arch = llm.metadata.get("general.architecture")
    experts = tuple(int(llm.metadata.get(f"{arch}.{key}", 0)) for key in ("expert_count", "expert_used_count"))

    from h3fusion.data.prompts import format_prompt
    from h3fusion.models import load_model

    model, tokenizer = load_model(str(args.fused), "float32")
    eos = tokenizer.eos_token_id
    results, worst = [], 0.0
    for instruction in demo_prompts(args.prompts):
        prompt = format_prompt(instruction)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        answer, steps = transformers_steps(model, ids, args.new_tokens, eos)
        llama_answer, llama_steps = llamacpp_steps(llm, ids, args.new_tokens, eos)
        differences = []
        for ours, theirs in zip(steps, llama_steps, strict=False):  # up to where either stopped
            top = set(ours.topk(TOP).indices.tolist()) | set(theirs.topk(TOP).indices.tolist())
            differences.append(max(abs(float(ours[t] - theirs[t])) for t in top))
        worst = max(worst, *differences)
        results.append({"instruction": instruction, "same_tokenization": llama_ids == ids,
                        "same_answer": llama_answer == answer, "answer": tokenizer.decode(answer),
                        "llama_cpp_answer": tokenizer.decode(llama_answer),
                        "max_top10_logprob_difference": max(differences), "steps": len(differences)})
        print(f"{'same' if llama_answer == answer else 'DIFFERENT'} answer, tokenization "
              f"{'same' if llama_ids == ids else 'DIFFERENT'}, max |dlogprob| {max(differences):.2e} over "
              f"{len(differences)} steps: {instruction[:50]!r} -> {tokenizer.decode(answer)[:60]!r}")
    passed = worst <= args.tolerance and all(r["same_answer"] and r["same_tokenization"] for r in results)
    summary = {
        "passed": passed, "max_top10_logprob_difference": worst, "tolerance": args.tolerance,
        "llama_cpp_python": llama_cpp_python_version, "llama_cpp_commit": llama_cpp_commit, "fused": str(args.fused), "gguf": str(gguf),
        "gguf_architecture": arch, "experts_total_and_used": experts, "outtype": "f32", "kv_cache": "f32",
        "new_tokens": args.new_tokens, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "prompts": results,
    }
    (work / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'PASS' if passed else 'FAIL'}: {len(results)} prompts, greedy answers "
          f"{'identical' if all(r['same_answer'] for r in results) else 'DIFFER'}, max top-{TOP} next-token "
          f"log-probability difference {worst:.2e} (tolerance {args.tolerance}); llama-cpp-python "
          f"{llama_cpp_python_version} (llama.cpp {llama_cpp_commit}; {arch}, {experts[0]} experts, {experts[1]} per token) -> {work / 'result.json'}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
