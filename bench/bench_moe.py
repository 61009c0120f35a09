"""Speed, size and memory of the fused MoE vs the base model, the dense layout and its peers.

    H3FUSION_CACHE=.cache/h3fusion HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_moe.py --quick \
        --out results/bench.json [--device cpu|cuda] [--dtype float32|bfloat16]

The peers, built from the same three expert adapters: the dense **Mixtral** export (`h3fusion export
--format mixtral`, loaded by transformers' ``MixtralForCausalLM``; a mergekit-style dense MoE) and PEFT's
**X-LoRA** (``XLoraConfig`` over the three adapters, top-2 of its untrained classifier's scalings).

One process, ``torch.set_num_threads(1)``; every timed comparison runs its variants in alternating
order (reversed on odd repeats) after a warm-up of each and reports the median of the repeats
(see /work/shared/docs/MOE-PROTOTYPE.md). Timing and memory are measured in separate runs: on CPU
peak memory is the peak RSS above the level just before the measured call, sampled every 2 ms with
glibc's mmap threshold lowered and the heap trimmed first (so freed tensors leave RSS); on CUDA it is
the torch allocator's peak above the allocation before the call.

Sections (keys of the JSON): ``generation`` (greedy tokens/s at batch 1 and 8; ``--generation-only``
runs just this and ``parameters``, for the variants named by ``--variants``), ``parameters``
(total / active per token / weight bytes / generation peak memory), ``training`` (fusion step vs an
expert LoRA step), ``build`` (build_moe with 3 adapters), ``llama2_7b`` (parameter counts on the meta
device and analytically), ``evaluator`` (the evaluator vs a plain batch-8 loop on the three axes' prompts).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("H3FUSION_NO_PROGRESS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # which code wrote a process's JSON
os.environ.setdefault("H3FUSION_CACHE", str(REPO / ".cache" / "h3fusion"))
os.environ.setdefault("H3FUSION_DATA_DIR", str(REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))  # tests.moe_fixtures.make_adapter

import torch  # noqa: E402

torch.set_num_threads(1)

from h3fusion.costs import PeakMemory, param_counts  # noqa: E402
from h3fusion.costs import release_freed_memory_to_os as memory_mode  # noqa: E402

ALPACA_EVAL = REPO.parent / "shared" / "data" / "alpaca_eval" / "text_davinci_003_outputs.json"
NAMES = ("helpful", "harmless", "honest")
VARIANTS = ("base", "compact", "compact-seq", "dense", "mixtral", "xlora")  # compact-seq: moe.routing sequence
TOP_K = 2
SEQ_TOP_K = 1  # compact-seq: one expert per sequence (issue 21's sequence-routing target)
GEN_TOKENS = 32
DECODE_STEPS = 64  # decode-step section: paired cached forwards per model and batch size
PROMPT_TOKENS = 32
TARGETS = {
    "compact/base b1": (">=", 0.80),
    "compact/base b8": (">=", 0.85),
    "compact-seq/base b1": (">=", 0.95),  # issue 21: sequence routing at the base's speed
    "compact-seq/base b8": (">=", 0.95),
    "decode step compact-seq/base b1": (">=", 0.95),  # the same target on decoding alone (no prefill), paired steps
    "decode step compact-seq/base b8": (">=", 0.95),
    "compact/dense b1": (">=", 1.3),
    "compact/dense b8": (">=", 1.5),
    "compact/mixtral b1": (">=", 1.0),
    "compact/mixtral b8": (">=", 1.0),
    "compact/xlora b1": (">=", 1.0),
    "compact/xlora b8": (">=", 1.0),
    "compact params / base params": ("<=", 1.05),
    "fusion step / LoRA step time": ("<=", 1.3),
    "fusion step / LoRA step peak mem": ("<=", 1.3),
    "llama2-7b compact params (B)": ("<=", 7.0),
    "evaluator / plain loop tok/s": (">=", 2.0),
}


# ---------------------------------------------------------------------------- measurement helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def alternating(variants: dict[str, Callable[[], float]], repeats: int, warmups: dict[str, Callable] | None = None,
                caps: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Warm up every variant, then run all in alternating order (reversed on odd repeats).

    ``caps``: at most this many repeats for a slow variant (X-LoRA), which then sits out the later ones; its
    samples pair with the others' first ones (``paired``). Each callable returns its own measured seconds;
    returns the samples per variant."""
    for name, fn in (warmups or variants).items():
        fn()
        log(f"  warm-up {name} done")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(repeats):
        ran = [n for n in (names if rep % 2 == 0 else names[::-1]) if rep < (caps or {}).get(n, repeats)]
        for name in ran:
            samples[name].append(variants[name]())
        log(f"  repeat {rep + 1}/{repeats}: " + ", ".join(f"{n} {samples[n][-1]:.2f}s" for n in names if n in ran))
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# ---------------------------------------------------------------------------- models
def make_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    from tests.moe_fixtures import make_adapter

    return {name: make_adapter(base_dir, root / name, seed=i + 1, r=8, alpha=16.0) for i, name in enumerate(NAMES)}


def build(base, adapters: dict[str, Path], storage: str, dtype, device: str, routing: str = "token",
          top_k: int = TOP_K):
    """The fused MoE; ``base`` is a model spec or a loaded model (which becomes the MoE)."""
    from h3fusion.moe.assemble import build_moe

    model = build_moe(base, {k: str(v) for k, v in adapters.items()}, top_k=top_k, storage=storage, dtype=dtype,
                      routing=routing)
    return model.to(device).eval()


