"""The LM head on response tokens only against the head on every position: an expert LoRA training step.

    .venv/bin/python bench/bench_response_logits.py [--config configs/cpu-bench.yaml] [--model PATH_OR_ID] \
        [--repeats 3] [--fusion-run RUN_DIR] --out results/bench_response_logits.json

The experts, multitask-sft and fusion train on response tokens only; the collator (``sft.SFTCollator``,
``response_logits``) sends the model a boolean ``logits_to_keep`` mask so that the vocabulary-sized head and its
softmax run on those positions alone. This measures what that saves on one LoRA step (forward + backward, the
optimizer left out: it is the same in both) of the config's expert recipe: per axis, the first batch of a seeded
sample of its training examples, the two variants on the same batch in alternating order after a warm-up of
each (``bench_moe.alternating``), median of the repeats; then each variant's peak memory on the helpful batch. One
process, one thread. ``--model`` swaps the base (for example the Gemma-3-270m GGUF, whose 262k-token vocabulary
makes the head most of a step). ``--fusion-run`` also times a fusion step (``FusionTrainer.compute_loss``: LM,
gating and drift terms, then backward) on that run's built MoE (``<run>/moe``), on one batch of the mixed fusion
data. Prints the ratios and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import REPO, alternating, log, median, mib  # noqa: E402  (sets the threads and the env first)

from h3fusion.config import load_config  # noqa: E402
from h3fusion.costs import PeakMemory  # noqa: E402
from h3fusion.data import load_train  # noqa: E402
from h3fusion.models import load_model  # noqa: E402
from h3fusion.sft import SFTCollator, SFTDataset, response_logits_supported  # noqa: E402

VARIANTS = ("full head", "response head")


def lora_model(config):
    """The config's base with the expert LoRA on it, as ``experts.train_lora_adapter`` makes it."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(config.model.base, config.model.dtype,
                                  trust_remote_code=config.model.trust_remote_code, cache_dir=config.model.cache_dir)
    lora = config.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), bias="none",
                                             task_type="CAUSAL_LM"))
    model.train()
    return model, tokenizer


def axis_batch(config, axis: str, tokenizer) -> list[dict]:
    """One training batch of the axis: ``train.batch_size`` examples of a seeded sample of its training set."""
    examples = random.Random(0).sample(load_train(axis, config), config.train.batch_size)
    return SFTDataset(examples, tokenizer, config.data.max_length, config.data.prompt_format).rows