def load_mixtral_export(compact, out_dir: Path, dtype, device: str):
    """``h3fusion export --format mixtral`` of the compact model, loaded back by transformers (no key may be
    missing or unexpected)."""
    from transformers import MixtralForCausalLM

    from h3fusion.moe.export import export_mixtral

    export_mixtral(compact, out_dir)
    mixtral, info = MixtralForCausalLM.from_pretrained(out_dir, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info
    return mixtral.to(device).eval()


def build_xlora(base_model, adapters: dict[str, Path], device: str):
    """PEFT's X-LoRA over the expert adapters, top-k of its (untrained, random) classifier's scalings,
    renormalised by a softmax over the kept ones: the same routing rule as the MoE's.

    X-LoRA requires ``use_cache=False`` (its ``generate`` forces it) and runs a scaling pass (the base with
    adapters off) before every forward. PEFT 0.21.2 loads the adapters under the names "0", "1", ... but
    activates them under the names given, so any other names raise ``KeyError`` (in
    ``disable_adapter_layers``); hence the numeric names."""
    from peft import XLoraConfig, get_peft_model

    base_model.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base_model.config.hidden_size,
                         adapters={str(i): str(path) for i, path in enumerate(adapters.values())},
                         top_k_lora=TOP_K, enable_softmax=False, enable_softmax_topk=True)
    return get_peft_model(base_model, config).to(device).eval()


# ---------------------------------------------------------------------------- sections
def gen_prompts(tokenizer, batch: int, device: str) -> dict:
    """``batch`` AlpacaEval instructions cut to exactly PROMPT_TOKENS tokens (no padding)."""
    rows = json.loads(ALPACA_EVAL.read_text())
    ids = []
    for row in rows:
        tok = tokenizer(row["instruction"] + " " + row["output"], add_special_tokens=False)["input_ids"]
        if len(tok) >= PROMPT_TOKENS:
            ids.append(tok[:PROMPT_TOKENS])
        if len(ids) == batch:
            break
    input_ids = torch.tensor(ids, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def greedy(model, inputs: dict, tokens: int, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             top_k=None, top_p=None, temperature=None, pad_token_id=pad_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + tokens, out.shape
    return out


def section_generation(models: dict, tokenizer, args) -> dict:
    pad = tokenizer.pad_token_id
    result = {}
    for batch in (1, 8):
        inputs = gen_prompts(tokenizer, batch, args.device)
        log(f"generation batch {batch}: {list(models)}")

        def runner(model, tokens=GEN_TOKENS, inputs=inputs):
            return lambda: timed(lambda: greedy(model, inputs, tokens, pad), args.device)[1]

        samples = alternating({name: runner(m) for name, m in models.items()}, args.gen_repeats,
                              warmups={name: runner(m, 8) for name, m in models.items()},
                              caps={"xlora": args.xlora_repeats})
        result[f"b{batch}"] = {
            name: {"tok_s": batch * GEN_TOKENS / median(s), "seconds": s} for name, s in samples.items()
        }
        if "compact-seq" in models:
            result[f"b{batch}"]["compact-seq"]["mixed_layers"] = mixed_layers(models["compact-seq"])
    # agreement of the layouts (same function, different storage): the logits of two prompts
    # (X-LoRA is another function: its classifier, not the MoE's router, mixes the adapters)
    inputs = gen_prompts(tokenizer, 2, args.device)
    with torch.no_grad():
        logits = {name: m(**inputs).logits.float() for name, m in models.items() if name in ("compact", "dense",
                                                                                            "mixtral")}
    result["max_abs_logit_diff"] = {
        f"compact_vs_{name}": float((logits["compact"] - logits[name]).abs().max())
        for name in ("dense", "mixtral") if "compact" in logits and name in logits
    }
    return result


def section_decode_steps(models: dict, tokenizer, args) -> dict:
    """Decoding alone, measured step by step: every model prefills the same prompts into its own KV cache, then the
    models take turns, one cached forward (greedy next token) each, in alternating order, for DECODE_STEPS steps.

    A whole ``generate`` per repeat (the generation section) also times the prefill and drifts with the machine
    between repeats (one repeat's ratio moves by ±0.05 here); neighbouring steps share the machine's state, so the
    ratio of the models' summed step times resolves differences of a percent. X-LoRA decodes without a cache
    (its generate forces ``use_cache=False``), so it is left out."""
    from transformers import DynamicCache

    cached = {name: m for name, m in models.items() if name != "xlora"}
    result = {}
    for batch in (1, 8):
        inputs = gen_prompts(tokenizer, batch, args.device)
        state, seconds = {}, {name: [] for name in cached}
        with torch.no_grad():
            for name, m in cached.items():
                cache = DynamicCache()
                out = m(**inputs, past_key_values=cache, use_cache=True)
                state[name] = (cache, out.logits[:, -1:].argmax(-1), inputs["attention_mask"])
            names = list(cached)
            for step in range(DECODE_STEPS):
                for name in names if step % 2 == 0 else names[::-1]:
                    cache, ids, mask = state[name]
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                    out, dt = timed(lambda m=cached[name], ids=ids, mask=mask, cache=cache: m(
                        input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True), args.device)
                    seconds[name].append(dt)
                    state[name] = (cache, out.logits[:, -1:].argmax(-1), mask)
        result[f"b{batch}"] = {name: {"tok_s": batch * len(s) / sum(s), "seconds": s} for name, s in seconds.items()}
        log(f"decode steps batch {batch}: " + ", ".join(f"{n} {1e3 * median(s):.1f} ms" for n, s in seconds.items()))
    return result


PREFILL_REPEATS = 12  # prefill section: one forward each, alternating, per model


def section_prefill(models: dict, tokenizer, args) -> dict:
    """The prompt's forward alone (batch 8 × PROMPT_TOKENS tokens into a fresh KV cache, the LM head on the last
    position, as ``generate`` runs it): the models take turns, PREFILL_REPEATS each. At batch 8 it is ~18% of a
    whole generation, and the MoE's many-token paths (token routing's routed loop, sequence routing's rank-space
    mask) run here, not while decoding. X-LoRA is left out, as in the decode steps."""
    from transformers import DynamicCache

    inputs = gen_prompts(tokenizer, 8, args.device)

    def runner(model):
        return lambda: timed(lambda: model(**inputs, past_key_values=DynamicCache(), use_cache=True,
                                           logits_to_keep=1), args.device)[1]

    with torch.no_grad():
        samples = alternating({name: runner(m) for name, m in models.items() if name != "xlora"}, PREFILL_REPEATS)
    return {"b8": {name: {"tok_s": 8 * PROMPT_TOKENS / median(s), "seconds": s} for name, s in samples.items()}}


def mixed_layers(model) -> float:
    """Share of a sequence-routed model's layers whose rows (of the last batch it decoded) kept different
    experts: a mixed batch, the case a single merged expert could not serve."""
    decisions = [layer.sequence_decision for layer in model.moe_layers()]
    mixed = [len({tuple(row) for row in d.indices.tolist()}) > 1 for d in decisions if d is not None]
    return sum(mixed) / max(len(mixed), 1)


def section_memory(models: dict, tokenizer, args) -> dict:
    """Peak memory of one b8 greedy generation per variant (above its pre-call level)."""
    inputs = gen_prompts(tokenizer, 8, args.device)
    out = {}
    for name, model in models.items():
        peaks = []
        for _ in range(2):  # the smaller of two: heap state can only add to a sample
            with PeakMemory(args.device) as mem:
                greedy(model, inputs, GEN_TOKENS, tokenizer.pad_token_id)
            peaks.append(mem.peak)
        out[name] = {"generate_b8_peak_bytes": min(peaks), "generate_b8_peak_samples": peaks,
                     "generate_b8_peak_exact": mem.exact}  # False: sampled every 2 ms (no kernel peak mark here)
    return out


def training_batch(tokenizer, device: str, batch: int = 4, length: int = 128) -> dict:
    rows = json.loads(ALPACA_EVAL.read_text())
    text = " ".join(r["instruction"] + " " + r["output"] for r in rows[:200])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: batch * length]
    input_ids = torch.tensor(ids, device=device).view(batch, length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "axis_label": torch.tensor([0, 1, 2, 0][:batch], device=device)}


class TrainSetup:
    """The two training steps: the fusion stage on the compact MoE, and an expert LoRA on the base."""

    def __init__(self, base_dir: str, adapters: dict, tokenizer, args, workdir: Path):
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer

        from h3fusion.config import RunConfig
        from h3fusion.fusion import FusionTrainer, prepare_for_fusion
        from h3fusion.models import load_model
        from h3fusion.sft import training_arguments

        config = RunConfig()
        targs = training_arguments(config.fusion.train, workdir / "trainer", 0)
        self.device = args.device
        self.batch = training_batch(tokenizer, args.device)

        self.fused = build(base_dir, adapters, "compact", args.torch_dtype, args.device)
        prepare_for_fusion(self.fused, config)
        self.fused.train()
        self.fusion_trainer = FusionTrainer(
            model=self.fused, args=targs, gate_lambda=config.fusion.gate_lambda, gammas=config.gammas(),
            gate_loss_form=config.fusion.gate_loss, expert_names=list(NAMES), router_lr=config.fusion.router_lr,
        )
        self.fusion_opt = self.fusion_trainer.create_optimizer()

        lora_base, _ = load_model(base_dir, args.torch_dtype)
        lora_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=config.lora.dropout,
                              target_modules=["gate_proj", "up_proj", "down_proj"], bias="none")
        self.lora = get_peft_model(lora_base.to(args.device), lora_cfg)
        self.lora.train()
        self.lora_trainer = Trainer(model=self.lora, args=targs)
        self.lora_opt = self.lora_trainer.create_optimizer()
        self.trainable = {
            "fusion": sum(p.numel() for p in self.fused.parameters() if p.requires_grad),
            "lora": sum(p.numel() for p in self.lora.parameters() if p.requires_grad),
        }
        self.lora_settings = {"r": 8, "alpha": 16, "dropout": config.lora.dropout}
        self.fusion_settings = {"r": config.fusion.lora_r, "alpha": config.fusion.lora_alpha,
                                "dropout": config.fusion.lora_dropout, "attention_lora": config.fusion.attention_lora}

    def fusion_step(self) -> float:
        self.fusion_opt.zero_grad(set_to_none=True)
        inputs = dict(self.batch)

        def step():
            loss = self.fusion_trainer.compute_loss(self.fused, inputs)
            loss.backward()
            self.fusion_opt.step()

        return timed(step, self.device)[1]

    def lora_step(self) -> float:
        self.lora_opt.zero_grad(set_to_none=True)
        inputs = {k: v for k, v in self.batch.items() if k != "axis_label"}

        def step():
            loss = self.lora(**inputs).loss
            loss.backward()
            self.lora_opt.step()

        return timed(step, self.device)[1]