def step(model, batch: dict) -> float:
    """Forward and backward of one batch, as the Trainer runs them (the loss over the batch's response tokens)."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    n = batch["labels"][:, 1:].ne(-100).sum()
    model(**batch, num_items_in_batch=n).loss.backward()
    return time.perf_counter() - start


def fusion_step_seconds(config, run_dir: Path, repeats: int) -> dict:
    """A fusion step on ``run_dir``'s built MoE, full head vs response head, on one seeded mixed batch."""
    import tempfile

    from h3fusion.data import mixed_train
    from h3fusion.fusion import FusionTrainer, axis_labels, prepare_for_fusion
    from h3fusion.sft import training_arguments

    model, tokenizer = load_model(str(run_dir / "moe"), config.model.dtype)
    prepare_for_fusion(model, config)
    model.train()
    examples = random.Random(0).sample(mixed_train(config, per_axis=config.fusion.examples_per_axis),
                                       config.fusion.train.batch_size)
    rows = SFTDataset(examples, tokenizer, config.data.max_length, config.data.prompt_format, axis_labels(config)).rows
    batches = {name: SFTCollator(tokenizer.pad_token_id, keep_axis_label=True,
                                 response_logits=name == "response head")(rows) for name in VARIANTS}
    log(f"fusion step on {run_dir / 'moe'}: logits at {int(batches['response head']['logits_to_keep'].sum())} of "
        f"{batches['full head']['labels'].numel()} positions")
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output dir: nothing is written there
        trainer = FusionTrainer(model=model, args=training_arguments(config.fusion.train, Path(scratch), config.seed),
                                gate_lambda=config.fusion.gate_lambda, gammas=config.gammas(),
                                gate_loss_form=config.fusion.gate_loss, expert_names=config.experts)

        def fusion_step(batch: dict) -> float:
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            n = batch["labels"][:, 1:].ne(-100).sum()
            trainer.compute_loss(model, dict(batch), num_items_in_batch=n).backward()
            return time.perf_counter() - start

        samples = alternating({name: (lambda b=b: fusion_step(b)) for name, b in batches.items()}, repeats)
    seconds = {name: median(s) for name, s in samples.items()}
    return {"positions": batches["full head"]["labels"].numel(),
            "response_positions": int(batches["response head"]["logits_to_keep"].sum()),
            "seconds": {n: round(s, 3) for n, s in seconds.items()},
            "samples": {n: [round(x, 3) for x in s] for n, s in samples.items()},
            "full / response time": round(seconds["full head"] / seconds["response head"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-bench.yaml"))
    parser.add_argument("--model", help="another base (hub id, directory or .gguf) in place of the config's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fusion-run", type=Path, help="a run directory whose built MoE (<run>/moe) a fusion step "
                        "is timed on, with the config's fusion settings")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = load_config(args.config, [f"model.base={args.model}"] if args.model else [])
    model, tokenizer = lora_model(config)
    if not response_logits_supported(model):
        sys.exit(f"{config.model.base}: its forward cannot take a boolean logits_to_keep mask; nothing to compare")
    collators = {"full head": SFTCollator(tokenizer.pad_token_id),
                 "response head": SFTCollator(tokenizer.pad_token_id, response_logits=True)}
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, 1 thread",
                     "date": time.strftime("%Y-%m-%d"), "base": str(config.model.base),
                     "vocabulary": model.get_output_embeddings().weight.shape[0],
                     "batch_size": config.train.batch_size, "max_length": config.data.max_length, "axes": {}}
    peaks_batch = None
    for axis in config.experts:
        rows = axis_batch(config, axis, tokenizer)
        batches = {name: collator(rows) for name, collator in collators.items()}
        peaks_batch = peaks_batch or batches
        positions = batches["full head"]["labels"].numel()
        kept = int(batches["response head"]["logits_to_keep"].sum())
        log(f"{axis}: batch {tuple(batches['full head']['labels'].shape)}, logits at {kept} of {positions} positions")
        samples = alternating({name: (lambda b=b: step(model, b)) for name, b in batches.items()}, args.repeats)
        seconds = {name: median(s) for name, s in samples.items()}
        results["axes"][axis] = {"positions": positions, "response_positions": kept,
                                 "seconds": {n: round(s, 3) for n, s in seconds.items()},
                                 "samples": {n: [round(x, 3) for x in s] for n, s in samples.items()},
                                 "full / response time": round(seconds["full head"] / seconds["response head"], 3)}
    peaks = {}
    for name, batch in peaks_batch.items():
        step(model, batch)  # warm: the allocator's first-step growth is not the step's
        with PeakMemory() as mem:
            step(model, batch)
        peaks[name] = mem.peak
    results["peak_mib_helpful"] = {n: mib(p) for n, p in peaks.items()}
    results["full / response peak memory"] = round(peaks["full head"] / max(peaks["response head"], 1), 3)
    print(f"\nLoRA step of {config.model.base} ({results['vocabulary']:,}-token vocabulary), "
          f"batch {config.train.batch_size}, {results['machine']}, {results['date']}")
    print("| axis | logits at | full head (s) | response head (s) | full / response |")
    print("|---|---:|---:|---:|---:|")
    for axis, r in results["axes"].items():
        print(f"| {axis} | {r['response_positions']} of {r['positions']} | {r['seconds']['full head']:.2f} | "
              f"{r['seconds']['response head']:.2f} | {r['full / response time']:.2f}x |")
    print(f"peak memory of the step (helpful batch): full {results['peak_mib_helpful']['full head']} MiB, "
          f"response {results['peak_mib_helpful']['response head']} MiB "
          f"({results['full / response peak memory']:.2f}x)")
    if args.fusion_run:
        fusion = results["fusion_step"] = fusion_step_seconds(config, args.fusion_run, args.repeats)
        print(f"fusion step ({fusion['response_positions']} of {fusion['positions']} positions): full "
              f"{fusion['seconds']['full head']:.2f} s, response {fusion['seconds']['response head']:.2f} s "
              f"({fusion['full / response time']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