def section_training(setup: TrainSetup, args) -> dict:
    log("training: fusion step vs expert LoRA step (batch 4 x 128)")
    samples = alternating({"fusion": setup.fusion_step, "lora": setup.lora_step}, args.train_repeats)
    return {name: {"step_s": median(s), "seconds": s} for name, s in samples.items()} | {
        "trainable_parameters": setup.trainable, "lora_settings": setup.lora_settings,
        "fusion_settings": setup.fusion_settings}


def training_memory(setup: TrainSetup, args) -> dict:
    out = {}
    for name, fn in (("fusion", setup.fusion_step), ("lora", setup.lora_step)):
        peaks = []
        for _ in range(2):  # the smaller of two, as for generation
            with PeakMemory(args.device) as mem:
                fn()
            peaks.append(mem.peak)
        out[name] = min(peaks)
    return out


def llama2_7b_counts(n: int = 3, r: int = 8) -> dict:
    """Parameter counts of a Llama-2-7B-shaped base, compact and dense fused model: meta device + analytic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from h3fusion.moe.layer import PROJECTIONS, LowRankDelta
    from h3fusion.moe.modeling import H3FusionConfig, H3FusionForCausalLM

    h, inter, layers, vocab = 4096, 11008, 32, 32000
    cfg = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    base_an = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    compact_an = base_an + layers * (n * h + n * 3 * r * (h + inter))
    dense_an = base_an + layers * ((n - 1) * 3 * h * inter + n * h)
    out = {"analytic": {"base": base_an, "compact": compact_an, "dense": dense_an}}
    shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    meta = {}
    try:
        for kind in ("base", "compact", "dense"):
            with torch.device("meta"):
                base = LlamaForCausalLM(LlamaConfig(**cfg))
                if kind != "base":
                    deltas = [[{p: LowRankDelta(torch.empty(r, shapes[p][1]), torch.empty(shapes[p][0], r), 2.0)
                                for p in PROJECTIONS} for _ in range(n)] for _ in range(layers)]
                    config = H3FusionConfig(base_config=base.config.to_dict(), expert_names=list(NAMES),
                                            num_experts_per_tok=TOP_K, storage=kind)
                    base = H3FusionForCausalLM(config, base_model=base, expert_deltas=deltas)
            meta[kind] = param_counts(base, kind)["total"]
        out["meta"] = meta
        out["meta_matches_analytic"] = meta == out["analytic"]
    except Exception as error:  # noqa: BLE001 - the analytic counts still stand
        out["meta_error"] = f"{type(error).__name__}: {error}"
    return out


def section_evaluator(model, tokenizer, args, workdir: Path) -> dict:
    """The evaluator (``generate_jsonl`` as configs/cpu-bench.yaml runs it: batch 32, length-sorted windows,
    finished rows leaving the batch) vs a plain batch-8 ``model.generate`` loop in input order, on the
    first prompts of each evaluated axis with cpu-bench's per-axis new-token limits."""
    from h3fusion.config import load_config
    from h3fusion.data import format_prompt
    from h3fusion.generate import evaluated_records, generate_jsonl, prompt_text

    config = load_config(REPO / "configs" / "cpu-bench.yaml")
    gen = config.generate
    axes = {axis: evaluated_records(config, axis)[: args.eval_prompts] for axis in config.experts}
    counter = {"n": 0}
    tokens: dict[str, int] = {}
    slots = {"plain_loop": 0}

    def run_evaluator(axes=axes) -> float:
        counter["n"] += 1

        def all_axes():
            return sum(generate_jsonl(model, tokenizer, records, workdir / f"{axis}{counter['n']}.jsonl",
                                      max_new_tokens=gen.max_new_tokens[axis], batch_size=gen.batch_size,
                                      stop_strings=gen.stop_strings, progress=False)["new_tokens"]
                       for axis, records in axes.items())

        tokens["evaluator"], dt = timed(all_axes, args.device)
        return dt

    def run_plain(axes=axes) -> float:
        def loop():
            tokenizer.padding_side = "left"
            n_new = decode_slots = 0
            for axis, records in axes.items():
                prompts = [format_prompt(*prompt_text(r), "alpaca", tokenizer) for r in records]
                for b in range(0, len(prompts), 8):
                    batch = tokenizer(prompts[b:b + 8], return_tensors="pt", padding=True,
                                      add_special_tokens=False).to(args.device)
                    with torch.no_grad():
                        out = model.generate(**batch, max_new_tokens=gen.max_new_tokens[axis], do_sample=False,
                                             top_k=None, top_p=None, temperature=None,
                                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                             stop_strings=gen.stop_strings, tokenizer=tokenizer)
                    new = out[:, batch["input_ids"].shape[1]:]
                    decode_slots += new.numel()
                    for row in new:
                        ids = row[row != tokenizer.pad_token_id]
                        n_new += int(ids.numel())
                        tokenizer.decode(ids, skip_special_tokens=True)
            slots["plain_loop"] = decode_slots
            return n_new

        tokens["plain_loop"], dt = timed(loop, args.device)
        return dt

    n = sum(len(r) for r in axes.values())
    log(f"evaluator: {n} prompts ({args.eval_prompts} per axis), evaluator batch {gen.batch_size} vs plain batch 8, "
        f"max_new_tokens {gen.max_new_tokens}")
    # warm-up on a few prompts per axis: it only needs every code path run once, not the full minutes
    few = {axis: records[:4] for axis, records in axes.items()}
    samples = alternating({"evaluator": run_evaluator, "plain_loop": run_plain}, args.eval_repeats,
                          warmups={"evaluator": lambda: run_evaluator(few), "plain_loop": lambda: run_plain(few)})
    result = {"prompts": n, "max_new_tokens": gen.max_new_tokens, "evaluator_batch": gen.batch_size, "model": "compact"}
    for name, s in samples.items():
        result[name] = {"new_tokens": tokens[name], "seconds": s, "tok_s": tokens[name] / median(s)}
    # where the plain loop's time goes: decode slots spent on rows that had already finished
    result["plain_loop"]["useful_decode_fraction"] = tokens["plain_loop"] / max(slots["plain_loop"], 1)
    return result


# ---------------------------------------------------------------------------- report
def check(name: str, value: float) -> tuple[str, str]:
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{op} {target:g}", "met" if ok else "MISSED"


def paired(numerators: list[float], denominators: list[float]) -> float:
    """Median over repeats of numerator/denominator (the two ran next to each other in every repeat; a capped
    variant's samples pair with the other's first ones, the repeats both ran)."""
    return median([a / b for a, b in zip(numerators, denominators, strict=False)])


# how param_counts reads each variant: X-LoRA runs every adapter (and, in its scaling pass, the base once more)
# on every token, so all its parameters are active
PARAM_KIND = {"base": "base", "compact": "compact", "compact-seq": "compact", "dense": "dense", "mixtral": "mixtral",
              "xlora": "base"}
RATIOS = (("compact", "base"), ("compact-seq", "base"), ("compact-seq", "compact"), ("compact", "dense"), ("mixtral", "base"), ("xlora", "base"),
          ("compact", "mixtral"), ("compact", "xlora"))


def speed_ratios(results: dict) -> dict[str, tuple[float, tuple[float, str]]]:
    """Every speed ratio of one run: ``name -> (ratio of the medians' tok/s, (median of the paired per-repeat or
    per-step ratios, "repeat" | "step"))`` for the generation, decode-step and prefill sections it has."""
    out = {}
    for prefix, timed_runs, unit in (("", results.get("generation", {}), "repeat"),
                                     ("decode step ", results.get("decode_steps", {}), "step"),
                                     ("prefill ", results.get("prefill", {}), "repeat")):
        for b in ("b1", "b8"):
            runs = timed_runs.get(b, {})
            for num, den in RATIOS:
                if num in runs and den in runs:
                    out[f"{prefix}{num}/{den} {b}"] = (runs[num]["tok_s"] / runs[den]["tok_s"],
                                                       (paired(runs[den]["seconds"], runs[num]["seconds"]), unit))
    return out


def table(results: dict) -> str:
    """The results as a markdown table; sections a run left out (``--generation-only``, older JSON) are skipped."""
    g, p = results["generation"], results.get("parameters", {})
    rows: list[tuple[str, str, str, str]] = []

    def add(name, value, fmt="{:.3f}"):
        if name in TARGETS:
            target, verdict = check(name, value)
        else:
            target, verdict = "", ""
        rows.append((name, fmt.format(value), target, verdict))

    for b in ("b1", "b8"):
        for v in g[b]:
            add(f"{v} tok/s {b}", g[b][v]["tok_s"], "{:.2f}")
        if "mixed_layers" in g[b].get("compact-seq", {}):
            rows.append((f"compact-seq layers whose rows kept different experts {b}",
                         f"{g[b]['compact-seq']['mixed_layers']:.2f}", "", ""))
    for name, (ratio, per_unit) in speed_ratios(results).items():
        add(name, ratio)
        rows.append((f"  ({name}: median of per-{per_unit[1]} ratios)", f"{per_unit[0]:.3f}", "", ""))
    for v, c in p.items():
        rows.append((f"{v} params total / active (M)", f"{c['total'] / 1e6:.2f} / {c['active_per_token'] / 1e6:.2f}",
                     "", ""))
        rows.append((f"{v} weights / generate-b8 peak (MiB)",
                     f"{mib(c['weight_bytes'])} / {mib(c['generate_b8_peak_bytes'])}", "", ""))
    if "compact" in p and "base" in p:
        add("compact params / base params", p["compact"]["total"] / p["base"]["total"], "{:.4f}")
    if "training" in results:
        t = results["training"]
        add("fusion step s", t["fusion"]["step_s"], "{:.2f}")
        add("LoRA step s", t["lora"]["step_s"], "{:.2f}")
        add("fusion step / LoRA step time", t["fusion"]["step_s"] / t["lora"]["step_s"])
        rows.append(("  (fusion/LoRA time: median of per-repeat ratios)",
                     f"{paired(t['fusion']['seconds'], t['lora']['seconds']):.3f}", "", ""))
        rows.append(("fusion / LoRA step peak (MiB)",
                     f"{mib(t['peak_bytes']['fusion'])} / {mib(t['peak_bytes']['lora'])}", "", ""))
        add("fusion step / LoRA step peak mem", t["peak_bytes"]["fusion"] / t["peak_bytes"]["lora"])
    for storage, b in results.get("build", {}).items():
        rows.append((f"build_moe {storage} s / peak (MiB)", f"{b['seconds_median']:.2f} / {mib(b['peak_bytes'])}",
                     "", ""))
    if "llama2_7b" in results:
        ll = results["llama2_7b"]
        counts = ll.get("meta", ll["analytic"])
        add("llama2-7b base params (B)", counts["base"] / 1e9)
        add("llama2-7b compact params (B)", counts["compact"] / 1e9)
        add("llama2-7b dense params (B)", counts["dense"] / 1e9)
        rows.append(("llama2-7b meta == analytic", str(ll.get("meta_matches_analytic", ll.get("meta_error"))), "",
                     ""))
    if "evaluator" in results:
        e = results["evaluator"]
        add("evaluator tok/s", e["evaluator"]["tok_s"], "{:.2f}")
        add("plain loop tok/s", e["plain_loop"]["tok_s"], "{:.2f}")
        add("evaluator / plain loop tok/s", e["evaluator"]["tok_s"] / e["plain_loop"]["tok_s"])
    return markdown(("measure", "value", "target", "verdict"), rows)


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- several processes
# A verdict near a target is a coin flip in one process: the same code's ratio moved by 0.03-0.09 between two
# processes on this VM (bench/README.md). ``--processes K`` runs the benchmark K times, each in a fresh process
# (one after the other, never side by side), and judges each speed ratio by its median over the K.
def child_argv(argv: list[str]) -> list[str]:
    """The command line without --processes and --out (each process gets its own --out)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--processes", "--out"):
            skip = True
        elif not a.startswith(("--processes=", "--out=")):
            kept.append(a)
    return kept


def process_out(out: Path, i: int) -> Path:
    return out.with_name(f"{out.stem}.process{i}{out.suffix}")


def across_processes(runs: list[dict]) -> dict:
    """Each speed ratio every run has: its per-process values (ratio of the medians, as one run's table gives it)
    and paired values (median of per-repeat or per-step ratios), their medians, minimum and maximum."""
    per_run = [speed_ratios(r) for r in runs]
    summary = {}
    for name in per_run[0]:
        if not all(name in r for r in per_run):
            continue
        values = [r[name][0] for r in per_run]
        paired_values = [r[name][1][0] for r in per_run]
        summary[name] = {"values": values, "median": median(values), "min": min(values), "max": max(values),
                         "paired_values": paired_values, "paired_median": median(paired_values)}
        if name in TARGETS:
            summary[name]["met_in"] = sum(check(name, v)[1] == "met" for v in values)
    return summary


def across_table(summary: dict, processes: int) -> str:
    rows = []
    for name, s in summary.items():
        target, verdict = check(name, s["median"]) if name in TARGETS else ("", "")
        met_in = f"{s['met_in']}/{processes}" if name in TARGETS else ""
        rows.append((name, f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}", f"{s['paired_median']:.3f}",
                     target, verdict, met_in))
    return markdown((f"measure (median of {processes} processes)", "median", "min-max", "paired median", "target",
                     "verdict (median)", "met in"), rows)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; ``platform.processor()`` there says only "x86_64" or nothing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    """What makes two processes' figures comparable: the machine (its CPU model, and GPU where there is one), the
    torch build and its threads."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def process_record(path: Path, command: list[str]) -> tuple[dict | None, str]:
    """A process's results, if ``path`` holds them whole and this script wrote them for ``command`` on this
    machine (another machine's figures would be summarised as if they were this one's); else None and why not."""
    try:
        done = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # cut short by a kill while it was written: run it again
        return None, "its JSON is cut short"
    if not isinstance(done, dict):
        return None, "it holds no results" if done is None else "its JSON is no results of this script"
    if done.get("script_sha256") != SCRIPT_SHA256:
        return None, "another version of bench_moe.py wrote it (do not edit the script while a series runs)"
    if done.get("argv") != command:
        return None, "it was written for another command line"
    machine = done.get("machine")
    changed = [k for k, v in machine_facts().items() if not isinstance(machine, dict) or machine.get(k) != v]
    if changed:
        return None, f"it was written on another machine (other {', '.join(changed)})"
    return done, ""


def finished_process(path: Path, command: list[str]) -> dict | None:
    """``process_record``'s results alone."""
    return process_record(path, command)[0]


def run_processes(args, argv: list[str]) -> None:
    """Run the benchmark in ``args.processes`` fresh processes, one after the other, then summarise.

    A process whose JSON exists and was written for the same command line by the same script is not run again,
    so a killed series resumes where it stopped."""
    import subprocess

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = child_argv(argv)
    runs = []
    for i in range(1, args.processes + 1):
        path = process_out(out, i)
        done = finished_process(path, command)
        if done is not None:
            log(f"process {i}/{args.processes}: done earlier ({path})")
        else:
            log(f"process {i}/{args.processes} -> {path}")
            try:
                finished = subprocess.run([sys.executable, __file__, *command, "--out", str(path)])
            except KeyboardInterrupt:
                sys.exit(f"bench_moe: interrupted in process {i} of {args.processes}; the {i - 1} finished ones are "
                         "kept, rerun the same command to resume")
            if finished.returncode != 0:
                sys.exit(f"bench_moe: process {i} of {args.processes} failed (exit {finished.returncode}; its "
                         f"output is above); the {i - 1} finished ones are kept, rerun the same command to resume")
            done, why = process_record(path, command)
            if done is None:  # the script was edited while the series ran, or the process wrote nothing
                sys.exit(f"bench_moe: process {i} of {args.processes} left no usable results in {path}: {why}; "
                         "rerun the same command")
        runs.append(done)
    summary = across_processes(runs)
    results = {"processes": args.processes, "argv": command, "runs": [str(process_out(out, i))
                                                                      for i in range(1, args.processes + 1)],
               "machines": [r["machine"] for r in runs], "dates": [r["date"] for r in runs],
               "wall_seconds": [r.get("wall_seconds") for r in runs], "across_processes": summary}
    results["table"] = across_table(summary, args.processes)
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(results["table"])
    print(f"JSON: {out} (each process's own: {', '.join(results['runs'])})")


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer repeats: 7 per generation timing (X-LoRA 3), 3 per training timing, 1 for the evaluator (36 minutes on the loaded 2-core box "
                        "with 3 generation repeats, most of it X-LoRA's batch-8 generations; --generation-only with 7: 17 minutes idle)")
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--smoke", action="store_true", help="one repeat of everything, tiny evaluator run "
                        "(checks the script; figures meaningless)")
    parser.add_argument("--report", metavar="JSON", help="only reprint the table of an earlier run's JSON")
    parser.add_argument("--evaluator-only", action="store_true",
                        help="only the evaluator section (the compact fused model; minutes)")
    parser.add_argument("--training-only", action="store_true",
                        help="only the training section: fusion step vs expert LoRA step, time and peak memory")
    parser.add_argument("--generation-only", action="store_true",
                        help="only generation speed, parameters and generation peak memory (of --variants)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated generation variants (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--gen-repeats", type=int, help="generation repeats (default: 7 with --quick, else 9); a "
                        "32-token run at batch 1 lasts ~2 s, and on a shared VM one repeat's ratio moves by +-0.05")
    parser.add_argument("--xlora-repeats", type=int, default=3,
                        help="at most this many of the generation repeats for X-LoRA (one batch-8 run: ~90 s)")
    parser.add_argument("--processes", type=int, default=1, metavar="K",
                        help="run the benchmark K times, each in a fresh process, one after the other, and judge "
                        "each speed ratio by its median over the K (each process's JSON beside --out; a killed "
                        "series resumes)")
    args = parser.parse_args()
    if args.report:
        reported = json.loads(Path(args.report).read_text())
        print(across_table(reported["across_processes"], reported["processes"]) if "across_processes" in reported
              else table(reported))
        return
    if args.processes < 1:
        parser.error(f"--processes: {args.processes}; give 1 or more")
    if args.processes > 1 and (args.training_only or args.evaluator_only):
        parser.error("--processes summarises the speed ratios of generation: use it without --training-only and "
                     "--evaluator-only")
    args.torch_dtype = getattr(torch, args.dtype)
    args.gen_repeats = args.gen_repeats or (7 if args.quick else 9)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not args.generation_only and not {"base", "compact"} <= set(args.variants):
        parser.error("--variants: the full run needs base and compact (the other sections use them)")
    if args.processes > 1:
        run_processes(args, sys.argv[1:])
        return
    if args.device == "cuda" and not torch.cuda.is_available():  # checked where the models load, not in the parent
        sys.exit("bench_moe: --device cuda, but torch sees no CUDA device here; run on a GPU machine or use "
                 "--device cpu")
    args.train_repeats = 3 if args.quick else 5
    args.eval_repeats = 1 if args.quick else 2
    args.eval_prompts = 32  # per axis: 16 did not fill the evaluator's batch of 32 and understated its gain
    args.build_repeats = 1 if args.quick else 2
    if args.smoke:
        args.gen_repeats = args.xlora_repeats = args.train_repeats = args.eval_repeats = args.build_repeats = 1
        args.eval_prompts = 4

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from h3fusion.models import load_model, resolve_model_path

    started = time.perf_counter()
    results: dict = {
        "machine": {**machine_facts(), "device": args.device, "dtype": args.dtype, "loadavg_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "torch_dtype"},
        "argv": child_argv(sys.argv[1:]),  # --processes reuses a process's JSON only for the same command line
        "script_sha256": SCRIPT_SHA256,  # ... run by the same script
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    base_dir = resolve_model_path("smollm2-135m")
    workdir = Path(tempfile.mkdtemp(prefix="bench_moe."))
    log(f"adapters (r=8, alpha=16) in {workdir}")
    adapters = make_adapters(Path(base_dir), workdir / "adapters")

    base, tokenizer = load_model(base_dir, args.torch_dtype)
    base = base.to(args.device)
    if args.evaluator_only:
        compact = build(base_dir, adapters, "compact", args.torch_dtype, args.device)
        results["evaluator"] = e = section_evaluator(compact, tokenizer, args, workdir / "eval")
        results["machine"]["loadavg_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        for name in ("evaluator", "plain_loop"):
            print(f"{name}: {e[name]['new_tokens']} new tokens, median {median(e[name]['seconds']):.2f}s, "
                  f"{e[name]['tok_s']:.2f} tok/s")
        print(f"evaluator / plain loop tok/s: {e['evaluator']['tok_s'] / e['plain_loop']['tok_s']:.2f} (target >= 2); "
              f"plain loop useful decode slots {e['plain_loop']['useful_decode_fraction']:.1%}; JSON: {args.out}")
        return
    if args.training_only:
        setup = TrainSetup(base_dir, adapters, tokenizer, args, workdir)
        results["training"] = t = section_training(setup, args)
        memory_mode()
        t["peak_bytes"] = training_memory(setup, args)
        results["machine"]["loadavg_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        time_ratio = paired(t["fusion"]["seconds"], t["lora"]["seconds"])
        mem_ratio = t["peak_bytes"]["fusion"] / t["peak_bytes"]["lora"]
        print(f"fusion step {t['fusion']['step_s']:.2f}s / LoRA step {t['lora']['step_s']:.2f}s: "
              f"{time_ratio:.3f} (per-repeat median; target <= 1.3)")
        print(f"fusion / LoRA step peak memory: {mib(t['peak_bytes']['fusion']):.0f} / "
              f"{mib(t['peak_bytes']['lora']):.0f} MiB = {mem_ratio:.3f} (target <= 1.3); JSON: {args.out}")
        return
    build_s: dict[str, list[float]] = {"compact": [], "dense": []}
    models = {"base": base}
    for storage in ("compact", "dense"):
        if storage in args.variants or (storage == "compact" and "mixtral" in args.variants):
            models[storage], dt = timed(lambda s=storage: build(base_dir, adapters, s, args.torch_dtype, args.device),
                                        args.device)
            build_s[storage].append(dt)
            log(f"built {storage} in {dt:.1f}s")
    if "compact-seq" in args.variants:  # the same experts, one routing decision per sequence
        models["compact-seq"] = build(base_dir, adapters, "compact", args.torch_dtype, args.device, routing="sequence",
                                      top_k=SEQ_TOP_K)
    if "mixtral" in args.variants:
        models["mixtral"] = load_mixtral_export(models["compact"], workdir / "mixtral", args.torch_dtype,
                                                args.device)
    if "xlora" in args.variants:
        models["xlora"] = build_xlora(load_model(base_dir, args.torch_dtype)[0], adapters, args.device)
    models = {name: models[name] for name in VARIANTS if name in args.variants}  # the table's order

    results["generation"] = section_generation(models, tokenizer, args)
    results["decode_steps"] = section_decode_steps(models, tokenizer, args)
    results["prefill"] = section_prefill(models, tokenizer, args)
    if args.generation_only:
        log("memory phase")
        memory_mode()
        mem = section_memory(models, tokenizer, args)
        results["parameters"] = {name: param_counts(m, PARAM_KIND[name]) | mem[name] for name, m in models.items()}
        finish(results, started, args)
        return
    results["llama2_7b"] = llama2_7b_counts()
    setup = TrainSetup(base_dir, adapters, tokenizer, args, workdir)
    results["training"] = section_training(setup, args)
    results["evaluator"] = section_evaluator(models["compact"], tokenizer, args, workdir / "eval")
    for _ in range(args.build_repeats - 1):
        for storage in ("compact", "dense"):
            _, dt = timed(lambda s=storage: build(base_dir, adapters, s, args.torch_dtype, args.device), args.device)
            build_s[storage].append(dt)

    # ---- memory phase (after all timing: it changes the allocator's behaviour)
    log("memory phase")
    memory_mode()
    mem = section_memory(models, tokenizer, args)
    results["parameters"] = {name: param_counts(m, PARAM_KIND[name]) | mem[name] for name, m in models.items()}
    results["training"]["peak_bytes"] = training_memory(setup, args)
    del setup
    results["build"] = {}
    for storage in ("compact", "dense"):
        with PeakMemory(args.device) as m:
            model = build(base_dir, adapters, storage, args.torch_dtype, args.device)
        del model
        results["build"][storage] = {"seconds": build_s[storage], "seconds_median": median(build_s[storage]),
                                     "peak_bytes": m.peak, "retained_bytes": m.end, "includes": "base load from disk"}
    finish(results, started, args)


def finish(results: dict, started: float, args) -> None:
    """Write the JSON and print the table."""
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["table"] = table(results)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(results["table"])
    if "evaluator" in results:
        e = results["evaluator"]
        for name in ("evaluator", "plain_loop"):
            print(f"{name}: {e[name]['new_tokens']} new tokens, median {median(e[name]['seconds']):.2f}s")
        print(f"plain loop: {e['plain_loop']['useful_decode_fraction']:.1%} of its decode slots were useful "
              "(the rest decoded rows that had finished)")
    print(f"logit agreement: {results['generation']['max_abs_logit_diff']}")
    print(f"wall {results['wall_seconds']}s; load average {results['machine']['loadavg_start']} -> "
          f"{results['machine']['loadavg_end']}; JSON: {out}")


if __name__ == "__main__":
    main()
